"""LoCA oracles: identity at init, the iDCT-of-a-sparse-spectrum formula, the
factored DCT → sparse → iDCT path, the coefficient gradient, the finite-difference location
gradient (value and sign), the alternating schedule run by the step hook, the parameter count,
and a toy where learning the locations beats training the coefficients alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft

import jpeft
from jpeft.methods.frequency import LoCA, grid_indices, grid_positions
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def dct_matrix(n):
    """Orthonormal DCT-II `C[k, j] = c_k cos(π k (2j+1) / 2n)`."""
    k, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    c = np.where(k == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return c * np.cos(np.pi * k * (2 * j + 1) / (2 * n))


def with_values(method, a=None, loc=None, phase=0, w=None):
    node = node_for(method, kernel() if w is None else w)
    train = {"a": node.train["a"] if a is None else jnp.asarray(a, node.train["a"].dtype),
             "loc": node.train["loc"] if loc is None else jnp.asarray(loc, node.train["loc"].dtype)}
    return node.replace(train=train, state={**node.state, "phase": jnp.asarray(phase, jnp.int32)})


def spectrum(node):
    """`S` (paper layout m×n) and the indices, computed independently of the implementation."""
    loc = np.clip(np.asarray(node.train["loc"]), 0, 0.999)
    rho = np.round(loc[0] * (M_OUT - 1)).astype(int)
    kappa = np.round(loc[1] * (N_IN - 1)).astype(int)
    s = np.zeros((M_OUT, N_IN))
    np.add.at(s, (rho, kappa), np.asarray(node.train["a"]))
    return s, rho, kappa


def test_identity_at_init_and_parameter_count():
    method = LoCA(n_coeffs=20)
    w = kernel()
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert not np.any(node.train["a"]) and node.train["loc"].shape == (2, 20)
    assert float(node.train["loc"].min()) >= 0 and float(node.train["loc"].max()) < 1
    params = jpeft.init(jax.random.PRNGKey(0), {"w": w}, jpeft.Spec({"w": method}))
    assert jpeft.count(params).trainable == 3 * 20  # K coefficients + 2K locations


def test_delta_is_alpha_times_the_inverse_2d_dct_of_the_sparse_spectrum(x64):
    method = LoCA(n_coeffs=30, alpha=1.7)
    node = with_values(method, a=np.random.default_rng(0).standard_normal(30))
    s, _, _ = spectrum(node)
    want = 1.7 * dct_matrix(M_OUT).T @ s @ dct_matrix(N_IN)
    np.testing.assert_allclose(want, 1.7 * scipy.fft.idctn(s, type=2, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(method.materialise(node) - node.base, want.T, atol=1e-12)  # kernel = ΔWᵀ


@pytest.mark.parametrize("phase", [0, 1])
def test_factored_path_equals_dense_with_gradients(x64, phase):
    method = LoCA(n_coeffs=40, alpha=0.8)
    node = with_values(method, a=np.random.default_rng(1).standard_normal(40), phase=phase)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, N_IN))
    dense = lambda t: x @ method.materialise(node.replace(train=t))  # noqa: E731
    fact = lambda t: method.matmul(node.replace(train=t), x)  # noqa: E731
    np.testing.assert_allclose(fact(node.train), dense(node.train), atol=1e-12)
    gd = jax.grad(lambda t: jnp.sum(jnp.sin(dense(t))))(node.train)
    gf = jax.grad(lambda t: jnp.sum(jnp.sin(fact(t))))(node.train)
    for k in ("a", "loc"):
        np.testing.assert_allclose(gf[k], gd[k], atol=1e-10)
    # The phase gates the groups: exactly zero gradient for the group it does not train.
    assert np.any(gd["a"]) == (phase == 0) and np.any(gd["loc"]) == (phase == 1)
    gx_d = jax.grad(lambda x: jnp.sum(jnp.sin(x @ method.materialise(node))))(x)
    gx_f = jax.grad(lambda x: jnp.sum(jnp.sin(method.matmul(node, x))))(x)
    np.testing.assert_allclose(gx_f, gx_d, atol=1e-10)


def test_coefficient_gradient_matches_autodiff_of_the_dense_form(x64):
    method = LoCA(n_coeffs=25, alpha=1.3)
    node = with_values(method, a=np.random.default_rng(2).standard_normal(25))
    _, rho, kappa = spectrum(node)
    g = kernel(seed=9)

    def plain(a):  # differentiable dense form with the indices held fixed
        s = jnp.zeros((N_IN, M_OUT)).at[kappa, rho].add(a)
        return 1.3 * jax.scipy.fft.idctn(s, type=2, norm="ortho")

    want = jax.grad(lambda a: jnp.sum(g * plain(a)))(node.train["a"])
    got = jax.grad(lambda t: jnp.sum(g * method.materialise(node.replace(train=t))))(node.train)["a"]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_location_pseudo_gradient_value_and_sign(x64):
    """Quadratic loss `½‖ΔW − ΔW*‖²` whose optimum has its energy at `(ρ*+1, κ*)` while the single
    coefficient sits at `(ρ*, κ*)`: `∂L/∂ℓ₀ = (m−1)·clip(½·a·(Kmat[ρ+1,κ] − Kmat[ρ−1,κ]))` with
    `Kmat = DCT2(∂L/∂(ΔW/α))`, and it is negative (descent moves ρ up, toward ρ*+1)."""
    alpha, rho_star, kappa_star = 1.5, 20, 9
    loc = [[rho_star / (M_OUT - 1)], [kappa_star / (N_IN - 1)]]
    method = LoCA(n_coeffs=1, alpha=alpha)
    node = with_values(method, a=[0.4], loc=loc, phase=1)
    s_star = np.zeros((M_OUT, N_IN))
    s_star[rho_star + 1, kappa_star] = 0.8
    target = alpha * scipy.fft.idctn(s_star, type=2, norm="ortho")

    def loss(t):
        dw = (method.materialise(node.replace(train=t)) - node.base).T
        return 0.5 * jnp.sum(jnp.square(dw - target))

    g_loc = np.asarray(jax.grad(loss)(node.train)["loc"])
    s, rho, kappa = spectrum(node)
    assert (rho[0], kappa[0]) == (rho_star, kappa_star)
    kmat = scipy.fft.dctn(alpha * (alpha * scipy.fft.idctn(s, type=2, norm="ortho") - target), type=2, norm="ortho")
    want_rho = np.clip(0.5 * 0.4 * (kmat[rho_star + 1, kappa_star] - kmat[rho_star - 1, kappa_star]), -1, 1)
    want_kappa = np.clip(0.5 * 0.4 * (kmat[rho_star, kappa_star + 1] - kmat[rho_star, kappa_star - 1]), -1, 1)
    np.testing.assert_allclose(g_loc[:, 0], [(M_OUT - 1) * want_rho, (N_IN - 1) * want_kappa], atol=1e-12)
    assert g_loc[0, 0] < 0 and abs(g_loc[1, 0]) < 1e-12
    # At the border the missing neighbour is clamped to the location itself.
    edge = with_values(method, a=[0.4], loc=[[0.0], [0.0]], phase=1)
    dw = lambda t: (method.materialise(edge.replace(train=t)) - edge.base).T  # noqa: E731
    g_edge = jax.grad(lambda t: jnp.sum(kernel(seed=3).T * dw(t)))(edge.train)["loc"]
    kmat = scipy.fft.dctn(alpha * np.asarray(kernel(seed=3)).T, type=2, norm="ortho")
    np.testing.assert_allclose(g_edge[0, 0], (M_OUT - 1) * np.clip(0.2 * (kmat[1, 0] - kmat[0, 0]), -1, 1), atol=1e-12)


def test_schedule_phases():
    method = LoCA(n_coeffs=4, coeff_steps=10, loc_steps=20, loc_until=75)
    phases = [int(method.phase(t)) for t in range(100)]
    want = [0] + [0] * 9 + [1] * 20 + [0] * 10 + [1] * 20 + [0] * 10 + [1] * 5 + [0] * 25
    assert phases == want
    assert all(int(LoCA(n_coeffs=4).phase(t)) == 0 for t in range(40))  # loc_until = 0: never


def _train(method, w, target, steps, lr_a=1e-2, lr_loc=1e-3, seed=1):
    """Adam (separate rates for coefficients and locations, as the reference) + `after_step`."""
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(seed), {"w": w}, spec)
    x = jax.random.normal(jax.random.PRNGKey(5), (128, w.shape[0]))

    def labels(t):
        return jax.tree.map(lambda n: n.replace(train={"a": "a", "loc": "loc"}) if isinstance(n, jpeft.Adapter) else n,
                            t, is_leaf=jpeft.is_adapter)

    tx = optax.multi_transform({"a": optax.adam(lr_a), "loc": optax.adam(lr_loc)}, labels)
    trainable, frozen = jpeft.split(params)

    def step(carry, i):
        t, f, opt = carry
        value, g = jax.value_and_grad(
            lambda t: jnp.mean(jnp.square(x @ (jpeft.apply(jpeft.combine(t, f), spec)["w"] - w - target))))(t)
        updates, opt = tx.update(g, opt, t)
        t = optax.apply_updates(t, updates)
        p, opt = jpeft.after_step(jpeft.combine(t, f), opt, spec, step=i, key=jax.random.PRNGKey(0))
        t, f = jpeft.split(p)
        return (t, f, opt), (value, t["w"].train)

    run = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(1, steps + 1)))
    (t, f, _), (losses, history) = run((trainable, frozen, tx.init(trainable)))
    return params, jpeft.combine(t, f), losses, history


def test_hook_alternates_coefficients_and_locations():
    """Every update moves only the group its phase trains (the other is restored, despite Adam's
    momentum), and the locations stay put from `loc_until` on."""
    method = LoCA(n_coeffs=6, coeff_steps=3, loc_steps=4, loc_until=20)
    w = kernel()
    target = 0.3 * kernel(seed=6)
    init, _, _, hist = _train(method, w, target, steps=30, lr_loc=1e-2)
    a = np.concatenate([np.asarray(init["w"].train["a"])[None], np.asarray(hist["a"])])
    loc = np.concatenate([np.asarray(init["w"].train["loc"])[None], np.asarray(hist["loc"])])
    for t in range(30):  # update number t turns a[t] / loc[t] into a[t+1] / loc[t+1]
        trains_loc = int(method.phase(t)) == 1
        assert np.array_equal(a[t + 1], a[t]) == trains_loc, t
        assert np.array_equal(loc[t + 1], loc[t]) == (not trains_loc), t
    assert sum(int(method.phase(t)) for t in range(30)) > 0


def test_learning_locations_beats_fixed_locations():
    """Target energy one frequency step above each coefficient's start (plus a small leak at the
    start, so the coefficients become non-zero): coefficients alone cannot reach it, the
    alternating schedule moves most locations there."""
    w = kernel()
    n, m = w.shape
    probe = jpeft.init(jax.random.PRNGKey(1), {"w": w}, jpeft.Spec({"w": LoCA(n_coeffs=8)}))["w"]
    rho, kappa = grid_indices(grid_positions(probe.train["loc"], m, n))
    up = jnp.minimum(rho + 1, m - 1)
    s = jnp.zeros((n, m)).at[kappa, up].add(1.0).at[kappa, rho].add(0.3)
    target = jax.scipy.fft.idctn(s, type=2, norm="ortho")
    _, _, fixed, _ = _train(LoCA(n_coeffs=8), w, target, steps=300)
    _, moved, learned, _ = _train(LoCA(n_coeffs=8, loc_until=250), w, target, steps=300)
    rho_new, kappa_new = grid_indices(grid_positions(moved["w"].train["loc"], m, n))
    assert int(jnp.sum(rho_new == up)) >= 5 and np.array_equal(kappa_new, kappa)
    assert float(learned[-1]) < 0.5 * float(fixed[-1])
    assert float(fixed[-1]) < float(fixed[0])  # the leak is fitted by the coefficients alone
