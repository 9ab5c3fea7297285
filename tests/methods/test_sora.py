"""SoRA oracles: the proximal soft-threshold step, zero-gated components, the
rank bound, the λ schedules, identity at init, parameter count, and recovery of the true ranks
of planted targets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods.adaptive import SoRA, rank_pattern
from tests.methods.adaptive_helpers import train_planted
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def perturbed(method, seed=1):
    node = node_for(method, kernel())
    b = jax.random.normal(jax.random.PRNGKey(seed), node.train["b"].shape)
    return node.replace(train={**node.train, "b": b})


def test_identity_at_init_and_init_distribution():
    method = SoRA(rank=8, alpha=16)
    w = kernel()
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert not np.any(node.train["b"])
    assert float(jnp.max(jnp.abs(node.train["a"]))) <= 1 / N_IN ** 0.5
    assert node.train["g"].shape == (8,) and np.any(node.train["g"] != 0)
    assert method.scale == 2.0


def test_parameter_count_is_r_times_in_plus_out_plus_one():
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, jpeft.Spec({"w": SoRA(rank=R)}))
    assert jpeft.count(params).trainable == R * (N_IN + M_OUT + 1)


@pytest.mark.parametrize("threshold, xi", [("paper", 0.5 * 0.2), ("reference", 0.5)])
def test_soft_threshold_after_an_adam_step(threshold, xi):
    """After the optimizer step, |g| ≤ ξ ⇒ g = 0 exactly; otherwise sign kept, |g| reduced by ξ."""
    method = SoRA(rank=R, sparse_lambda=0.5, gate_lr=0.2, threshold=threshold)
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, spec)
    node = params["w"]
    params = {"w": node.replace(train={**node.train, "g": jnp.asarray([0.3 * xi, -0.9 * xi, 1.5, -2.0])})}
    trainable, frozen = jpeft.split(params)
    tx = optax.adam(1e-2)
    opt = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt = tx.update(grads, opt, trainable)
    stepped = optax.apply_updates(trainable, updates)
    g_adam = np.asarray(stepped["w"].train["g"])
    out, opt2 = jpeft.after_step(jpeft.combine(stepped, frozen), opt, spec, step=1, key=jax.random.PRNGKey(0))
    g = np.asarray(out["w"].train["g"])
    small = np.abs(g_adam) <= xi
    assert small[:2].all() and not small[2:].any()
    np.testing.assert_array_equal(g[small], 0.0)
    np.testing.assert_allclose(g[~small], np.sign(g_adam[~small]) * (np.abs(g_adam[~small]) - xi), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, opt2, opt)  # moments untouched
    np.testing.assert_array_equal(out["w"].train["a"], stepped["w"].train["a"])


def test_zero_gated_components_contribute_nothing_and_bound_the_rank(x64):
    method = SoRA(rank=R, alpha=8)
    node = perturbed(method)
    node = node.replace(train={**node.train, "g": jnp.asarray([0.0, 1.3, 0.0, -0.7])})
    before = method.delta(node)
    a = node.train["a"].at[:, 0].add(5.0).at[:, 2].add(-3.0)
    b = node.train["b"].at[0].add(2.0).at[2].add(1.0)
    np.testing.assert_array_equal(method.delta(node.replace(train={**node.train, "a": a, "b": b})), before)
    assert np.linalg.matrix_rank(np.asarray(before)) == 2 <= np.count_nonzero(node.train["g"])
    np.testing.assert_allclose(before, 2.0 * (node.train["a"] * node.train["g"]) @ node.train["b"], rtol=1e-12)


def test_lambda_schedules_match_the_reference():
    """SparseAdamW._build_lambda_list; one stage per `lambda_every` steps after `lambda_start`."""
    common = dict(rank=R, sparse_lambda=0.01, max_lambda=0.1, lambda_num=4, lambda_every=5, lambda_start=10)
    want = {"linear": np.linspace(0.01, 0.1, 4),
            "log_linear": np.log(np.linspace(np.exp(0.01), np.exp(0.1), 4)),
            "exp_linear": np.exp(np.linspace(np.log(0.01), np.log(0.1), 4))}
    for name, values in want.items():
        method = SoRA(lambda_schedule=name, threshold="reference", **common)
        np.testing.assert_allclose(method.lambdas(), values, rtol=1e-12)
        got = [float(method.threshold_at(t)) for t in (0, 10, 14, 15, 24, 25, 1000)]
        np.testing.assert_allclose(got, values[[0, 0, 0, 1, 2, 3, 3]], rtol=1e-6)
    paper = SoRA(lambda_schedule="linear", gate_lr=0.5, **common)
    np.testing.assert_allclose(float(paper.threshold_at(15)), 0.5 * want["linear"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="max_lambda"):
        SoRA(lambda_schedule="linear")


def test_gate_l1_term_is_the_penalty_with_its_weight():
    leaves = {"w0": kernel(), "w1": kernel(seed=1)}
    params = jpeft.init(jax.random.PRNGKey(0), leaves, jpeft.Spec({r"w\d": SoRA(rank=R)}))
    assert float(jpeft.penalty(params)) == 0.0   # gate_l1_weight = 0: no term
    spec = jpeft.Spec({r"w\d": SoRA(rank=R, gate_l1_weight=0.3)})
    params = jpeft.init(jax.random.PRNGKey(0), {"w0": kernel(), "w1": kernel(seed=1)}, spec)
    gates = np.concatenate([params["w0"].train["g"], params["w1"].train["g"]])
    np.testing.assert_allclose(jpeft.penalty(params), 0.3 * np.mean(np.abs(gates)), rtol=1e-6)
    with pytest.raises(jpeft.OptionError, match="gate_l1_weight"):
        SoRA(gate_l1_weight=-1.0)


def test_recovers_the_true_ranks_of_planted_targets():
    """Ranks 3 and 1 planted, SoRA rank 6 on both: the proximal step zeroes every surplus gate
    (nnz(g) = true rank) while the fit stays good."""
    method = SoRA(rank=6, alpha=6.0, sparse_lambda=1.0, gate_lr=0.03)  # ξ = 0.03 per step
    params, spec, losses = train_planted(method, ranks=(3, 1), steps=200)
    assert [sum(v) for v in rank_pattern(params).values()] == [3, 1]
    assert float(losses[-1]) < 1e-2 * float(losses[0])  # the shrinkage biases the fit slightly
    eff = jpeft.merge(params, spec)
    for name, r in (("w0", 3), ("w1", 1)):
        assert np.linalg.matrix_rank(np.asarray(eff[name] - params[name].base), tol=1e-3) == r
