"""LoRA / rsLoRA / dropout / OLoRA / orthogonal / FFA-LoRA oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def test_lora_init_is_exact_identity_with_kaiming_bound():
    w = kernel()
    node = node_for(jpeft.LoRA(rank=R, alpha=8), w)
    np.testing.assert_array_equal(node.method.materialise(node), w)
    a = node.train["a"]
    bound = 1 / N_IN ** 0.5
    assert a.shape == (N_IN, R) and float(jnp.max(jnp.abs(a))) <= bound and float(jnp.max(jnp.abs(a))) > 0.9 * bound
    assert not np.any(node.train["b"])


def test_gaussian_init_std_is_one_over_r():
    node = node_for(jpeft.LoRA(rank=R, init="gaussian"), kernel(shape=(512, 64)))
    assert float(jnp.std(node.train["a"])) == pytest.approx(1 / R, rel=0.05)


def test_delta_has_rank_at_most_r():
    node = node_for(jpeft.LoRA(rank=R), kernel())
    node = node.replace(train={"a": node.train["a"], "b": jax.random.normal(jax.random.PRNGKey(1), (R, M_OUT))})
    assert np.linalg.matrix_rank(np.asarray(node.method.delta(node)), tol=1e-5) == R


def test_first_step_gradients(x64):
    """∂L/∂A = 0 at init while ∂L/∂B = s·G·Aᵀ (kernel layout: ∂L/∂b = s·aᵀ·G_K)."""
    method = jpeft.LoRA(rank=R, alpha=8)
    node = node_for(method, kernel())
    g_k = kernel(seed=3)  # the gradient of a linear loss L(K') = <G, K'>
    grads = jax.grad(lambda t: jnp.sum(g_k * method.materialise(node.replace(train=t))))(node.train)
    np.testing.assert_array_equal(grads["a"], 0.0)
    np.testing.assert_allclose(grads["b"], method.scale * node.train["a"].T @ g_k, rtol=1e-12)


def test_rslora_scale():
    assert jpeft.LoRA(rank=64, alpha=16, rslora=True).scale == pytest.approx(16 / 8)
    assert jpeft.LoRA(rank=64, alpha=16).scale == pytest.approx(16 / 64)


def _first_step_update_size(rank, rslora, n=4, m=64, eta=1e-2, draws=16):
    """E‖ΔK x‖² after one SGD step from b = 0 with unit-variance a (the rsLoRA oracle).

    ΔK = −η s²·a aᵀ G_K and E[a aᵀ] = r·I; the oracle's premise a aᵀ ≈ r·I needs r ≫ n, hence a
    narrow input (n = 4) and ranks 4, 64, 256 (built directly: `check` would cap r at min(n, m)).
    """
    method = jpeft.LoRA(rank=rank, alpha=4.0, rslora=rslora)
    g_k = jax.random.normal(jax.random.PRNGKey(0), (n, m))
    x = jax.random.normal(jax.random.PRNGKey(1), (256, n))

    def size(key):
        a = jax.random.normal(key, (n, rank))
        node = method.node(jnp.zeros((n, m)), train={"a": a, "b": jnp.zeros((rank, m))})
        grads = jax.grad(lambda t: jnp.sum(g_k * method.materialise(node.replace(train=t))))(node.train)
        stepped = node.replace(train={"a": a, "b": -eta * grads["b"]})
        return jnp.mean(jnp.sum(jnp.square(x @ method.delta(stepped)), axis=1))

    return float(jnp.mean(jax.vmap(size)(jax.random.split(jax.random.PRNGKey(rank), draws))))


def test_rslora_update_size_is_rank_stable_while_lora_collapses():
    rs = [_first_step_update_size(r, True) for r in (4, 64, 256)]
    lo = [_first_step_update_size(r, False) for r in (4, 64, 256)]
    assert 0.3 < rs[2] / rs[0] < 3.0 and 0.3 < rs[1] / rs[0] < 3.0
    assert lo[2] / lo[0] < 1e-3 and lo[1] / lo[0] < 1e-2  # ~ r⁻² decay for r ≫ n


def test_dropout_expectation_equals_delta_and_no_rng_means_no_dropout():
    method = jpeft.LoRA(rank=R, dropout=0.5)
    node = node_for(method, kernel())
    node = node.replace(train={**node.train, "b": jax.random.normal(jax.random.PRNGKey(1), (R, M_OUT))})
    np.testing.assert_array_equal(method.delta(node), method.delta(node, None))
    masked = jax.vmap(lambda k: method.delta(node, k))(jax.random.split(jax.random.PRNGKey(2), 4000))
    assert not np.allclose(masked[0], method.delta(node))
    np.testing.assert_allclose(jnp.mean(masked, 0), method.delta(node),
                               atol=0.05 * float(jnp.max(jnp.abs(method.delta(node)))))
    x = jnp.ones((3, N_IN))
    ys = jax.vmap(lambda k: method.matmul(node, x, k))(jax.random.split(jax.random.PRNGKey(3), 4000))
    np.testing.assert_allclose(jnp.mean(ys, 0), x @ method.materialise(node),
                               atol=0.05 * float(jnp.max(jnp.abs(x @ method.delta(node)))))


def test_olora_factors_are_qr_of_the_weight(x64):
    w = kernel()
    method = jpeft.LoRA(rank=R, alpha=8, init="olora")
    node = node_for(method, w)
    a, b = node.train["a"], node.train["b"]
    np.testing.assert_allclose(b @ b.T, np.eye(R), atol=1e-12)            # B = Q_r has orthonormal columns
    np.testing.assert_allclose(np.tril(a.T, -1), 0.0, atol=1e-12)          # A = R_r is upper-trapezoidal
    np.testing.assert_allclose(node.base + method.scale * a @ b, w, atol=1e-12)
    np.testing.assert_allclose(a @ b, w.T.T @ (b.T @ b), atol=1e-10)       # Q_r R_r = projection of W onto Q_r


def test_orthogonal_init_is_identity_with_nonzero_factors(x64):
    method = jpeft.LoRA(rank=R, init="orthogonal")
    node = node_for(method, kernel())
    assert float(jnp.min(jnp.linalg.norm(node.train["a"], axis=0))) > 0.1
    assert float(jnp.min(jnp.linalg.norm(node.train["b"], axis=1))) > 0.1
    np.testing.assert_allclose(node.train["a"] @ node.train["b"], 0.0, atol=1e-12)


def test_ffa_lora_aggregation_is_exact():
    """Clients share the frozen `a` (same key), so mean_k(b_k)·a = mean_k(b_k·a)."""
    method = jpeft.FFALoRA(rank=R, alpha=8)
    w = kernel()
    clients = [node_for(method, w, key=0) for _ in range(3)]
    clients = [c.replace(train={"b": jax.random.normal(jax.random.PRNGKey(i), (R, M_OUT))})
               for i, c in enumerate(clients)]
    for c in clients[1:]:
        np.testing.assert_array_equal(c.frozen["a"], clients[0].frozen["a"])
    avg = clients[0].replace(train={"b": sum(c.train["b"] for c in clients) / 3})
    np.testing.assert_allclose(method.delta(avg), sum(method.delta(c) for c in clients) / 3, rtol=1e-5, atol=1e-7)
    assert "a" not in jpeft.split({"w": clients[0]})[0]["w"].train


@pytest.mark.parametrize("tokens", [3, 40])  # fewer tokens than inputs: two matmuls; more: one
@pytest.mark.parametrize("dropout", [False, True])
def test_lowrank_matmul_values_and_gradients_equal_the_two_matmul_form(tokens, dropout):
    from jpeft.methods.lowrank import lowrank_matmul
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(k[0], (2, tokens // 2 + tokens % 2, 16))
    w, a, b = (jax.random.normal(kk, s) for kk, s in zip(k[1:4], [(16, 12), (16, 4), (4, 12)]))
    mask = (jax.random.uniform(k[4], x.shape) > 0.3) / 0.7 if dropout else jnp.ones_like(x)
    ct = jax.random.normal(k[5], x.shape[:-1] + (12,))

    def loss(fn, x, w, a, b):
        return jnp.sum(ct * fn(x, x * mask, w, a, b, 1.5))

    two = lambda x, xd, w, a, b, s: x @ w + s * ((xd @ a) @ b)  # noqa: E731
    np.testing.assert_allclose(lowrank_matmul(x, x * mask, w, a, b, 1.5), two(x, x * mask, w, a, b, 1.5),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda *p: loss(lowrank_matmul, *p), argnums=(0, 1, 2, 3))(x, w, a, b)
    want = jax.grad(lambda *p: loss(two, *p), argnums=(0, 1, 2, 3))(x, w, a, b)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)
    tangents = tuple(jnp.ones_like(p) for p in (x, w, a, b))  # forward mode works too
    np.testing.assert_allclose(jax.jvp(lambda *p: loss(lowrank_matmul, *p), (x, w, a, b), tangents)[1],
                               jax.jvp(lambda *p: loss(two, *p), (x, w, a, b), tangents)[1], rtol=1e-4)
