"""AdaLoRA oracles: budget schedule, global masking to the budget, importance
EMA, final-phase freezing, orthogonality regulariser, identity at init, parameter count, and
recovery of the true ranks of planted targets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.adaptive import AdaLoRA, rank_pattern
from tests.methods.adaptive_helpers import train_planted
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def test_identity_at_init_and_init_distribution():
    method = AdaLoRA(init_r=12, target_r=8, total_step=100)
    w = kernel()
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert not np.any(node.train["e"])
    for k in ("a", "b"):  # PEFT: N(0, 0.02²)
        assert abs(float(jnp.std(node.train[k])) - 0.02) < 0.003
    assert method.scale == 8.0 / 12


def test_parameter_count_is_r0_times_in_plus_out_plus_one():
    method = AdaLoRA(init_r=4, target_r=2, total_step=10)
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, jpeft.Spec({"w": method}))
    assert jpeft.count(params).trainable == 4 * (N_IN + M_OUT + 1)


def test_budget_schedule_values():
    """b₀ up to t_i, b_T + (b₀ − b_T)/8 half-way, b_T from T − t_f on; masking only in between."""
    method = AdaLoRA(init_r=12, target_r=4, total_step=100, tinit=10, tfinal=20, delta_t=5)
    b0, bt = 24, 8  # two matrices
    values = {t: method.budget(t, b0, bt) for t in (0, 10, 11, 45, 80, 81, 100)}
    assert [int(values[t][0]) for t in (0, 10, 45, 80, 81, 100)] == [24, 24, 8 + 16 // 8, 8, 8, 8]
    assert int(values[11][0]) == int(np.floor(16 * (1 - 1 / 70) ** 3 + 8))
    assert [bool(values[t][1]) for t in (0, 10, 11, 45, 80, 81, 100)] == [False, False, False, True, True, False, False]


def _nodes(method, shapes=((32, 48), (48, 32), (40, 24)), seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(shapes))
    nodes, grads = [], []
    for i, shape in enumerate(shapes):
        node = node_for(method, kernel(seed=i, shape=shape))
        node = node.replace(train={**node.train, "e": jax.random.normal(keys[2 * i], (method.init_r,))})
        nodes.append(node)
        grads.append(jax.tree.map(lambda v, k=keys[2 * i + 1]: jax.random.normal(k, v.shape), node.train))
    return nodes, grads


def test_importance_is_the_ema_of_sensitivity_times_uncertainty():
    method = AdaLoRA(init_r=4, target_r=2, total_step=100, tinit=50)
    nodes, grads = _nodes(method)
    res = method.step_hook(nodes, [[] for _ in nodes], step=jnp.asarray(3), keys=[None] * 3, grads=grads)
    for old, new, g in zip(nodes, res.nodes, grads):
        for k in ("a", "e", "b"):
            ipt = np.abs(np.asarray(old.train[k]) * np.asarray(g[k]))
            np.testing.assert_allclose(new.state[f"ipt_{k}"], 0.15 * ipt, rtol=1e-6)
            np.testing.assert_allclose(new.state[f"unc_{k}"], 0.15 * np.abs(ipt - 0.15 * ipt), rtol=1e-6)
        s = {k: new.state[f"ipt_{k}"] * new.state[f"unc_{k}"] for k in ("a", "e", "b")}
        want = s["e"] + s["a"].mean(axis=0) + s["b"].mean(axis=1)
        np.testing.assert_allclose(method.triplet_scores(new.state), want, rtol=1e-6)
        np.testing.assert_array_equal(new.train["e"], old.train["e"])  # t <= tinit: no masking


def test_masking_keeps_the_globally_most_important_triplets_within_budget():
    method = AdaLoRA(init_r=4, target_r=1, total_step=20, delta_t=2)
    nodes, grads = _nodes(method)
    # Make the first matrix's triplets far more important: the budget goes to it, not evenly.
    grads[0] = jax.tree.map(lambda g: 100.0 * g, grads[0])
    step = 10
    budget = int(method.budget(step, 12, 3)[0])
    moments = [[{k: jnp.full_like(v, 7.0) for k, v in n.train.items()}] for n in nodes]
    res = jax.jit(lambda ns, ms, gs: method.step_hook(ns, ms, step=jnp.asarray(step), keys=[None] * 3, grads=gs))(
        nodes, moments, grads)
    kept = [np.asarray(n.train["e"]) != 0 for n in res.nodes]
    assert sum(int(k.sum()) for k in kept) == budget < 12
    assert kept[0].all() and sum(int(k.sum()) for k in kept[1:]) == budget - 4
    scores = np.concatenate([np.asarray(method.triplet_scores(n.state)) for n in res.nodes])
    np.testing.assert_array_equal(np.concatenate(kept), scores > np.sort(scores)[12 - budget - 1])
    for n, k in zip(res.nodes, kept):
        np.testing.assert_array_equal(n.state["keep"], k)
    for old, new in zip(moments, res.moments):  # masking without reset: moments untouched
        jax.tree.map(np.testing.assert_array_equal, old, new)


def test_final_phase_freezes_the_last_mask():
    method = AdaLoRA(init_r=4, target_r=1, total_step=20, tfinal=5, delta_t=100)
    nodes, grads = _nodes(method)
    hook = jax.jit(lambda ns, gs, t: method.step_hook(ns, [[] for _ in ns], step=t, keys=[None] * 3, grads=gs).nodes)
    # t = 14 scores (no masking: 14 % delta_t != 0); t = T − t_f = 15 masks to b_T with those
    # scores (it does not update them, as PEFT) and restarts them.
    scored = hook(nodes, grads, jnp.asarray(14))
    assert all(np.array_equal(s.train["e"], n.train["e"]) for s, n in zip(scored, nodes))
    masked = hook(scored, grads, jnp.asarray(15))
    assert sum(int(np.count_nonzero(n.train["e"])) for n in masked) == 3
    assert all(not np.any(n.state["ipt_e"]) for n in masked)
    # Later steps re-apply that mask to regrown values and keep the scores frozen.
    regrown = [n.replace(train={**n.train, "e": n.train["e"] + 1.0}) for n in masked]
    later = hook(regrown, grads, jnp.asarray(17))
    for m, n in zip(masked, later):
        np.testing.assert_array_equal(np.asarray(n.train["e"]) != 0, m.state["keep"])
        np.testing.assert_array_equal(n.state["keep"], m.state["keep"])
        assert not np.any(n.state["ipt_e"])


def test_hook_needs_gradients():
    method = AdaLoRA(init_r=4, target_r=2, total_step=10)
    nodes, _ = _nodes(method)
    with pytest.raises(ValueError, match="grads"):
        method.step_hook(nodes, [[]] * 3, step=1, keys=[None] * 3)


def test_options_are_validated():
    with pytest.raises(ValueError, match="total_step"):
        AdaLoRA()
    with pytest.raises(ValueError, match="budgeting phase"):
        AdaLoRA(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRA(init_r=4, target_r=5, total_step=10)


def test_orthogonality_regulariser(x64):
    method = AdaLoRA(init_r=4, target_r=2, total_step=10, orth_reg_weight=0.5)
    spec = jpeft.Spec({r"w\d": method})
    params = jpeft.init(jax.random.PRNGKey(0), {"w0": kernel(), "w1": kernel(seed=1, shape=(48, 32))}, spec)
    # Orthonormal P (= bᵀ) columns and Q (= aᵀ) rows: the regulariser vanishes.
    ortho = {}
    for i, (name, node) in enumerate(params.items()):
        n, m = node.base.shape
        q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(i), (n, 4)))[0]
        p = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(10 + i), (m, 4)))[0]
        ortho[name] = node.replace(train={**node.train, "a": q, "b": p.T})
    assert float(jpeft.penalty(ortho)) < 1e-7
    # Otherwise (1/L) Σ γ (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F); PEFT's per-matrix mean is half of it.
    want = sum(0.5 * (np.linalg.norm(n.train["a"].T @ n.train["a"] - np.eye(4))
                      + np.linalg.norm(n.train["b"] @ n.train["b"].T - np.eye(4))) for n in params.values()) / 2
    np.testing.assert_allclose(jpeft.penalty(params), want, rtol=1e-10)
    np.testing.assert_allclose(jpeft.penalty(jpeft.split(params)[0]), want, rtol=1e-10)  # the trainable half
    per_matrix = {k: v.replace(method=dataclasses.replace(method, orth_reg_per_matrix=True)) for k, v in params.items()}
    np.testing.assert_allclose(jpeft.penalty(per_matrix), want / 2, rtol=1e-10)
    grads = jax.grad(lambda p: jpeft.penalty(p))(jpeft.split(ortho)[0])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_recovers_the_true_ranks_of_planted_targets():
    """Ranks 3 and 1 planted, r₀ = 6 each, average target 2 (budget 4): the global budget is
    redistributed to (3, 1) and the fit is near exact."""
    method = AdaLoRA(init_r=6, target_r=2, alpha=6.0, total_step=200, tinit=20, tfinal=50, delta_t=5)
    params, spec, losses = train_planted(method, ranks=(3, 1), steps=200)
    assert [sum(v) for v in rank_pattern(params).values()] == [3, 1]
    assert float(losses[-1]) < 1e-4 * float(losses[0])
    eff = jpeft.merge(params, spec)
    for name, r in (("w0", 3), ("w1", 1)):
        assert np.linalg.matrix_rank(np.asarray(eff[name] - params[name].base), tol=1e-3) == r
