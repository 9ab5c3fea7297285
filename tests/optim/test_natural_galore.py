"""Natural GaLore oracles (a)–(d), each labelled in its test's docstring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft.optim as jo

M, N, R = 48, 32, 4


def normal(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def test_woodbury_equals_the_direct_solve(x64):
    """(a): k = 50, s = 5, float64."""
    k, s, lam = 50, 5, 1e-3
    window = normal((s, k), 0, jnp.float64)
    g = normal((k,), 1, jnp.float64)
    direct = jnp.linalg.solve(lam * jnp.eye(k) + window.T @ window, g)
    np.testing.assert_allclose(jo.woodbury_natural_gradient(g, window, lam), direct, rtol=1e-5)


def test_single_entry_history_is_sherman_morrison(x64):
    """(b): with s = 1 (the window holds g itself) the natural gradient is g / (λ + ‖g‖²)."""
    g = normal((R, N), 2, jnp.float64)
    pre = jo.WoodburyPreconditioner(history=1, damping=1e-3)
    out, _ = pre.apply(g, pre.init(g.shape, g.dtype), jnp.int32(0))
    np.testing.assert_allclose(out, g / (1e-3 + jnp.sum(g * g)), rtol=1e-10)


def test_history_is_a_window_of_the_last_s_gradients():
    """(c): the window never holds more than s gradients; after more steps it holds the last s."""
    s = 3
    pre = jo.WoodburyPreconditioner(history=s)
    window = pre.init((2, 5), jnp.float32)
    grads = [normal((2, 5), t) for t in range(7)]
    for t, g in enumerate(grads):
        _, window = pre.apply(g, window, jnp.int32(t))
        assert window.shape == (s, 2, 5)
    held = {tuple(np.asarray(x).ravel().round(6)) for x in window}
    assert held == {tuple(np.asarray(g).ravel().round(6)) for g in grads[-s:]}


def test_large_damping_recovers_the_gradient_over_lambda(x64):
    """(d): λ → ∞ gives g/λ."""
    lam = 1e9
    g = normal((R * N,), 3, jnp.float64)
    window = normal((4, R * N), 4, jnp.float64).at[0].set(g)
    np.testing.assert_allclose(jo.woodbury_natural_gradient(g, window, lam) * lam, g, rtol=1e-6)


def test_large_damping_natural_galore_is_galore():
    """Adam is invariant to the 1/λ scale once ε is scaled with it: NG(λ, ε/λ) == GaLore(ε)."""
    lam = 1e8
    params = {"w": normal((M, N), 0), "b": normal((N,), 1)}
    grads = [{k: normal(v.shape, 10 + t) for k, v in params.items()} for t in range(4)]
    ng = jo.scale_by_natural_galore(rank=R, update_proj_gap=2, damping=lam, history=3, eps=1e-6 / lam)
    ga = jo.scale_by_galore(rank=R, update_proj_gap=2, eps=1e-6)
    s_ng, s_ga = ng.init(params), ga.init(params)
    up_ng, up_ga = jax.jit(ng.update), jax.jit(ga.update)
    for g in grads:
        u_ng, s_ng = up_ng(g, s_ng)
        u_ga, s_ga = up_ga(g, s_ga)
        np.testing.assert_allclose(u_ng["w"], u_ga["w"], rtol=2e-3, atol=1e-5)
    assert s_ng.leaves["w"].history.shape == (3, M, R)
    assert s_ng.leaves["b"].history is None


def test_preconditioned_direction_is_the_woodbury_solve_of_the_projected_gradient(x64):
    """First step, SGD inner: U = ζ·up(F̂⁻¹ down(G)) with F̂ built from the window [g]. (float64: the
    reference formula g/λ − Γ(…)Γᵀg/λ² cancels to a part in ‖g‖²/λ, which float32 resolves only to
    about eps·‖g‖²/λ relative.)"""
    tx = jo.scale_by_natural_galore(rank=R, scale=1.0, history=4, damping=1e-2, inner=optax.identity())
    g = normal((M, N), 5, jnp.float64)
    u, state = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
    q = state.leaves["w"].basis.right
    low = g @ q.T
    expected = (low / (1e-2 + jnp.sum(low * low))) @ q
    np.testing.assert_allclose(u["w"], expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("clear", [False, True])
def test_history_at_a_refresh(clear):
    tx = jo.scale_by_natural_galore(rank=R, update_proj_gap=2, history=4, clear_on_refresh=clear)
    update = jax.jit(tx.update)
    state = tx.init({"w": jnp.zeros((M, N))})
    for t in range(3):  # refresh at t = 2
        _, state = update({"w": normal((M, N), t)}, state)
    filled = int(jnp.sum(jnp.any(state.leaves["w"].history != 0, axis=(1, 2))))
    assert filled == (1 if clear else 3)


def test_two_sided_projection_like_the_reference_tucker():
    tx = jo.scale_by_natural_galore(rank=R, proj_type="full")
    state = tx.init({"w": jnp.zeros((M, N))})
    assert state.leaves["w"].inner.mu.shape == (R, R) and state.leaves["w"].history.shape == (20, R, R)
