"""Family A, block-grid variant: GraLoRA, Granular LoRA (HF PEFT
`tuners/gralora`).

The kernel is cut into a `k×k` grid of blocks (input block i, output block j), each with its own
LoRA of rank `r/k`: `ΔK_{ij} = s·a_{ij}·b_{ij}`. Parameters are stored as PEFT stores them, which
is already kernel layout:

- `a ∈ R^{k × in/k × r}`: input block i's projection `a[i]`; its r columns are split into k groups
  of `r/k`, group j feeding output block j (`a_{ij} = a[i][:, j·r/k:(j+1)·r/k]`);
- `b ∈ R^{k × r × out/k}`: output block j's up-projection `b[j]`; its r rows are split into k
  groups of `r/k`, group i coming from input block i (`b_{ij} = b[j][i·r/k:(i+1)·r/k]`).

So the trainable count equals LoRA(r) (`r·(in + out)`) while `rank(ΔK)` reaches `min(k·r, in,
out)`. Optional hybrid: a plain LoRA of rank `r_h` beside it; the scale is `α/(r + r_h)`.
Init (PEFT): `a` Kaiming-uniform (bound `1/√(in/k)`; hybrid `1/√in`), `b = 0`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.registry import register


@register
@dataclasses.dataclass(frozen=True)
class GraLoRA(Ranked):
    """GraLoRA. `rank` = r (each block gets r/k), `k` = grid size (`gralora_k`), `hybrid_rank` = r_h."""

    name = "gralora"
    paper = "GraLoRA: Granular Low-Rank Adaptation, 2025"

    rank: int = 32
    alpha: float = 64.0
    k: int = 2
    hybrid_rank: int = 0

    def validate(self) -> None:
        n = self.name
        super().validate()
        require(isinstance(self.k, int) and self.k >= 1, f"{n}: k must be a positive int, got {self.k!r}")
        require(self.rank % self.k == 0, f"{n}: rank = {self.rank} must be divisible by k = {self.k}")
        require(isinstance(self.hybrid_rank, int) and self.hybrid_rank >= 0,
                f"{n}: hybrid_rank must be an int >= 0, got {self.hybrid_rank!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank + self.hybrid_rank)

    def check(self, path, w):
        super().check(path, w)
        n, m = w.shape
        if n % self.k or m % self.k:
            raise leaf_error(path, w.shape, w.dtype, f"k = {self.k} must divide both in = {n} and out = {m}")
        if self.hybrid_rank > min(n, m):
            raise leaf_error(path, w.shape, w.dtype,
                             f"hybrid_rank {self.hybrid_rank} must be <= min(in, out) = {min(n, m)}")

    def create(self, key, w, calib=None):
        n, m = w.shape
        k, r = self.k, self.rank
        ka, kh = jax.random.split(key)
        train = {"a": kaiming_uniform(ka, (k, n // k, r), n // k, jnp.float32).astype(w.dtype),
                 "b": jnp.zeros((k, r, m // k), w.dtype)}
        if self.hybrid_rank:
            train["ha"] = kaiming_uniform(kh, (n, self.hybrid_rank), n, jnp.float32).astype(w.dtype)
            train["hb"] = jnp.zeros((self.hybrid_rank, m), w.dtype)
        return self.node(w, train=train)

    def _blocks(self, a, b):
        """`a4[i, p, j, s]`, `b4[j, i, s, q]`: block (i, j)'s factors `a4[i, :, j]`, `b4[j, i]`."""
        k = self.k
        a4 = a.reshape(k, a.shape[1], k, self.rank // k)
        b4 = b.reshape(k, k, self.rank // k, b.shape[2])
        return a4, b4

    def delta(self, node, rng=None):
        a, b = linalg.upcast(node.train["a"]), linalg.upcast(node.train["b"])
        a4, b4 = self._blocks(a, b)
        d = jnp.einsum("ipjs,jisq->ipjq", a4, b4).reshape(node.base.shape)
        if self.hybrid_rank:
            d = d + linalg.upcast(node.train["ha"]) @ linalg.upcast(node.train["hb"])
        return self.scale * d

    def matmul(self, node, x, rng=None):
        """`x@K + s·Σ_i (x_i@a_{ij})@b_{ij}` per output block j, O(tokens·r·(in+out))."""
        k = self.k
        a4, b4 = self._blocks(node.train["a"], node.train["b"])
        xb = x.reshape(*x.shape[:-1], k, x.shape[-1] // k)
        h = jnp.einsum("...ip,ipjs->...jis", xb, a4)
        y = jnp.einsum("...jis,jisq->...jq", h, b4).reshape(*x.shape[:-1], -1)
        if self.hybrid_rank:
            y = y + (x @ node.train["ha"]) @ node.train["hb"]
        return x @ node.base + self.scale * y
