"""LoRA-Pro oracles (a)–(c) (labelled below) and the reference AdamW step (NumPy/SciPy transcription of
`lorapro_full_adjustment` + SGD) on adapters made by `jpeft.init`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import jpeft
import jpeft.optim as jo
from jpeft.optim.lora_pro import equivalent_gradient

N_IN, M_OUT, R = 32, 48, 4  # kernel (in, out)


def normal(shape, seed, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def factors(seed=0):
    """Kernel-layout factors with B ≠ 0 (a later step), and a full gradient G_K."""
    return normal((N_IN, R), seed), normal((R, M_OUT), seed + 1), normal((N_IN, M_OUT), seed + 2)


def proj(x):
    """Orthogonal projector onto the column space of `x`."""
    return x @ np.linalg.pinv(x)


def test_equivalent_gradient_is_the_projection_residual_and_beats_lora(x64):
    """(a): ‖g̃ − G‖ = ‖(I−P_B) G (I−P_A)‖ ≤ ‖g̃_lora − G‖ (kernel layout: P_a on inputs, P_b on outputs)."""
    a, b, g = factors()
    s = 2.0
    g_a, g_b = s * g @ b.T, s * a.T @ g  # LoRA gradients of <G, K + s·a@b>
    ua, ub = jo.lora_pro_adjust(a, b, g_a, g_b, s)
    pro = np.linalg.norm(equivalent_gradient(a, b, ua, ub, s) - g)
    lora = np.linalg.norm(equivalent_gradient(a, b, g_a, g_b, s) - g)
    a_, b_, g_ = (np.asarray(t) for t in (a, b, g))
    residual = np.linalg.norm((np.eye(N_IN) - proj(a_)) @ g_ @ (np.eye(M_OUT) - proj(b_.T)))
    assert pro == pytest.approx(residual, rel=1e-6)
    assert pro < lora


def test_sylvester_solver_residual(x64):
    """(b)"""
    a, b, _ = factors(3)
    p, q = b @ b.T, a.T @ a
    c = normal((R, R), 9)
    x = jo.solve_sylvester(p, q, c)
    assert float(jnp.max(jnp.abs(p @ x + x @ q - c))) < 1e-6
    np.testing.assert_allclose(x, scipy.linalg.solve_sylvester(np.asarray(p), np.asarray(q), np.asarray(c)),
                               rtol=1e-8)


def test_equivalent_gradient_ignores_the_gauge_x(x64):
    """(c): X changes (g_a, g_b) but not g̃."""
    a, b, g = factors(5)
    s = 2.0
    with_x = jo.lora_pro_adjust(a, b, s * g @ b.T, s * a.T @ g, s)
    without = jo.lora_pro_adjust(a, b, s * g @ b.T, s * a.T @ g, s, with_x=False)
    assert not np.allclose(with_x[0], without[0])
    np.testing.assert_allclose(equivalent_gradient(a, b, *with_x, s), equivalent_gradient(a, b, *without, s),
                               rtol=1e-8, atol=1e-10)


def test_first_step_rule(x64):
    a, _, g = factors(7)
    b = jnp.zeros((R, M_OUT), jnp.float64)
    s = 2.0
    ua, ub = jo.lora_pro_adjust(a, b, s * g @ b.T, s * a.T @ g, s, first_step=True)
    np.testing.assert_array_equal(ua, 0.0)
    np.testing.assert_allclose(ub, np.linalg.inv(a.T @ a) @ (s * a.T @ g) / s ** 2, rtol=1e-8)
    # the equivalent gradient is G projected on the row space of A (paper layout): P_a G
    np.testing.assert_allclose(equivalent_gradient(a, b, ua, ub, s), proj(np.asarray(a)) @ g, atol=1e-10)


def _reference_steps(a0, b0, grads_k, *, s, lr, b1=0.9, b2=0.999, eps=1e-8, delta=1e-8):
    """`mrflogs/LoRA-Pro` `lorapro_full_adjustment` then SGD, in the reference's paper layout."""
    A, B = np.asarray(a0, np.float64).T, np.asarray(b0, np.float64).T
    exp_avg = exp_avg_sq = None
    out = []
    for step, gk in enumerate(grads_k):
        G = np.asarray(gk, np.float64).T
        gA, gB = s * B.T @ G, s * G @ A.T
        eye = np.eye(R)
        aat_inv = np.linalg.pinv(A @ A.T + delta * eye)
        if step == 0:
            ga, gb = gA, (1 / s ** 2) * gB @ aat_inv
        else:
            btb_inv = np.linalg.pinv(B.T @ B + delta * eye)
            ga = (1 / s ** 2) * btb_inv @ gA
            gb = (1 / s ** 2) * ((np.eye(B.shape[0]) - B @ btb_inv @ B.T) @ gB @ aat_inv)
        equiv = s * B @ ga + s * gb @ A
        if exp_avg is None:
            exp_avg, exp_avg_sq = (1 - b1) * equiv, (1 - b2) * equiv * equiv
        else:
            exp_avg = exp_avg + (1 - b1) * (equiv - exp_avg)
            exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * equiv * equiv
        t = step + 1
        denom = np.sqrt(exp_avg_sq) / np.sqrt(1 - b2 ** t) + eps
        g = (exp_avg / (1 - b1 ** t)) / denom
        gA, gB = s * B.T @ g, s * g @ A.T
        if step == 0:
            ga, gb = gA, (1 / s ** 2) * gB @ aat_inv
        else:
            x = scipy.linalg.solve_sylvester(B.T @ B, A @ A.T, -(1 / s ** 2) * btb_inv @ gA @ A.T)
            ga = (1 / s ** 2) * btb_inv @ gA + x @ A
            gb = (1 / s ** 2) * ((np.eye(B.shape[0]) - B @ btb_inv @ B.T) @ gB @ aat_inv) - B @ x
        A, B = A - lr * ga, B - lr * gb
        out.append((A.T.copy(), B.T.copy()))
    return out


