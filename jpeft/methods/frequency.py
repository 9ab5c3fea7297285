"""Family F: frequency-domain adapters, LoCA (Du et al., ICLR 2025).

`W' = W + α·C_mᵀ S C_n` with `S ∈ R^{m×n}` zero except `S[ρ_k, κ_k] += a_k` (k = 1..K; DCT-II,
orthonormal). Trainable: the coefficients `a ∈ R^K` (init 0, so `W' = W` exactly) and the
locations `ℓ ∈ [0,1)^{2×K}` (init U[0,1]; row 0 → output frequency `ρ = round(clip(ℓ₀, 0, .999)·(m−1))`,
row 1 → input frequency `κ = round(clip(ℓ₁, 0, .999)·(n−1))`). In kernel layout `ΔK = ΔWᵀ =
α·C_nᵀ Sᵀ C_m`, the 2-D inverse DCT of the transposed spectrum.

The rounding has no derivative: a `jax.custom_vjp` gives the locations the reference's
finite-difference pseudo-gradient. With `Kmat = C_m G C_nᵀ` the 2-D DCT of `G = ∂L/∂(ΔW/α)`:
`∂L/∂a_k = Kmat[ρ_k, κ_k]`, `∂L/∂ρ_k = clip(½·a_k·(Kmat[ρ_k+1, κ_k] − Kmat[ρ_k−1, κ_k]), −1, 1)`
(indices clamped at the borders), `κ` alike; the chain rule through `clip(ℓ)·(m−1)` then gives
`∂L/∂ℓ` (as the reference's autograd does). `α` multiplies outside the custom VJP, as in the
reference, so `G` includes it.

Factored path (`matmul`): `u = C_n x` (DCT over features), `v = scatter_add(0_m, ρ, a ⊙ u[κ])`,
`Δy = α·C_mᵀ v`: O(n log n + m log m + K) per token, never a dense `ΔW`. Its VJP computes the
needed entries of `Kmat` as `Σ_tokens (C_m δy)[ρ] · u[κ]` (O(tokens·K)).

Alternating schedule (the paper's Section 4.4, reference `layer.py`): update 0 trains the coefficients; for
`0 < t < loc_until`, `t mod (coeff_steps + loc_steps) < coeff_steps` trains the coefficients,
otherwise the locations; from `loc_until` on the coefficients only. `state["phase"]` (0 = coeffs,
1 = locations) gates the gradients (the inactive group gets an exact zero gradient) and the step
hook (`jpeft.after_step`) restores the inactive group's values from a snapshot (so momentum or
weight decay cannot move it) and sets the phase of the next update. Optimizer moments are not
touched: with a zero gradient Adam's first moment of the inactive group decays (β1 per step)
where the reference (torch, `requires_grad=False`) freezes it. Without the hook the locations
never train (coefficients only).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import fft

from jpeft.hooks import HookResult
from jpeft.methods.base import Method, require, require_float_matrix
from jpeft.registry import register

LOC_CLIP = 0.999


def grid_positions(loc: jax.Array, m: int, n: int) -> jax.Array:
    """Continuous positions `(ρ, κ)` on the `m×n` grid (reference `spectrum_to_para`). The clip
    passes gradients on `[0, 0.999]` boundaries included (torch `clamp`; `jnp.clip` halves them
    at a boundary)."""
    c = jnp.where(loc < 0.0, 0.0, jnp.where(loc > LOC_CLIP, LOC_CLIP, loc))
    return jnp.stack([c[0] * (m - 1), c[1] * (n - 1)])


def grid_indices(pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    idx = jnp.round(pos).astype(jnp.int32)  # round half to even, like torch.round
    return idx[0], idx[1]


def _neighbours(i, size):
    return jnp.maximum(i - 1, 0), jnp.minimum(i + 1, size - 1)


def spectrum_to_kernel(a, rho, kappa, n, m):
    """`ΔK/α = C_nᵀ Sᵀ C_m` (n×m) for the spectrum `S[ρ, κ] += a`."""
    s_k = jnp.zeros((n, m), a.dtype).at[kappa, rho].add(a)
    return fft.idctn(s_k, type=2, norm="ortho")


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_delta(a, pos, n, m):
    """`ΔK/α` from coefficients and continuous grid positions (custom VJP: location pseudo-grad)."""
    rho, kappa = grid_indices(pos)
    return spectrum_to_kernel(a, rho, kappa, n, m)


def _dense_fwd(a, pos, n, m):
    return dense_delta(a, pos, n, m), (a, pos)


def _dense_bwd(n, m, res, g_k):
    a, pos = res
    rho, kappa = grid_indices(pos)
    kmat_k = fft.dctn(g_k, type=2, norm="ortho")  # = Kmatᵀ (n×m)
    at = lambda rows, cols: kmat_k[cols, rows]  # noqa: E731  Kmat[rows, cols]
    return _cotangents(a, pos, rho, kappa, m, n, at)


def _cotangents(a, pos, rho, kappa, m, n, at):
    """`(∂a, ∂pos)`: `at(rows, cols)` reads `Kmat` (paper layout) at index vectors."""
    r_lo, r_hi = _neighbours(rho, m)
    k_lo, k_hi = _neighbours(kappa, n)
    g_a = at(rho, kappa)
    g_rho = jnp.clip(0.5 * a * (at(r_hi, kappa) - at(r_lo, kappa)), -1.0, 1.0)
    g_kappa = jnp.clip(0.5 * a * (at(rho, k_hi) - at(rho, k_lo)), -1.0, 1.0)
    return g_a.astype(a.dtype), jnp.stack([g_rho, g_kappa]).astype(pos.dtype)


dense_delta.defvjp(_dense_fwd, _dense_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def factored_delta(x, a, pos, m):
    """`Δy/α = C_mᵀ scatter(ρ, a ⊙ (C_n x)[κ])` per token (custom VJP: location pseudo-grad)."""
    rho, kappa = grid_indices(pos)
    u = fft.dct(x, type=2, norm="ortho", axis=-1)
    v = jnp.zeros((*x.shape[:-1], m), x.dtype).at[..., rho].add(a.astype(x.dtype) * u[..., kappa])
    return fft.idct(v, type=2, norm="ortho", axis=-1)


def _fact_fwd(x, a, pos, m):
    return factored_delta(x, a, pos, m), (x, a, pos)


def _fact_bwd(m, res, dy):
    x, a, pos = res
    n = x.shape[-1]
    rho, kappa = grid_indices(pos)
    u = fft.dct(x, type=2, norm="ortho", axis=-1).reshape(-1, n)
    dv = fft.dct(dy, type=2, norm="ortho", axis=-1).reshape(-1, m)
    at = lambda rows, cols: jnp.sum(dv[:, rows] * u[:, cols], axis=0)  # noqa: E731  Kmat[rows, cols]
    g_a, g_pos = _cotangents(a, pos, rho, kappa, m, n, at)
    du = jnp.zeros_like(u).at[:, kappa].add(a.astype(u.dtype) * dv[:, rho])
    dx = fft.idct(du, type=2, norm="ortho", axis=-1).reshape(x.shape)
    return dx.astype(x.dtype), g_a, g_pos


factored_delta.defvjp(_fact_fwd, _fact_bwd)


@register
@dataclasses.dataclass(frozen=True)
class LoCA(Method):
    """LoCA. Options:

    n_coeffs:    `K`, learnable spectral coefficients per matrix (reference GLUE: 1000).
    alpha:       the scale `α` (reference: 1).
    coeff_steps: `B_a`, coefficient steps per cycle (10).
    loc_steps:   `B_l`, location steps per cycle (20).
    loc_until:   `T_loc`, the update from which locations stay frozen (paper ≈ 0.1·total steps;
                 0 = never train locations).
    """

    name = "loca"
    paper = "LoCA: Location-Aware Cosine Adaptation, Du et al., ICLR 2025"

    n_coeffs: int = 1000
    alpha: float = 1.0
    coeff_steps: int = 10
    loc_steps: int = 20
    loc_until: int = 0

    def validate(self) -> None:
        n = self.name
        require(isinstance(self.n_coeffs, int) and self.n_coeffs >= 1,
                f"{n}: n_coeffs must be a positive int, got {self.n_coeffs!r}")
        require(self.coeff_steps >= 1 and self.loc_steps >= 1, f"{n}: coeff_steps and loc_steps must be >= 1")
        require(self.loc_until >= 0, f"{n}: loc_until must be >= 0, got {self.loc_until}")

    def check(self, path, w):
        require_float_matrix(path, w)

    def create(self, key, w, calib=None):
        a = jnp.zeros((self.n_coeffs,), w.dtype)
        loc = jax.random.uniform(key, (2, self.n_coeffs), jnp.float32).astype(w.dtype)
        return self.node(w, train={"a": a, "loc": loc},
                         state={"phase": jnp.zeros((), jnp.int32), "a_prev": a, "loc_prev": loc})

    # ------------------------------------------------------------------ forward
    def _gated(self, node):
        """`(a, ℓ)` with the gradient of the group the current phase does not train cut."""
        phase = node.state["phase"]
        a, loc = node.train["a"], node.train["loc"]
        a = jnp.where(phase == 0, a, lax.stop_gradient(a))
        loc = jnp.where(phase == 1, loc, lax.stop_gradient(loc))
        return a, loc

    def delta(self, node, rng=None):
        n, m = node.base.shape
        a, loc = self._gated(node)
        dt = jnp.promote_types(node.base.dtype, jnp.float32)
        return self.alpha * dense_delta(a.astype(dt), grid_positions(loc, m, n).astype(dt), n, m)

    def materialise(self, node, rng=None):
        return (node.base + self.delta(node)).astype(node.base.dtype)

    def matmul(self, node, x, rng=None):
        n, m = node.base.shape
        a, loc = self._gated(node)
        return x @ node.base + self.alpha * factored_delta(x, a, grid_positions(loc, m, n).astype(x.dtype), m)

    # ------------------------------------------------------------------ schedule
    def phase(self, step) -> jax.Array:
        """Which group update number `step` trains: 0 = coefficients, 1 = locations."""
        t = jnp.asarray(step)
        window = (t > 0) & (t < self.loc_until)
        in_loc = (t % (self.coeff_steps + self.loc_steps)) >= self.coeff_steps
        return jnp.where(window & in_loc, 1, 0).astype(jnp.int32)

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        """`step` = updates applied so far: restore the group the last update did not train, and
        set the phase of the next update (number `step`)."""
        nxt = self.phase(step)
        out = []
        for node in nodes:
            ran = node.state["phase"]
            a = jnp.where(ran == 0, node.train["a"], node.state["a_prev"])
            loc = jnp.where(ran == 1, node.train["loc"], node.state["loc_prev"])
            out.append(node.replace(train={**node.train, "a": a, "loc": loc},
                                    state={"phase": nxt, "a_prev": a, "loc_prev": loc}))
        return HookResult(out, moments)
