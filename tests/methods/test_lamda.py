"""LaMDA oracles and its progressive freezing of B (explicit optimizer-state surgery)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.methods.lamda import LaMDA, lamda_compact
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def test_spectral_init_is_the_identity_with_frozen_singular_frames(x64):
    w = kernel(decay=True)
    method = LaMDA(rank=R, alpha=16.0)
    node = node_for(method, w)
    np.testing.assert_allclose(method.materialise(node), w, atol=1e-12)
    u, s, vh = jnp.linalg.svd(w.T, full_matrices=False)                     # W = U Σ Vᵀ
    a, b = node.frozen["a"], node.train["b"]                                # A = V_rᵀ (frozen), B = U_r
    sign = jnp.sign(jnp.sum(a * vh[:R].T, axis=0))
    np.testing.assert_allclose(a, vh[:R].T * sign, atol=1e-12)
    np.testing.assert_allclose(b, (u[:, :R] * sign).T, atol=1e-12)
    np.testing.assert_allclose(node.train["core"], jnp.diag(s[:R]) / method.scale, atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.svd(node.base, compute_uv=False)[: N_IN - R], s[R:], atol=1e-12)


def test_public_code_init_is_exactly_the_identity():
    w = kernel()
    node = node_for(LaMDA(rank=R, init="kaiming"), w)
    np.testing.assert_array_equal(LaMDA(rank=R, init="kaiming").materialise(node), w)
    assert not np.any(node.train["b"]) and float(jnp.max(jnp.abs(node.train["core"]))) <= R ** -0.5


def test_a_gets_no_gradient_and_counts_before_and_after_the_freeze():
    """(a) A is frozen; (c) trainable count r² + r·out, then r² after `lamda_compact`."""
    w = kernel()
    method = LaMDA(rank=R)
    tree = jpeft.init(jax.random.PRNGKey(0), {"w": w}, jpeft.Spec({"w": method}))
    trainable, frozen = jpeft.split(tree)
    g = jax.grad(lambda t: jnp.sum(jnp.sin(jpeft.apply(jpeft.combine(t, frozen),
                                                       jpeft.Spec({"w": method}))["w"])))(trainable)
    assert set(g["w"].train) == {"core", "b"} and "a" in tree["w"].frozen
    assert jpeft.count(tree).trainable == R * R + R * M_OUT


def test_schedule():
    assert LaMDA(rank=4, freeze_steps=8).freeze_schedule().tolist() == [2, 4, 6, 8]
    assert LaMDA(rank=4, freeze_steps=6).freeze_schedule().tolist() == [2, 3, 5, 6]
    assert LaMDA(rank=4, freeze_steps=0).freeze_schedule().tolist() == [0, 0, 0, 0]


def test_progressive_freezing_during_training_then_compaction():
    """(b) after its freeze step a column of B never moves again (AdamW weight decay included) and
    its moments are zero; once B is frozen, `lamda_compact` drops B and its optimizer state."""
    method = LaMDA(rank=R, freeze_steps=8)
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, spec)
    target, x = kernel(seed=4), jax.random.normal(jax.random.PRNGKey(5), (64, N_IN))
    tx = optax.adamw(0.05, weight_decay=0.1)
    trainable, frozen = jpeft.split(params)
    opt_state = tx.init(trainable)

    def loss(t, frozen):
        return jnp.mean(jnp.square(x @ jpeft.apply(jpeft.combine(t, frozen), spec)["w"] - x @ target))

    @jax.jit
    def step(trainable, frozen, opt_state, i):
        updates, opt_state = tx.update(jax.grad(loss)(trainable, frozen), opt_state, trainable)
        params, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen),
                                             opt_state, spec, step=i, key=jax.random.PRNGKey(i))
        return (*jpeft.split(params), opt_state)

    schedule = method.freeze_schedule()
    history = []
    for i in range(1, 11):
        trainable, frozen, opt_state = step(trainable, frozen, opt_state, i)
        node = jpeft.combine(trainable, frozen)["w"]
        history.append((node, opt_state))
        np.testing.assert_array_equal(np.asarray(node.state["frozen_cols"]) > 0, i >= schedule)
        mu = opt_state[0].mu["w"].train["b"]
        assert not np.any(np.asarray(mu)[i >= schedule]) and np.all(np.any(np.asarray(mu)[i < schedule] != 0, axis=1))
    for j, t in enumerate(schedule):
        rows = [np.asarray(method.b_effective(n))[j] for n, _ in history[t - 1:]]
        assert all(np.array_equal(rows[0], r) for r in rows)                       # frozen from step t on
        before = np.asarray(method.b_effective(history[t - 2][0]))[j] if t >= 2 else None
        assert before is None or not np.array_equal(before, rows[0])              # it moved until then
    assert not np.allclose(history[-1][0].train["core"], history[-3][0].train["core"])  # S keeps training

    tree = jpeft.combine(trainable, frozen)
    before = jpeft.merge(tree, spec)
    tree, opt_state = lamda_compact(tree, opt_state)
    assert jpeft.count(tree).trainable == R * R and "b" in tree["w"].frozen
    assert set(opt_state[0].mu["w"].train) == {"core"} and set(opt_state[0].nu["w"].train) == {"core"}
    jax.tree.map(np.testing.assert_array_equal, jpeft.merge(tree, spec), before)
    trainable, frozen = jpeft.split(tree)                                          # training goes on
    first = float(loss(trainable, frozen))
    for i in range(11, 14):
        trainable, frozen, opt_state = step(trainable, frozen, opt_state, i)
    assert float(loss(trainable, frozen)) < first
