"""Natural GaLore (Das, 2024).

GaLore whose low-rank gradient is preconditioned by the inverse of an empirical Fisher built from a
window of the last `s` low-rank gradients (the current one included), applied through the Woodbury
identity with an `s×s` Cholesky solve:

    F̂ = λI + ΓΓᵀ,   Γ = [vec g_t, …, vec g_{t−s+1}] ∈ R^{k×s}
    F̂⁻¹ g = g/λ − Γ (I + ΓᵀΓ/λ)⁻¹ Γᵀ g / λ²

Reference (`selfsupervised-ai/Natural-GaLore: code/natural_galore/`): λ = 1e-3, s = 20 (FIFO), the
history is *not* cleared at a refresh (`clear_on_refresh=False`; its old entries then live in the
previous basis), the HuggingFace Adam (ε = 1e-6) and weight decay after the step. The reference
projects with a rank-r Tucker decomposition on every mode, which for a matrix is the two-sided
`Uᵀ G V` (`proj_type="full"`); the paper describes the one-sided GaLore projection (the default here,
`proj_type="std"`).

The window lives in a circular buffer `(s, *low_shape)`; unfilled slots are zero, and zero columns
of Γ change neither ΓΓᵀ nor the solve, so the first `s` steps need no special case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import optax

from jpeft.optim.galore import galore_config
from jpeft.optim.weight_decay import decay_after_update


def woodbury_natural_gradient(g: jax.Array, window: jax.Array, damping: float) -> jax.Array:
    """`(λI + ΓΓᵀ)⁻¹ g` with `Γ = windowᵀ` (`window`: `(s, k)`, one past gradient per row; `g`: `(k,)`)."""
    lam_inv = 1.0 / damping
    gram = window @ window.T  # ΓᵀΓ, (s, s)
    system = jnp.eye(window.shape[0], dtype=g.dtype) + lam_inv * gram
    coeff = jsl.cho_solve(jsl.cho_factor(system, lower=True), window @ g)
    return lam_inv * g - lam_inv ** 2 * (window.T @ coeff)


@dataclasses.dataclass(frozen=True)
class WoodburyPreconditioner:
    """Natural GaLore's preconditioning stage (`projected.Preconditioner`)."""

    history: int = 20
    damping: float = 1e-3
    clear_on_refresh: bool = False

    def __post_init__(self):
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"history must be a positive int, got {self.history!r}")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping!r}")

    def init(self, low_shape, dtype):
        return jnp.zeros((self.history, *low_shape), dtype)

    def apply(self, g, window, count):
        window = window.at[count % self.history].set(g)  # FIFO: overwrite the oldest slot
        flat = window.reshape(self.history, -1).astype(jnp.promote_types(g.dtype, jnp.float32))
        out = woodbury_natural_gradient(g.reshape(-1).astype(flat.dtype), flat, self.damping)
        return out.reshape(g.shape).astype(g.dtype), window

    def on_refresh(self, window):
        return jnp.zeros_like(window) if self.clear_on_refresh else window


def scale_by_natural_galore(rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                            proj_type: str = "std", *, history: int = 20, damping: float = 1e-3,
                            clear_on_refresh: bool = False, inner: optax.GradientTransformation | None = None,
                            b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                            **galore_kwargs) -> optax.GradientTransformation:
    """Natural GaLore's direction (before the learning rate). `history` = s, `damping` = λ; other
    keyword arguments as `scale_by_galore` (svd, moment_policy, views, include, …)."""
    pre = WoodburyPreconditioner(history=history, damping=damping, clear_on_refresh=clear_on_refresh)
    return galore_config(rank, update_proj_gap, scale, proj_type, inner=inner, b1=b1, b2=b2, eps=eps,
                         preconditioner=pre, **galore_kwargs).transform()


def natural_galore(learning_rate: optax.ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
                   scale: float = 0.25, proj_type: str = "std", *, weight_decay: float = 0.0,
                   mask: Any | Callable[[Any], Any] | None = None, **kwargs) -> optax.GradientTransformation:
    """Natural GaLore with the reference AdamW: `scale_by_natural_galore`, the learning rate, then weight
    decay after the step."""
    return optax.chain(
        scale_by_natural_galore(rank, update_proj_gap, scale, proj_type, **kwargs),
        optax.scale_by_learning_rate(learning_rate),
        decay_after_update(learning_rate, weight_decay, mask),
    )
