"""Family E: multiplicative / orthogonal adapters, ETHER and ETHER+ (Bini et al. 2024).

Paper layout `W' = H_out · W · H_in` with block-diagonal `H = blockdiag(H_1..H_nb)`:
ETHER `H_b = I − 2·û_b û_bᵀ` (a Householder reflection), ETHER+ `H_b = I − û_b û_bᵀ + v̂_b v̂_bᵀ`.
Every `H_b` is symmetric, so in kernel layout (`K = Wᵀ`) `K' = H_in · K · H_out`: the input-side
transform acts on the rows of `K` (the input features), the output-side one on its columns.

`H` is never built: a block acts on a vector by rank-1 updates, `x ↦ x − 2(x·û)û` (ETHER) or
`x ↦ x + ((x·v̂)v̂ − (x·û)û)` (ETHER+), O(n) per token and block. `matmul` transforms the inputs,
multiplies by the frozen `K`, then transforms the outputs; `materialise` applies the same
rank-1 updates to the rows / columns of `K`.

[CODE≠PAPER] The reference (`mwbini/ether`) reshapes the `(out, in)` weight to `(nb, out, in/nb)`
with a raw memory reshape, which is not a block-diagonal `H` unless `nb = 1`; this is the
block-diagonal form of the paper.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.methods.base import Method, require, require_float_matrix
from jpeft.registry import register

SIDES = ("in", "out", "both")


def unit_rows(u: jax.Array) -> jax.Array:
    """Each row of `u` (one per block) divided by its norm."""
    return u / jnp.sqrt(jnp.sum(jnp.square(u), axis=-1, keepdims=True))


def reflect(x: jax.Array, u_hat: jax.Array, plus_v: jax.Array | None, axis: int) -> jax.Array:
    """`x` with every block along `axis` multiplied by its `H_b` (`u_hat`: (nb, d/nb), unit rows).

    ETHER (`plus_v is None`): `x_b − 2(x_b·û_b)û_b`; ETHER+: `x_b + ((x_b·v̂_b)v̂_b − (x_b·û_b)û_b)`
    (written so that `v̂ = −û` gives exactly `x`)."""
    nb, d = u_hat.shape
    x = jnp.moveaxis(x, axis, -1)
    xb = x.reshape(*x.shape[:-1], nb, d)
    cu = jnp.einsum("...bd,bd->...b", xb, u_hat)[..., None] * u_hat
    if plus_v is None:
        out = xb - 2.0 * cu
    else:
        cv = jnp.einsum("...bd,bd->...b", xb, plus_v)[..., None] * plus_v
        out = xb + (cv - cu)
    return jnp.moveaxis(out.reshape(x.shape), -1, axis)


@dataclasses.dataclass(frozen=True)
class _Ether(Method):
    """Shared ETHER / ETHER+ machinery. Options:

    n_blocks: number of diagonal blocks `nb` (must divide the transformed dimension(s)).
    side:     "in" (`W' = W·H`, the paper's default), "out" (`W' = H·W`, the reference's
              `flip_side`) or "both" (`W' = H_out·W·H_in`, the reference's `HH` variant).
    """

    n_blocks: int = 1
    side: str = "in"

    plus = False

    def validate(self) -> None:
        require(isinstance(self.n_blocks, int) and self.n_blocks >= 1,
                f"{self.name}: n_blocks must be a positive int, got {self.n_blocks!r}")
        require(self.side in SIDES, f"{self.name}: side must be one of {SIDES}, got {self.side!r}")

    @property
    def sides(self) -> tuple[str, ...]:
        return ("in", "out") if self.side == "both" else (self.side,)

    def check(self, path, w):
        require_float_matrix(path, w)
        dims = {"in": w.shape[0], "out": w.shape[1]}
        for side in self.sides:
            if dims[side] % self.n_blocks:
                raise leaf_error(path, w.shape, w.dtype,
                                 f"n_blocks = {self.n_blocks} must divide the {side}put dimension "
                                 f"{dims[side]} (side={self.side!r})")

    def create(self, key, w, calib=None):
        dims = {"in": w.shape[0], "out": w.shape[1]}
        train = {}
        for side, k in zip(self.sides, jax.random.split(key, 2)):
            d = dims[side] // self.n_blocks
            bound = 1.0 / math.sqrt(d)  # torch kaiming_uniform_(a=√5) on an (nb, d) tensor
            u = jax.random.uniform(k, (self.n_blocks, d), jnp.float32, -bound, bound).astype(w.dtype)
            train[f"u_{side}"] = u
            if self.plus:
                train[f"v_{side}"] = -u
        return self.node(w, train=train)

    def _units(self, node, side):
        u = unit_rows(linalg.upcast(node.train[f"u_{side}"]))
        v = unit_rows(linalg.upcast(node.train[f"v_{side}"])) if self.plus else None
        return u, v

    def materialise(self, node, rng=None):
        k = linalg.upcast(node.base)
        if "in" in self.sides:
            k = reflect(k, *self._units(node, "in"), axis=0)
        if "out" in self.sides:
            k = reflect(k, *self._units(node, "out"), axis=1)
        return k.astype(node.base.dtype)

    def matmul(self, node, x, rng=None):
        if "in" in self.sides:
            u, v = self._units(node, "in")
            x = reflect(x, u.astype(x.dtype), None if v is None else v.astype(x.dtype), -1)
        y = x @ node.base
        if "out" in self.sides:
            u, v = self._units(node, "out")
            y = reflect(y, u.astype(y.dtype), None if v is None else v.astype(y.dtype), -1)
        return y


@register
@dataclasses.dataclass(frozen=True)
class ETHER(_Ether):
    """ETHER: `H_b = I − 2·û_b û_bᵀ`, `u_b` trainable (Kaiming-uniform, bound 1/√(d/nb)).
    Not the identity at init (a reflection: `‖H_b − I‖_F = 2`), by design."""

    name = "ether"
    paper = "ETHER: Efficient Finetuning with Hyperplane Reflections, Bini et al., ICML 2024"
    identity_at_init = False


@register
@dataclasses.dataclass(frozen=True)
class ETHERPlus(_Ether):
    """ETHER+: `H_b = I − û_b û_bᵀ + v̂_b v̂_bᵀ`, `u_b` and `v_b` trainable; `v = −u` at init, so
    `H = I` (exactly: the two rank-1 terms cancel before they touch `W`)."""

    name = "ether_plus"
    paper = "ETHER+: Efficient Finetuning with Hyperplane Reflections, Bini et al., ICML 2024"
    plus = True
