"""VB-LoRA (Li et al., NeurIPS 2024): a shared-bank method (family G) whose every sub-vector is a top-k
mixture of one model-wide vector bank, and its storage forms (the top-k export PEFT's
`save_only_topk_weights` describes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpeft.adapter import Adapter, is_adapter
from jpeft.errors import leaf_error
from jpeft.methods.bank import BankMethod, float_dtype, shared_state
from jpeft.methods.base import require
from jpeft.paths import leaves_with_paths
from jpeft.registry import register
from jpeft.shared import SHARED


@register
@dataclasses.dataclass(frozen=True)
class VBLoRA(BankMethod):
    """VB-LoRA (PEFT `tuners/vblora`). One trainable vector bank `𝔅 ∈ R^{h×b}`
    for the whole model; every length-`b` sub-vector of every LoRA factor is
    `Σ_{j∈TopK(ℓ)} softmax(ℓ_TopK)_j 𝔅_j` with its own logits `ℓ ∈ R^h`. `W' = W + B A` (no scale).

    Per layer (PEFT layout): `logits_a (r, in/b, h)` (row i of `A` = its in/b sub-vectors),
    `logits_b (out/b, r, h)` (column j of `B`). Init: `𝔅 ~ U(±init_bank_bound)`,
    `ℓ ~ N(0, init_logits_std²)`, so `BA ≠ 0` at init (`identity_at_init = False`).
    """

    name = "vb_lora"
    paper = "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks, Li et al., NeurIPS 2024"
    identity_at_init = False

    rank: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    init_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def validate(self) -> None:
        super().validate()
        require(self.vector_length >= 1, f"{self.name}: vector_length must be >= 1")
        require(1 <= self.topk <= self.num_vectors,
                f"{self.name}: topk must satisfy 1 <= topk <= num_vectors = {self.num_vectors}, got {self.topk}")
        require(self.init_bank_bound > 0, f"{self.name}: init_bank_bound must be > 0 (a zero bank has zero gradients)")

    def check(self, path, w):
        super().check(path, w)
        for side, size in (("in", w.shape[0]), ("out", w.shape[1])):
            if size % self.vector_length:
                g = math.gcd(*w.shape)
                fits = max(d for d in range(1, min(g, self.vector_length) + 1) if g % d == 0)
                raise leaf_error(path, w.shape, w.dtype,
                                 f"vector_length {self.vector_length} must divide {side} = {size}; set "
                                 f"vector_length to a divisor of gcd(in, out) = {g} (e.g. {fits}), for every "
                                 f"targeted leaf")

    def create(self, key, w, calib=None):
        n, m = w.shape
        r, b, h = self.rank, self.vector_length, self.num_vectors
        ka, kb = jax.random.split(key)
        dt = float_dtype(w.dtype)
        std = self.init_logits_std
        return self.node(w, train={"logits_a": std * jax.random.normal(ka, (r, n // b, h), dt),
                                   "logits_b": std * jax.random.normal(kb, (m // b, r, h), dt)})

    def create_shared(self, key, leaves):
        dt = float_dtype(jnp.result_type(*[w.dtype for _, w in leaves]))
        bound = self.init_bank_bound
        bank = jax.random.uniform(key, (self.num_vectors, self.vector_length), dt, -bound, bound)
        return {"bank": bank}, {}

    def mix(self, logits: jax.Array, bank: jax.Array) -> jax.Array:
        """Sub-vectors `(..., b)`: the softmax-weighted sum of the top-k bank rows per logit vector."""
        values, idx = lax.top_k(logits, self.topk)
        weights = jax.nn.softmax(values, axis=-1)
        return jnp.einsum("...k,...kb->...b", weights, bank[idx])

    def lora_factors(self, node) -> tuple[jax.Array, jax.Array]:
        """Paper-layout `(A (r, in), B (out, r))`."""
        bank = shared_state(node)["bank"]
        la, lb = node.train["logits_a"], node.train["logits_b"]
        a = self.mix(la, bank).reshape(la.shape[0], -1)
        sub_b = self.mix(lb, bank)                       # (out/b, r, b)
        b = jnp.swapaxes(sub_b, 1, 2).reshape(-1, lb.shape[1])
        return a, b

    def factors(self, node):
        a, b = self.lora_factors(node)
        return a.T, b.T


class VBStorage(NamedTuple):
    """Stored-parameter counts of the VB-LoRA nodes of a tree (float32-equivalents where noted)."""

    bank: int            # h·b, once
    subvectors: int      # number of sub-vectors over all layers
    logits: int          # full logits (training form): subvectors·h
    topk: int            # top-k, as params: bank + subvectors·k·(index + weight)
    topk_fp32: int       # PEFT `get_nb_savable_parameters`: bank + subvectors·((k−1) + k·index_bytes/4)


def vblora_storage(params: Any) -> VBStorage:
    """Counts for every VB-LoRA node of `params` (concrete or `jax.eval_shape` trees)."""
    nodes = [x for x in jax.tree.leaves(params, is_leaf=is_adapter)
             if isinstance(x, Adapter) and isinstance(x.method, VBLoRA)]
    if not nodes:
        raise ValueError("no VB-LoRA adapter nodes in this tree")
    bank = sum(int(np.prod(np.shape(n.train[SHARED]["bank"]))) for n in nodes if SHARED in n.train)
    subvectors, topk, topk_fp32, logits = 0, 0, 0.0, 0
    for n in nodes:
        h, k = n.method.num_vectors, n.method.topk
        count = sum(int(np.prod(np.shape(n.train[name]))) // h for name in ("logits_a", "logits_b"))
        subvectors += count
        logits += count * h
        topk += count * 2 * k
        factor = 0.25 if h < 2 ** 8 else 0.5 if h < 2 ** 15 else 1.0 if h < 2 ** 31 else 2.0
        topk_fp32 += count * ((k - 1) + k * factor)
    return VBStorage(bank, subvectors, logits, bank + topk, int(bank + topk_fp32))


def vblora_topk_export(params: Any) -> dict[str, dict[str, np.ndarray]]:
    """The compact stored form (top-k indices and weights only, PEFT `save_only_topk_weights`):
    `{path: {"<logits>_indices": int, "<logits>_weights": float}}` with the top-k indices and their
    softmax weights per sub-vector. The bank is stored as usual."""
    out = {}
    for path, node in leaves_with_paths(params, is_leaf=is_adapter):
        if isinstance(node, Adapter) and isinstance(node.method, VBLoRA):
            entry = {}
            for name in ("logits_a", "logits_b"):
                values, idx = lax.top_k(node.train[name], node.method.topk)
                entry[f"{name}_indices"] = np.asarray(idx)
                entry[f"{name}_weights"] = np.asarray(jax.nn.softmax(values, axis=-1))
            out[path] = entry
    return out


def vblora_topk_import(params: Any, exported: dict[str, dict[str, np.ndarray]]) -> Any:
    """Logits rebuilt from `vblora_topk_export`: `log(weight)` at the stored indices, `-inf` elsewhere,
    so the sub-vectors (and outputs) are those of the exported model. For inference only (PEFT
    refuses to train from such logits, and so should callers)."""

    def rebuild(path, node):
        if not (isinstance(node, Adapter) and isinstance(node.method, VBLoRA)):
            return node
        train = dict(node.train)
        for name in ("logits_a", "logits_b"):
            idx = jnp.asarray(exported[path][f"{name}_indices"])
            w = jnp.asarray(exported[path][f"{name}_weights"], train[name].dtype)
            full = jnp.full(train[name].shape, -jnp.inf, train[name].dtype)
            flat_idx = idx.reshape(-1, idx.shape[-1])
            rows = jnp.arange(flat_idx.shape[0])[:, None]
            full = full.reshape(-1, full.shape[-1]).at[rows, flat_idx].set(jnp.log(w).reshape(flat_idx.shape))
            train[name] = full.reshape(train[name].shape)
        return node.replace(train=train)

    pairs = leaves_with_paths(params, is_leaf=is_adapter)
    leaves = [rebuild(p, x) for p, x in pairs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_adapter), leaves)
