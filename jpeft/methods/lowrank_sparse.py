"""Family D: low-rank plus sparse re-parameterisation of the weight.

SLTrain: `W = s·B A + S` with a fixed random sparse support `S = scatter(idx, val)`; in kernel
layout `K' = [K] + s·a@b + scatter(idx, val)ᵀ` with `a ∈ R^{in×r}` (= `Aᵀ`), `b ∈ R^{r×out}`
(= `Bᵀ`), `idx` sorted paper-layout flat indices (Family C skeleton, `jpeft.methods.sparse`).
The factored path adds the low-rank branch in place and the sparse term by the chunked gather
path of `sparse.linear_sparse_delta` (the Pallas `fused_lr_sparse_matmul` on GPU/TPU when
importable): no `(m, n)` array in the forward or backward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.methods.base import Ranked, exclusive_options, kaiming_uniform, require
from jpeft.methods.sparse_ops import (
    INT32_MAX,
    PATHS,
    budget,
    linear_sparse_delta,
    pallas_ops,
    random_indices,
    scatter_kernel,
)
from jpeft.registry import register

MODES = ("finetune", "pretrain")


@register
@dataclasses.dataclass(frozen=True)
class SLTrain(Ranked):
    """SLTrain (Han et al., NeurIPS 2024): `W = s·BA + S`, `s = α/r`, the
    support of `S` (`⌊δ·m·n⌋` entries, or `min((m+n)·lora_rank, m·n)` when `lora_rank` is set) uniformly random
    and fixed for the whole run (no step hook). Trainable: `a`, `b`, `val`; count `r(m+n) + |idx|`.

    mode="pretrain": no frozen base (the node stores none: `base` is None and the effective
    weight is `s·a@b + S`); `a` Kaiming-uniform(√5) = U(±1/√in), `b = 0`, `val ~ U(±1/√in)`
    (reference init; not the identity).
    mode="finetune": `W = W₀ + s·BA + S` over the frozen `W₀`, with `val = 0` so that the adapter
    starts at the identity (the reference only pre-trains; a random `S` would move `W₀`).
    path / chunk as in `jpeft.methods.sparse.SparseMethod`.
    """

    name = "sltrain"
    paper = "SLTrain: Sparse plus Low-Rank Pretraining, Han et al., NeurIPS 2024"

    rank: int = 128
    alpha: float = 32.0
    density: float | None = None
    lora_rank: int | None = None
    mode: str = "finetune"
    path: str = "sparse"
    chunk: int | None = None

    def validate(self) -> None:
        super().validate()
        b = self.budget()
        require(0.0 < b.get("density", 1.0) <= 1.0, f"{self.name}: density must be in (0, 1]")
        require(b.get("lora_rank", 1) >= 1, f"{self.name}: lora_rank must be >= 1")
        require(self.mode in MODES, f"{self.name}: mode must be one of {MODES}, got {self.mode!r}")
        require(self.path in PATHS, f"{self.name}: path must be one of {PATHS}, got {self.path!r}")
        require(self.chunk is None or self.chunk >= 1, f"{self.name}: chunk must be None or >= 1")

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.mode == "finetune"

    @property
    def has_base(self) -> bool:  # type: ignore[override]
        return self.mode == "finetune"   # "pretrain" trains `BA + S` from scratch: no base

    def budget(self) -> dict:
        """The sparse budget in force: `density` or `lora_rank` (at most one set; default
        `density=0.03`)."""
        return exclusive_options(self, ("density", "lora_rank"), {"density": 0.03})

    def k_for(self, w) -> int:
        n, m = w.shape
        b = self.budget()
        return budget(m, n, b.get("density"), b.get("lora_rank"))

    def check(self, path, w):
        super().check(path, w)
        if w.shape[0] * w.shape[1] > INT32_MAX:
            raise leaf_error(path, w.shape, w.dtype, "flat int32 indices need in·out < 2**31")

    def create(self, key, w, calib=None):
        n, m = w.shape
        k_a, k_idx, k_val = jax.random.split(key, 3)
        dt = jnp.promote_types(w.dtype, jnp.float32)
        a = kaiming_uniform(k_a, (n, self.rank), n, dt).astype(w.dtype)
        b = jnp.zeros((self.rank, m), w.dtype)
        k = self.k_for(w)
        idx = random_indices(k_idx, m, n, k)
        if self.mode == "pretrain":
            val = kaiming_uniform(k_val, (k,), n, dt).astype(w.dtype)
            base = None
        else:
            val = jnp.zeros((k,), w.dtype)
            base = w
        return self.node(base, train={"a": a, "b": b, "val": val}, frozen={"idx": idx})

    def rebuild_base(self, w, node):
        return None if self.mode == "pretrain" else w

    def lowrank_kernel(self, node):
        return self.scale * (linalg.upcast(node.train["a"]) @ linalg.upcast(node.train["b"]))

    def materialise(self, node, rng=None):
        t = node.train
        n, m = t["a"].shape[0], t["b"].shape[1]
        dense = self.lowrank_kernel(node)
        dtype = t["val"].dtype
        if node.base is not None:
            dense = dense + linalg.upcast(node.base)
            dtype = node.base.dtype
        return scatter_kernel(node.frozen["idx"], linalg.upcast(t["val"]), n, m, base=dense).astype(dtype)

    def matmul(self, node, x, rng=None):
        if self.path == "dense":
            return None
        t, idx = node.train, node.frozen["idx"]
        kernels = pallas_ops()
        if kernels is not None:
            return kernels.fused_lr_sparse_matmul(x, t["a"], t["b"], idx, t["val"], self.scale, K=node.base)
        y0 = self.scale * ((x @ t["a"].astype(x.dtype)) @ t["b"].astype(x.dtype))
        return linear_sparse_delta(x, node.base, idx, t["val"], m=t["b"].shape[1], y0=y0, chunk=self.chunk)
