"""GaLore — Gradient Low-Rank projection (Zhao et al., ICML 2024).

Each matrix gradient is projected on the leading singular vectors of a recent gradient (refreshed
every `update_proj_gap` steps, at t = 0, T, 2T, …); the inner optimizer (Adam) keeps its moments
in that `r`-dimensional space; its direction is projected back and scaled by `scale`.

Compared with `optax.contrib.galore` this adds: the projection side (`proj_type` std / reverse_std /
left / right / full — optax always uses reverse_std), the randomised SVD, the moment policy at a
refresh (`keep` — the reference —, `reset`, `rotate`), error feedback, and the reference's Adam ε and
weight-decay order, so that `galore` matches `galore_torch.GaLoreAdamW` step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from jpeft.optim.adam_hf import scale_by_adam_hf
from jpeft.optim.projected import IncludeArg, Projected, ViewsArg
from jpeft.optim.projector import SVDProjector, resolve_side
from jpeft.optim.weight_decay import decay_after_update


def svd_projector_factory(rank: int, proj_type: str, svd: str = "exact", svd_niter: int = 2,
                          svd_oversample: int = 8, svd_sign: str = "canonical") -> Callable[[int, int], SVDProjector]:
    resolve_side(proj_type, 2, 1)  # validates proj_type early
    SVDProjector(rank=rank, method=svd, sign=svd_sign)  # validates the options early
    return lambda m, n: SVDProjector(rank=rank, side=resolve_side(proj_type, m, n), method=svd,
                                     niter=svd_niter, oversample=svd_oversample, sign=svd_sign)


def galore_config(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", *,
                  inner: optax.GradientTransformation | None = None, b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-6, svd: str = "exact", svd_niter: int = 2, svd_oversample: int = 8,
                  svd_sign: str = "canonical", moment_policy: str = "keep", error_feedback: bool = False,
                  views: ViewsArg = None, include: IncludeArg = None, max_dim: int | None = None, seed: int = 0,
                  preconditioner=None) -> Projected:
    """The `Projected` configuration of GaLore (shared by `natural_galore` and `owlore`)."""
    return Projected(
        make_projector=svd_projector_factory(rank, proj_type, svd, svd_niter, svd_oversample, svd_sign),
        inner=inner if inner is not None else scale_by_adam_hf(b1, b2, eps),
        update_proj_gap=update_proj_gap, scale=scale, moment_policy=moment_policy, views=views,
        include=include, max_dim=max_dim, preconditioner=preconditioner, error_feedback=error_feedback,
        seed=seed)


def scale_by_galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", *,
                    inner: optax.GradientTransformation | None = None, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-6, svd: str = "exact", svd_niter: int = 2, svd_oversample: int = 8,
                    svd_sign: str = "canonical", moment_policy: str = "keep", error_feedback: bool = False,
                    views: ViewsArg = None, include: IncludeArg = None, max_dim: int | None = None,
                    seed: int = 0) -> optax.GradientTransformation:
    """GaLore's direction (before the learning rate).

    Args:
      rank: projection rank `r` (clipped to `min(m, n)`).
      update_proj_gap: steps between projector refreshes `T`.
      scale: `ζ`, applied to the back-projected direction of projected leaves only.
      proj_type: "std" | "reverse_std" | "left" | "right" | "full" (see `projector.resolve_side`).
      inner: optax transformation on the low-rank gradients; default the reference Adam
        (`scale_by_adam_hf(b1, b2, eps)`, ε = 1e-6 as in `GaLoreAdamW`). Non-matrix leaves go
        through it at full size.
      svd: "exact" (reference) or "randomized" (`svd_niter` power iterations, `svd_oversample`).
      svd_sign: "canonical" (default: the sign of each singular pair fixed, so the trajectory after a
        refresh with kept moments is the same on every backend) or "lapack" (whatever the solver
        returns, as the torch reference and `optax.contrib.galore`).
      moment_policy: "keep" (reference: moments survive a refresh unchanged), "reset" (fresh inner
        state, counter included), "rotate" (moments mapped into the new basis).
      error_feedback: add the part of the previous gradient outside the subspace to the next one.
      views / include / max_dim: which leaves are matrices and how (see `projected.Projected`);
        N-D leaves are projected only through a declared `MatrixView`.
      seed: seeds the randomised SVD (folded with the leaf index and its step).
    """
    return galore_config(rank, update_proj_gap, scale, proj_type, inner=inner, b1=b1, b2=b2, eps=eps, svd=svd,
                         svd_niter=svd_niter, svd_oversample=svd_oversample, svd_sign=svd_sign,
                         moment_policy=moment_policy, error_feedback=error_feedback, views=views, include=include,
                         max_dim=max_dim, seed=seed).transform()


def galore(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
           scale: float = 0.25, proj_type: str = "std", *, weight_decay: float = 0.0,
           mask: Any | Callable[[Any], Any] | None = None, **kwargs) -> optax.GradientTransformation:
    """GaLore-AdamW: `scale_by_galore` (keyword arguments as there), the learning rate, then
    decoupled weight decay in the reference order (`W ← W − ηU`, then `W ← W − ηλW`)."""
    return optax.chain(
        scale_by_galore(rank, update_proj_gap, scale, proj_type, **kwargs),
        optax.scale_by_learning_rate(learning_rate),
        decay_after_update(learning_rate, weight_decay, mask),
    )
