"""Gradient projectors shared by the optimizer-side low-rank methods (family I, `jpeft.optim`).

A projector maps one matrix-shaped gradient `G ∈ R^{m×n}` to a small representation and back:

    fit(G, key)        -> pstate            the subspace, recomputed every `update_proj_gap` steps
    down(G, pstate)    -> g                 (m×r), (r×n) or (r×r)
    up(u, pstate, (m, n)) -> U              (m×n)
    rotation(old, new) -> (R_left, R_right) r×r maps with `down(up(x, old), new) == R_left @ x @ R_right`
                                            (either may be None), used to carry moments across a refresh

`fit_down` returns `(fit(G), down(G, fit(G)))` and may share work (the DCT projector keeps the
transformed gradient it scored). Projectors are frozen dataclasses: static under `jit`, their state is
a NamedTuple of arrays with shapes fixed by `(m, n)`, so a refresh is a `lax.cond` and never a
recompilation.

- `SVDProjector`: GaLore's projector (`galore_torch/galore_projector.py`): leading singular vectors of
  `G` by an exact SVD or a randomised SVD (power iterations, oversampling), on the left, the right or
  both sides.
- `DCTProjector`: DCT-AdamW's projector: a fixed orthonormal DCT-II basis per size and `r` of its
  vectors chosen by their alignment with `G`; the state is `int32[r]` indices. Both the matmul path
  and the FFT path (`jax.scipy.fft.dct`) use the same basis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import linalg

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SIDES = ("left", "right", "both")


def resolve_side(proj_type: str, m: int, n: int) -> str:
    """Which side of `G ∈ R^{m×n}` a `proj_type` projects (GaLore's rules).

    std: the smaller dimension is reduced (`m ≥ n` → right, `g = G Qᵀ ∈ R^{m×r}`; else left,
    `g = Pᵀ G ∈ R^{r×n}`); reverse_std: the opposite (this is `optax.contrib.galore`'s rule);
    left / right: always that side; full: both sides (`g = Pᵀ G Q ∈ R^{r×r}`).
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "full":
        return "both"
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


# --------------------------------------------------------------------------------- matrix views
def _axes(a) -> tuple[int, ...]:
    return (int(a),) if isinstance(a, int) else tuple(int(x) for x in a)


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How an N-D leaf is seen as a matrix: `rows` axes × `cols` axes (all axes, disjoint).

    `MatrixView(rows=0, cols=(1, 2))` views an attention kernel `(embed, heads, head_dim)` as
    `(embed, heads·head_dim)`. The default `MatrixView()` is the identity view of a 2-D leaf.
    """

    rows: Sequence[int] | int = (0,)
    cols: Sequence[int] | int = (1,)

    def _norm(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows = tuple(a % ndim for a in _axes(self.rows))
        cols = tuple(a % ndim for a in _axes(self.cols))
        if sorted(rows + cols) != list(range(ndim)):
            raise ValueError(f"MatrixView(rows={self.rows}, cols={self.cols}) must split all {ndim} axes "
                             "into two disjoint groups")
        return rows, cols

    def fits(self, shape) -> bool:
        try:
            self._norm(len(shape))
        except ValueError:
            return False
        return len(shape) >= 2

    def matrix_shape(self, shape) -> tuple[int, int]:
        rows, cols = self._norm(len(shape))
        return math.prod(shape[a] for a in rows), math.prod(shape[a] for a in cols)

    def to_matrix(self, x: jax.Array) -> jax.Array:
        rows, cols = self._norm(x.ndim)
        return jnp.transpose(x, rows + cols).reshape(self.matrix_shape(x.shape))

    def from_matrix(self, y: jax.Array, shape) -> jax.Array:
        rows, cols = self._norm(len(shape))
        perm = rows + cols
        y = y.reshape(tuple(shape[a] for a in perm))
        return jnp.transpose(y, tuple(perm.index(i) for i in range(len(shape))))


# --------------------------------------------------------------------------------- rotations
Rotation = tuple[Any, Any]  # (R_left | None, R_right | None)


def apply_rotation(x: jax.Array, rot: Rotation) -> jax.Array:
    """`R_left @ x @ R_right` (a missing side is the identity)."""
    left, right = rot
    if left is not None:
        x = left.astype(x.dtype) @ x
    if right is not None:
        x = x @ right.astype(x.dtype)
    return x


class Projector:
    """Protocol (see the module docstring). Subclasses are frozen dataclasses with `rank` and `side`."""

    rank: int
    side: str

    def effective_rank(self, m: int, n: int) -> int:
        raise NotImplementedError

    def low_shape(self, m: int, n: int) -> tuple[int, int]:
        r = self.effective_rank(m, n)
        return {"left": (r, n), "right": (m, r), "both": (r, r)}[self.side]

    def init(self, m: int, n: int, dtype) -> Any:
        raise NotImplementedError

    def fit(self, g: jax.Array, key: jax.Array) -> Any:
        raise NotImplementedError

    def fit_down(self, g: jax.Array, key: jax.Array) -> tuple[Any, jax.Array]:
        p = self.fit(g, key)
        return p, self.down(g, p)

    def down(self, g: jax.Array, p: Any) -> jax.Array:
        raise NotImplementedError

    def up(self, u: jax.Array, p: Any, shape: tuple[int, int]) -> jax.Array:
        raise NotImplementedError

    def rotation(self, old: Any, new: Any) -> Rotation:
        raise NotImplementedError


# --------------------------------------------------------------------------------- SVD (GaLore)
class SVDBasis(NamedTuple):
    """`left ∈ R^{m×r}` (orthonormal columns) and/or `right ∈ R^{r×n}` (orthonormal rows)."""

    left: Any
    right: Any


SVD_METHODS = ("exact", "randomized")
SVD_SIGNS = ("canonical", "lapack")


def canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flip singular-vector pairs so that the largest-magnitude entry of each column of `u` is positive.

    An SVD fixes each pair `(u_i, v_i)` only up to a common sign, and LAPACK builds (and GPU/TPU
    solvers) choose differently. With moments kept across a refresh (GaLore's reference policy) the
    choice changes the trajectory; a canonical sign makes it the same on every backend.
    """
    rows = jnp.argmax(jnp.abs(u), axis=0)
    s = jnp.sign(u[rows, jnp.arange(u.shape[1])])
    s = jnp.where(s == 0, 1, s).astype(u.dtype)
    return u * s, vh * s[:, None]


@dataclasses.dataclass(frozen=True)
class SVDProjector(Projector):
    """GaLore's projector: `left = U_r`, `right = V_rᵀ` of the gradient.

    `method="exact"` is a thin SVD in float32 (the reference); `"randomized"` is Halko et al.'s
    subspace iteration with `niter` power iterations and `oversample` extra probes
    (`jpeft.linalg.randomized_svd`), far cheaper when `r ≪ min(m, n)`.
    `sign="canonical"` fixes the arbitrary sign of each singular pair (`canonical_signs`) so results
    do not depend on the LAPACK build; `"lapack"` keeps what the solver returns (as the references).
    """

    rank: int
    side: str = "right"
    method: str = "exact"
    niter: int = 2
    oversample: int = 8
    sign: str = "canonical"

    def __post_init__(self):
        if self.sign not in SVD_SIGNS:
            raise ValueError(f"sign must be one of {SVD_SIGNS}, got {self.sign!r}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.method not in SVD_METHODS:
            raise ValueError(f"svd method must be one of {SVD_METHODS}, got {self.method!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")

    def effective_rank(self, m, n):
        return min(self.rank, m, n)

    def init(self, m, n, dtype):
        r = self.effective_rank(m, n)
        left = jnp.zeros((m, r), dtype) if self.side in ("left", "both") else None
        right = jnp.zeros((r, n), dtype) if self.side in ("right", "both") else None
        return SVDBasis(left, right)

    def fit(self, g, key):
        m, n = g.shape
        r = self.effective_rank(m, n)
        if self.method == "exact":
            u, _, vh = linalg.svd(g)
            u, vh = u[:, :r], vh[:r]
        else:
            u, _, vh = linalg.randomized_svd(key, g, r, niter=self.niter, oversample=self.oversample)
        if self.sign == "canonical":
            u, vh = canonical_signs(u, vh)
        left = u.astype(g.dtype) if self.side in ("left", "both") else None
        right = vh.astype(g.dtype) if self.side in ("right", "both") else None
        return SVDBasis(left, right)

    def down(self, g, p):
        if p.left is not None:
            g = p.left.T @ g
        if p.right is not None:
            g = g @ p.right.T
        return g

    def up(self, u, p, shape):
        del shape
        if p.left is not None:
            u = p.left @ u
        if p.right is not None:
            u = u @ p.right
        return u

    def rotation(self, old, new):
        left = new.left.T @ old.left if old.left is not None else None
        right = old.right @ new.right.T if old.right is not None else None
        return left, right


# --------------------------------------------------------------------------------- DCT (DCT-AdamW)
MAX_DCT_SIZE = 46340  # k·(2j+1) < 2·d² must fit in uint32


def dct_rows(d: int, idx: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows `idx` of the orthonormal DCT-II matrix `C_d`: `C[k, j] = c_k cos(π k (2j+1) / 2d)`.

    Built on the fly (no `d×d` constant in the program); the angle is reduced modulo `2π` in
    integer arithmetic so it stays exact in float32 for every `d ≤ 46340`.
    """
    if d > MAX_DCT_SIZE:
        raise ValueError(f"DCT basis size {d} exceeds {MAX_DCT_SIZE}")
    k = idx.astype(jnp.uint32)[:, None]
    j = jnp.arange(d, dtype=jnp.uint32)[None, :]
    phase = (k * (2 * j + 1)) % jnp.uint32(4 * d)
    angle = phase.astype(jnp.float32) * (math.pi / (2 * d))
    c = jnp.where(k == 0, math.sqrt(1.0 / d), math.sqrt(2.0 / d)).astype(jnp.float32)
    return (c * jnp.cos(angle)).astype(dtype)


def dct_matrix(d: int, dtype=jnp.float32) -> jax.Array:
    """The orthonormal DCT-II matrix `C_d` (`C Cᵀ = I`; `C x` = `jax.scipy.fft.dct(x, norm="ortho")`)."""
    return dct_rows(d, jnp.arange(d), dtype)


class DCTBasis(NamedTuple):
    """Indices of the `r` selected DCT-II basis vectors (the only projector state)."""

    indices: jax.Array  # int32[r]


DCT_MODES = ("matmul", "fft")


@dataclasses.dataclass(frozen=True)
class DCTProjector(Projector):
    """DCT-AdamW's projector (Modoranu et al. 2025; `fft_low_rank/fft_projector.py`).

    The basis is `Q = C_dᵀ` (columns are DCT-II vectors). Right side (`d = n`): `S = G Q`, score
    column `j` by `‖S[:, j]‖_p`, keep the top `r`: `g = S[:, I]`, back `U = u Q[:, I]ᵀ`. Left side
    (`d = m`): `S = Qᵀ G`, score rows, `g = S[I, :]`, back `U = Q[:, I] u`.
    `mode="matmul"` multiplies by the selected basis vectors; `mode="fft"` uses
    `jax.scipy.fft.dct` / `idct` (`O(d log d)` per vector). Both give the same numbers.

    Note: the reference's "matmul" mode uses `C_d` itself as `Q` (DCT-III vectors) and its "makhoul"
    (FFT) mode `C_dᵀ`; here both paths use `C_dᵀ` so that they agree.
    """

    rank: int
    side: str = "right"
    mode: str = "matmul"
    norm: float = 1

    def __post_init__(self):
        if self.side not in ("left", "right"):
            raise ValueError(f"the DCT projector projects one side ('left' or 'right'), got {self.side!r}")
        if self.mode not in DCT_MODES:
            raise ValueError(f"mode must be one of {DCT_MODES}, got {self.mode!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")

    def _axis(self) -> int:
        return 1 if self.side == "right" else 0

    def effective_rank(self, m, n):
        return min(self.rank, n if self.side == "right" else m)

    def init(self, m, n, dtype):
        del dtype
        return DCTBasis(jnp.zeros((self.effective_rank(m, n),), jnp.int32))

    def transform(self, g: jax.Array) -> jax.Array:
        """`S = G Q` (right) or `Qᵀ G` (left) for the full basis, i.e. a DCT-II along the side's axis."""
        axis = self._axis()
        if self.mode == "fft":
            return jax.scipy.fft.dct(linalg.upcast(g), type=2, norm="ortho", axis=axis).astype(g.dtype)
        c = dct_matrix(g.shape[axis], g.dtype)
        return g @ c.T if self.side == "right" else c @ g

    def fit_down(self, g, key):
        del key
        m, n = g.shape
        r = self.effective_rank(m, n)
        s = self.transform(g)
        # ‖·‖_p ranks like Σ|·|^p: skip the root.
        mag = jnp.abs(s.astype(jnp.float32))
        score = jnp.sum(mag if self.norm == 1 else mag ** self.norm, axis=1 - self._axis())
        _, idx = lax.top_k(score, r)
        idx = idx.astype(jnp.int32)
        low = jnp.take(s, idx, axis=self._axis())
        return DCTBasis(idx), low.astype(g.dtype)

    def fit(self, g, key):
        return self.fit_down(g, key)[0]

    def down(self, g, p):
        if self.mode == "fft":
            return jnp.take(self.transform(g), p.indices, axis=self._axis())
        rows = dct_rows(g.shape[self._axis()], p.indices, g.dtype)  # (r, d)
        return g @ rows.T if self.side == "right" else rows @ g

    def up(self, u, p, shape):
        m, n = shape
        if self.mode == "fft":
            axis = self._axis()
            full = jnp.zeros((m, n), jnp.promote_types(u.dtype, jnp.float32))
            full = full.at[:, p.indices].set(u) if self.side == "right" else full.at[p.indices, :].set(u)
            return jax.scipy.fft.idct(full, type=2, norm="ortho", axis=axis).astype(u.dtype)
        if self.side == "right":
            return u @ dct_rows(n, p.indices, u.dtype)
        return dct_rows(m, p.indices, u.dtype).T @ u

    def rotation(self, old, new):
        # Columns of an orthonormal basis: Q[:, I]ᵀ Q[:, J] is the indicator of equal indices.
        if self.side == "right":
            return None, (old.indices[:, None] == new.indices[None, :]).astype(jnp.float32)
        return (new.indices[:, None] == old.indices[None, :]).astype(jnp.float32), None
