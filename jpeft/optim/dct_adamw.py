"""DCT-AdamW — SVD-free low-rank adaptive gradient optimisation (Modoranu et al., 2025).

GaLore's per-layer SVD is replaced by one fixed orthonormal basis per size (DCT-II) and, at each
refresh, the `r` basis vectors best aligned with the gradient (largest ℓ_p norm of `G Q[:, j]`).
The projector state is `int32[r]` per matrix; the basis is a function of the size and is never stored.

Reference (`IST-DASLab/ISTA-DASLab-Optimizers: fft_low_rank/dct_adamw.py`): Adam with
`m/(ε·√(1−β2ᵗ) + √v)` (= `optax.scale_by_adam`), weight decay `W ← (1 − ηλ)W` before the step
(= `optax.add_decayed_weights` before the learning rate), matrices with a side ≥ `max_dim = 32000`
and non-matrix leaves take plain AdamW, refresh every step by default. Differences: refreshes happen
at steps 0, T, 2T, … (the reference: 1, T, 2T, … counted from 1, the same for T = 1), and both the
matmul and the FFT path use `Q = C_dᵀ` (the reference's matmul mode uses `C_d`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from jpeft.optim.projected import IncludeArg, Projected, ViewsArg
from jpeft.optim.projector import DCTProjector, resolve_side


def dct_config(rank: int = 128, update_proj_gap: int = 1, *, proj_type: str = "std", mode: str = "fft",
               ell_norm: float = 1, rotate_subspace: bool = False, error_feedback: bool = False,
               inner: optax.GradientTransformation | None = None, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, scale: float = 1.0, max_dim: int | None = 32000, views: ViewsArg = None,
               include: IncludeArg = None) -> Projected:
    if proj_type == "full":
        raise ValueError("dct_adamw projects one side: proj_type must be std, reverse_std, left or right")
    resolve_side(proj_type, 2, 1)
    DCTProjector(rank=rank, mode=mode)  # validates early

    def make(m, n):
        return DCTProjector(rank=rank, side=resolve_side(proj_type, m, n), mode=mode, norm=ell_norm)

    return Projected(make_projector=make, inner=inner if inner is not None else optax.scale_by_adam(b1, b2, eps),
                     update_proj_gap=update_proj_gap, scale=scale,
                     moment_policy="rotate" if rotate_subspace else "keep", views=views, include=include,
                     max_dim=max_dim, error_feedback=error_feedback)


def scale_by_dct_adamw(rank: int = 128, update_proj_gap: int = 1, *, proj_type: str = "std", mode: str = "fft",
                       ell_norm: float = 1, rotate_subspace: bool = False, error_feedback: bool = False,
                       inner: optax.GradientTransformation | None = None, b1: float = 0.9, b2: float = 0.999,
                       eps: float = 1e-8, scale: float = 1.0, max_dim: int | None = 32000,
                       views: ViewsArg = None, include: IncludeArg = None) -> optax.GradientTransformation:
    """DCT-AdamW's direction (before the learning rate).

    Args:
      rank: number of DCT vectors kept per matrix.
      update_proj_gap: steps between index refreshes (reference default 1: a refresh is one DCT and
        a top-k, no SVD).
      proj_type: side rule as GaLore's (`std`: right if `m ≥ n`, the basis size is the smaller side).
      mode: "fft" (`jax.scipy.fft.dct`, O(d² log d) per refresh) or "matmul" (basis built on the
        fly, O(d³)); same numbers.
      ell_norm: the `p` of the alignment score `‖G Q[:, j]‖_p`.
      rotate_subspace: carry the moments into the new index set at a refresh (for the orthonormal
        DCT basis the rotation keeps the moments of indices selected again and zeroes the others).
      error_feedback: keep `E = (G+E) − up(down(G+E))` (one full-size buffer per matrix).
      inner: optax transformation on the low-rank gradients; default `optax.scale_by_adam(b1, b2, eps)`.
      max_dim: matrices with a side ≥ max_dim (embeddings, LM head) fall through to `inner`.
    """
    return dct_config(rank, update_proj_gap, proj_type=proj_type, mode=mode, ell_norm=ell_norm,
                      rotate_subspace=rotate_subspace, error_feedback=error_feedback, inner=inner, b1=b1, b2=b2,
                      eps=eps, scale=scale, max_dim=max_dim, views=views, include=include).transform()


def dct_adamw(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 1, *,
              weight_decay: float = 0.0, mask: Any | Callable[[Any], Any] | None = None,
              **kwargs) -> optax.GradientTransformation:
    """DCT-AdamW: `scale_by_dct_adamw` (keyword arguments as there), decoupled weight decay on the
    weight before the step (reference order), then the learning rate."""
    return optax.chain(
        scale_by_dct_adamw(rank, update_proj_gap, **kwargs),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
