"""SVFT (Lingam et al., NeurIPS 2024): an SVD-core method (family B) with a sparse trainable core on a
fixed pattern of the singular frames."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import leaf_error
from jpeft.methods.base import require, require_rank
from jpeft.methods.svdcore import SVDCore, Term, frames
from jpeft.registry import register

SVFT_PATTERNS = ("plain", "banded", "random", "top_k")


def band_size(k: int, d: int) -> int:
    """Number of positions with `|i − j| <= d` in a `k×k` matrix: `k(2d+1) − d(d+1)`."""
    return k * (2 * d + 1) - d * (d + 1)


def banded_positions(k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major `(rows, cols)` of the band `|i − j| <= d`."""
    row_parts, col_parts = [], []
    for off in range(-d, d + 1):
        i = np.arange(max(0, -off), min(k, k - off))
        row_parts.append(i)
        col_parts.append(i + off)
    rows, cols = np.concatenate(row_parts), np.concatenate(col_parts)
    order = np.lexsort((cols, rows))
    return rows[order].astype(np.int32), cols[order].astype(np.int32)


@register
@dataclasses.dataclass(frozen=True)
class SVFT(SVDCore):
    """SVFT: `W' = U(Σ + σ(g)·M)Vᵀ` with a sparse trainable `M` on a fixed
    pattern Ω and a scalar gate `g` (init 0, σ(g) = ½).

    sparsity:  "plain" (diagonal, k values), "banded" (|i−j| <= off_diag), "random" (the same
               count of distinct random positions; the reference samples with replacement),
               "top_k" (the positions with the largest alignment coefficients).
    topk:      "paper": coefficient `u_iᵀ v_j` (for m ≠ n over the leading min(m, n)
               coordinates); "reference": the reference code's coefficient matrix (`U·V` for a
               square weight, else whichever of `U`, `Vᵀ` is square) **[CODE≠PAPER]**.
    rank:      None for the full thin SVD (k = min(in, out), the default); an int truncates.
    residual:  with rank < k, True keeps the discarded tail in the base (identity-preserving);
               False is the reference truncation `U_r(Σ_r + σ(g)M)V_rᵀ` (drops the tail).
    zero_init: `M = 0` (then `W' = W` exactly); otherwise `M ~ N(0, 2/|Ω|)` like the reference
               (Kaiming-normal on a `(1, |Ω|)` view), so `W' ≠ W` by a small amount at init.

    Implemented as `K_base + ΔK`, `ΔK = V (σ(g)M)ᵀ Uᵀ` (so with `residual=True` the base stays the
    exact weight). The full `U`, `V` are stored frozen (the paper's memory caveat).
    """

    name = "svft"
    rank_options = ()  # `rank` may be None (every singular component); `validate` / `check` handle it
    paper = "SVFT: Singular Vectors guided Fine-Tuning, Lingam et al., NeurIPS 2024"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """`M = 0` and the tail kept (or no truncation): `W' = W` exactly."""
        return self.zero_init and (self.residual or self.rank is None)

    rank: int | None = None  # type: ignore[assignment]  # None: every component; not in `rank_options`
    sparsity: str = "plain"
    off_diag: int = 0
    zero_init: bool = False
    residual: bool = True
    topk: str = "paper"

    def validate(self) -> None:
        require(self.rank is None or (isinstance(self.rank, int) and self.rank >= 1),
                f"{self.name}: rank must be None (full) or a positive int, got {self.rank!r}")
        require(self.sparsity in SVFT_PATTERNS,
                f"{self.name}: sparsity must be one of {SVFT_PATTERNS}, got {self.sparsity!r}")
        require(isinstance(self.off_diag, int) and self.off_diag >= 0,
                f"{self.name}: off_diag must be a non-negative int, got {self.off_diag!r}")
        require(self.sparsity != "plain" or self.off_diag == 0,
                f"{self.name}: sparsity='plain' is the diagonal; use sparsity='banded' for off_diag > 0")
        require(self.topk in ("paper", "reference"), f"{self.name}: topk must be 'paper' or 'reference'")

    @property
    def rewrites_base(self) -> bool:
        return not self.residual

    def components(self, w) -> int:
        return min(w.shape) if self.rank is None else self.rank

    def check(self, path, w):
        super().check(path, w)
        if self.rank is not None:
            require_rank(path, w, self.rank)
        k = self.components(w)
        if self.off_diag >= k:
            raise leaf_error(path, w.shape, w.dtype, f"off_diag {self.off_diag} must be < the number of "
                             f"singular components {k}")

    def num_values(self, k: int) -> int:
        """`|Ω|` for `k` components."""
        return band_size(k, self.off_diag)

    def positions(self, key, a, b):
        """`(rows, cols)` of Ω (paper layout: row i ↔ `u_i`, col j ↔ `v_j`)."""
        k = a.shape[1]
        if self.sparsity in ("plain", "banded"):
            rows, cols = banded_positions(k, self.off_diag)
            return jnp.asarray(rows), jnp.asarray(cols)
        nnz = self.num_values(k)
        if self.sparsity == "random":
            flat = jnp.sort(jax.random.choice(key, k * k, (nnz,), replace=False))
        else:
            flat = jax.lax.top_k(self.alignment(a, b).reshape(-1), nnz)[1]
        return (flat // k).astype(jnp.int32), (flat % k).astype(jnp.int32)

    def alignment(self, a, b):
        """Top-k coefficient matrix (k×k, paper layout) from `a = V` (n×k), `b = Uᵀ` (k×m)."""
        n, k = a.shape
        m = b.shape[1]
        if self.topk == "paper":
            p = min(m, n)
            return b[:, :p] @ a[:p]           # (Uᵀ V)_ij = u_iᵀ v_j over the shared coordinates
        if m == n:
            return b.T @ a                    # reference `u @ v.T` = U·V
        return b.T if m == k else a.T         # reference: whichever of U, Vᵀ is square

    def create(self, key, w, calib=None):
        k_pat, k_val = jax.random.split(key)
        v, sig, ut = frames(None, w, self.rank)
        rows, cols = self.positions(k_pat, v, ut)
        nnz = int(rows.shape[0])
        if self.zero_init:
            values = jnp.zeros((nnz,), sig.dtype)
        else:
            values = jax.random.normal(k_val, (nnz,), sig.dtype) * math.sqrt(2.0 / nnz)
        base = w if self.residual else ((v * sig) @ ut).astype(w.dtype)
        dt = w.dtype
        return self.node(base, train={"m": values.astype(dt), "gate": jnp.zeros((), dt)},
                         frozen={"a": v.astype(dt), "b": ut.astype(dt), "rows": rows, "cols": cols})

    def terms(self, node):
        gate = jax.nn.sigmoid(node.train["gate"])
        return [Term(node.frozen["a"], node.train["m"] * gate, node.frozen["b"], "sparse",
                     idx=(node.frozen["rows"], node.frozen["cols"]))]
