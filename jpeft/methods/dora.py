"""Family E: DoRA, weight-decomposed LoRA (Liu et al. 2024).

`K' = (K_base + s·a@b) · diag(mag / ‖K_base + s·a@b‖_col)`: one magnitude per output unit (a
column of the Flax kernel, a row of the paper's `W`). The norm is a constant for autodiff
(paper §4.3, PEFT `weight_norm.detach()`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.linalg import upcast
from jpeft.methods.lowrank import LoRA
from jpeft.registry import register


def column_norms(k: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(upcast(k)), axis=0))


def factored_column_norms(base, a, b, s) -> jax.Array:
    """`‖base + s·a@b‖_col` in O(in·out·r) flops and O(out·r) memory, never forming the sum:
    `‖base_j‖² + 2s·(baseᵀa)_j·b_j + s²·b_jᵀ(aᵀa)b_j`."""
    base, a, b = (upcast(t) for t in (base, a, b))
    cross = jnp.sum((base.T @ a) * b.T, axis=1)
    quad = jnp.sum((b.T @ (a.T @ a)) * b.T, axis=1)
    sq = jnp.sum(jnp.square(base), axis=0) + 2.0 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(sq, 0.0))


@register
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA: the LoRA options (rank, alpha, rslora, dropout, init) plus a trainable magnitude
    `train["m"] ∈ R^out`, initialised to the column norms of the initial effective kernel."""

    name = "dora"
    paper = "DoRA: Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024"
    quantized_matmul = False  # its factored norms need the base's columns: a quantised base is materialised

    def create(self, key, w, calib=None):
        node = super().create(key, w, calib)
        # The magnitude is kept in at least fp32: rounded to bf16 it would put `m / ‖K‖` off 1 and
        # DoRA off identity at init.
        magnitude = column_norms(node.base + self.delta(node)).astype(jnp.promote_types(w.dtype, jnp.float32))
        return node.replace(train={**node.train, "m": magnitude})

    def gain(self, node, norms):
        """`m / ‖K‖_col`; a zero column (norm 0, so `m = 0` at init) divides by 1 instead of 0: the
        column stays 0 and finite (not 0/0), and DoRA stays the identity at init."""
        norms = jax.lax.stop_gradient(norms)
        return upcast(node.train["m"]) / jnp.where(norms > 0, norms, 1.0)

    def materialise(self, node, rng=None):
        direction = node.base + self.delta(node, rng)
        norms = column_norms(node.base + self.delta(node))
        return (direction * self.gain(node, norms)).astype(node.base.dtype)

    def matmul(self, node, x, rng=None):
        a, b = self.lowrank_factors(node)
        norms = factored_column_norms(node.base, a, b, self.scale)
        return (super().matmul(node, x, rng) * self.gain(node, norms)).astype(x.dtype)

    def matmul_t(self, node, x, rng=None):
        return None  # the magnitude scales K's columns, which `x @ K'ᵀ` contracts: materialise

    def conv(self, node, x, conv_base, conv_to, rng=None):
        a, b = self.lowrank_factors(node)
        norms = factored_column_norms(node.base, a, b, self.scale)
        return (super().conv(node, x, conv_base, conv_to, rng) * self.gain(node, norms)).astype(x.dtype)

    def lookup(self, node, indices, rng=None):
        a, b = self.lowrank_factors(node)
        norms = factored_column_norms(node.base, a, b, self.scale)
        rows = super().lookup(node, indices)
        return (rows * self.gain(node, norms)).astype(node.base.dtype)