def _lora_tree(seed=0, extra=None):
    base = {"w": normal((N_IN, M_OUT), seed, jnp.float32)}
    rules = {"w": jpeft.LoRA(rank=R, alpha=2 * R)}
    if extra:
        base.update(extra[0])
        rules.update(extra[1])
    params = jpeft.init(jax.random.PRNGKey(seed), base, jpeft.Spec(rules))
    return jpeft.split(params)


def test_adamw_variant_matches_the_reference_on_jpeft_adapters():
    trainable, _ = _lora_tree()
    node = trainable["w"]
    s = node.method.scale
    grads_k = [np.asarray(normal((N_IN, M_OUT), 100 + t, jnp.float32)) for t in range(4)]
    lr = 1e-2
    ref = _reference_steps(node.train["a"], node.train["b"], grads_k, s=s, lr=lr)
    tx = jo.lora_pro(lr)
    state, update = tx.init(trainable), jax.jit(tx.update)
    for gk, (ra, rb) in zip(grads_k, ref):
        a, b = trainable["w"].train["a"], trainable["w"].train["b"]
        grads = jax.tree.map(lambda x: x, trainable)
        grads["w"] = node.replace(train={"a": s * gk @ b.T, "b": s * a.T @ gk})  # grads of <G, K'>
        u, state = update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, u)
        for got, want in ((trainable["w"].train["a"], ra), (trainable["w"].train["b"], rb)):
            assert np.linalg.norm(np.asarray(got) - want) <= 2e-5 * np.linalg.norm(want)
    assert state[0].pairs["w"].mu.shape == (N_IN, M_OUT)


def test_only_lora_pairs_are_adjusted_other_leaves_use_the_inner_optimizer():
    extra = ({"v": normal((N_IN, M_OUT), 1, jnp.float32)}, {"v": jpeft.DoRA(rank=R, alpha=2 * R)})
    trainable, _ = _lora_tree(extra=extra)
    tx = jo.scale_by_lora_pro()
    state = tx.init(trainable)
    assert set(state.pairs) == {"w"}
    grads = jax.tree.map(jnp.ones_like, trainable)
    u, state = jax.jit(tx.update)(grads, state, trainable)
    adam = optax.scale_by_adam()
    ref, _ = adam.update(grads["v"].train, adam.init(trainable["v"].train))
    for k in ("a", "b", "m"):
        np.testing.assert_allclose(u["v"].train[k], ref[k], rtol=1e-6)
    assert jax.tree.structure(u) == jax.tree.structure(trainable)


def test_sgd_variant_has_no_full_size_state_and_returns_adjusted_gradients():
    trainable, _ = _lora_tree()
    node = trainable["w"]
    tx = jo.scale_by_lora_pro(adam=False)
    state = tx.init(trainable)
    assert state.pairs == {"w": None}
    gk = normal((N_IN, M_OUT), 11, jnp.float32)
    grads = {"w": node.replace(train={"a": jnp.zeros((N_IN, R)), "b": node.method.scale * node.train["a"].T @ gk})}
    u, _ = tx.update(grads, state, trainable)
    ua, ub = jo.lora_pro_adjust(node.train["a"], node.train["b"], grads["w"].train["a"], grads["w"].train["b"],
                                node.method.scale, first_step=True)
    np.testing.assert_allclose(u["w"].train["a"], ua, rtol=1e-6)
    np.testing.assert_allclose(u["w"].train["b"], ub, rtol=1e-6)


def test_requires_params():
    trainable, _ = _lora_tree()
    tx = jo.scale_by_lora_pro()
    with pytest.raises(ValueError, match="params"):
        tx.update(trainable, tx.init(trainable))
