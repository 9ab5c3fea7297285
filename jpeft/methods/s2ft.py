"""S2FT, Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024): a sparse-family method (family C)
that trains whole channels, selected sparsely and computed densely."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.hooks import PROBE
from jpeft.methods.base import require, require_float_matrix
from jpeft.methods.sparse import SparseMethod
from jpeft.methods.sparse_ops import (
    PATHS,
    SparseDelta,
)
from jpeft.registry import register

AXES = ("in", "out")
S2_SELECTIONS = ("random", "weight", "grad")


@register
@dataclasses.dataclass(frozen=True)
class S2FT(SparseMethod):
    """S2FT, Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024): train
    whole channels, selected sparsely and computed densely.

    axis="in":  input channels (paper columns `W[:, c]`, kernel rows `K[c, :]`): `o_proj` over
                heads (group = head_dim), `down_proj` over MLP channels;
    axis="out": output channels (paper rows `W[c, :]`, kernel columns `K[:, c]`): `up_proj`,
                `gate_proj`, `q/k/v_proj` over heads.
    `units` groups of `group` consecutive channels are chosen (`units`, when set, overrides
    `⌈fraction·groups⌉`) at random
    (paper default), by weight norm, or by gradient norm (`selection="grad"`, `calib=` a
    gradient). `train["s2"]` is the dense slice of the delta (`(channels, out)` for "in",
    `(in, channels)` for "out"), 0 at init (identity; the reference trains the slice of `W`
    itself, which is the same up to this reparameterisation), `frozen["sel"]` the sorted channels.
    The factored path is `x@K + x[:, sel] @ s2` ("in") or `(x@K)[:, sel] += x @ s2` ("out").
    `copermute` gives the co-permutation that makes the selected channels contiguous.
    """

    name = "s2ft"
    paper = "S2FT: Structured Sparse Fine-Tuning, Yang et al., NeurIPS 2024"

    density: float | None = None
    lora_rank: int | None = None
    axis: str = "in"
    group: int = 1
    units: int | None = None
    fraction: float | None = None
    selection: str = "random"

    budget_default = {"fraction": 0.05}
    budget_options = ("units", "fraction")

    def validate(self) -> None:
        require(self.density is None and self.lora_rank is None,
                f"{self.name}: the budget is units / fraction (density and lora_rank must be None)")
        require(self.path in PATHS, f"{self.name}: path must be one of {PATHS}, got {self.path!r}")
        require(self.axis in AXES, f"{self.name}: axis must be one of {AXES}, got {self.axis!r}")
        require(isinstance(self.group, int) and self.group >= 1, f"{self.name}: group must be a positive int")
        b = self.budget()
        require(b.get("units", 1) >= 1, f"{self.name}: units must be >= 1")
        require(0.0 < b.get("fraction", 1.0) <= 1.0, f"{self.name}: fraction must be in (0, 1]")
        require(self.selection in S2_SELECTIONS, f"{self.name}: selection must be one of {S2_SELECTIONS}")

    @property
    def needs_calib(self) -> bool:  # type: ignore[override]
        return self.selection == "grad"

    def channels(self, w) -> int:
        return w.shape[0] if self.axis == "in" else w.shape[1]

    def count_units(self, w) -> int:
        groups = self.channels(w) // self.group
        b = self.budget()
        if "units" in b:
            return b["units"]
        return max(1, min(groups, math.ceil(b["fraction"] * groups - 1e-9)))

    def check(self, path, w):
        require_float_matrix(path, w)
        c = self.channels(w)
        if c % self.group:
            raise leaf_error(path, w.shape, w.dtype, f"s2ft axis={self.axis!r} has {c} channels, not a multiple "
                                                     f"of group={self.group}")
        if self.count_units(w) > c // self.group:
            raise leaf_error(path, w.shape, w.dtype, f"s2ft units={self.units} exceeds the {c // self.group} groups "
                                                     f"of axis={self.axis!r}")

    def create(self, key, w, calib=None):
        groups, u, g = self.channels(w) // self.group, self.count_units(w), self.group
        if self.selection == "random":
            chosen = jax.random.permutation(key, groups)[:u]
        else:
            src = linalg.upcast(w if self.selection == "weight" else calib)
            per_channel = jnp.sum(src * src, axis=1 if self.axis == "in" else 0)
            chosen = lax.top_k(per_channel.reshape(groups, g).sum(axis=1), u)[1]
        sel = (jnp.sort(chosen)[:, None] * g + jnp.arange(g)).reshape(-1).astype(jnp.int32)
        n, m = w.shape
        shape = (sel.shape[0], m) if self.axis == "in" else (n, sel.shape[0])
        return self.node(w, train={"s2": jnp.zeros(shape, w.dtype)}, frozen={"sel": sel})

    def delta_kernel(self, node):
        sel, s2 = node.frozen["sel"], node.train["s2"]
        zeros = jnp.zeros(node.base.shape, s2.dtype)
        return zeros.at[sel, :].set(s2) if self.axis == "in" else zeros.at[:, sel].set(s2)

    def materialise(self, node, rng=None):
        sel, s2, base = node.frozen["sel"], node.train["s2"], node.base
        if PROBE in node.frozen:
            base = base + node.frozen[PROBE]
        out = (base.at[sel, :].add(s2.astype(base.dtype)) if self.axis == "in"
               else base.at[:, sel].add(s2.astype(base.dtype)))
        return out.astype(node.base.dtype)

    def matmul(self, node, x, rng=None):
        if self.path == "dense":
            return None
        sel, s2 = node.frozen["sel"], node.train["s2"].astype(x.dtype)
        y = x @ node.base
        if self.axis == "in":
            y = y + x[..., sel] @ s2
        else:
            y = y.at[..., sel].add(x @ s2)
        if PROBE in node.frozen:
            y = y + x @ node.frozen[PROBE]
        return y

    def sparse_delta(self, node):
        n, m = node.base.shape
        sel, s2 = node.frozen["sel"], node.train["s2"]
        if self.axis == "in":   # paper columns sel, every row: idx = row·n + sel
            flat = (jnp.arange(m)[:, None] * n + sel[None, :]).reshape(-1)
            vals = s2.T.reshape(-1)
        else:                   # paper rows sel, every column
            flat = (sel[:, None] * n + jnp.arange(n)[None, :]).reshape(-1)
            vals = s2.T.reshape(-1)
        order = jnp.argsort(flat)
        return SparseDelta(flat[order].astype(jnp.int32), vals[order], (m, n))


def copermute(k_first: jax.Array, k_second: jax.Array, perm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """S2FT's co-permutation of a pair of kernels that share a hidden axis (`x@K1` then
    `h@K2`, e.g. MLP `up`/`down` or attention `v`/`o`): permute `K1`'s output columns and `K2`'s
    input rows by `perm`. Elementwise functions between them commute with it, so the pair's
    function is unchanged."""
    return k_first[:, perm], k_second[perm, :]


def contiguous_permutation(sel: jax.Array, size: int) -> jax.Array:
    """The permutation of `range(size)` that puts the channels `sel` first (in order)."""
    chosen = jnp.zeros((size,), bool).at[sel].set(True)
    return jnp.argsort(~chosen, stable=True)
