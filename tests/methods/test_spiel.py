"""SpIEL oracles and the Family C skeleton it shares (`jpeft.methods.sparse`):
drop-and-regrow, explicit optimizer-state surgery, dense-gradient plumbing, the factored
sparse-delta matmul, and a 200-step planted-sparse-target toy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.hooks import hook_grads, value_and_hook_grads
from jpeft.methods import sparse as sp
from jpeft.methods import sparse_ops as ops
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def train(method, w, target, steps, lr=0.05, seed=5, factored=True, dense=True):
    """Adam on `||x K' − x target||²` with `jpeft.after_step` (dense grads for the hook).
    Returns (final node, losses, history of (idx, opt_state) after each step)."""
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(3), {"w": w}, spec)
    x = jax.random.normal(jax.random.PRNGKey(seed), (128, w.shape[0]))
    y = x @ target
    tx = optax.adam(lr)
    t, f = jpeft.split(params)
    opt = tx.init(t)

    def loss_fn(p):
        out = method.matmul(p["w"], x) if factored else x @ jpeft.apply(p, spec)["w"]
        return jnp.mean(jnp.square(out - y))

    @jax.jit
    def step(t, f, opt, i):
        value, g, hg = value_and_hook_grads(loss_fn, t, f, dense=dense)
        updates, opt = tx.update(g, opt, t)
        t = optax.apply_updates(t, updates)
        p, opt = jpeft.after_step(jpeft.combine(t, f), opt, spec, step=i, key=jax.random.PRNGKey(i), grads=hg)
        return (*jpeft.split(p), opt, value)

    losses, history = [], []
    for i in range(1, steps + 1):
        t, f, opt, value = step(t, f, opt, i)
        losses.append(float(value))
        history.append((jpeft.combine(t, f)["w"], opt))
    return jpeft.combine(t, f)["w"], losses, history


def planted(idx, seed=1, scale=1.0):
    """A kernel-layout sparse target delta on paper-layout `idx`, |values| in [0.5, 1.5)·scale."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    vals = jnp.where(jax.random.bernoulli(k1, 0.5, idx.shape), 1.0, -1.0) * (0.5 + jax.random.uniform(k2, idx.shape))
    return ops.scatter_kernel(idx, scale * vals, N_IN, M_OUT)


def assert_support(idx, k):
    idx = np.asarray(idx)
    assert idx.shape == (k,) and idx.dtype == np.int32
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx[0] >= 0 and idx[-1] < M_OUT * N_IN


def test_init_is_random_sorted_unique_identity_and_counts_k():
    w = kernel()
    method = sp.SpIEL(density=0.05)
    node = node_for(method, w)
    k = int(0.05 * M_OUT * N_IN)
    assert_support(node.frozen["idx"], k)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert jpeft.count({"w": node}).trainable == k
    assert ops.budget(M_OUT, N_IN, None, 2) == 2 * (M_OUT + N_IN)  # LoRA-matched budget
    other = node_for(method, w, key=1)
    assert not np.array_equal(other.frozen["idx"], node.frozen["idx"])


def reselect_setup(n_valid, seed=0):
    """A node with distinct |val|, Adam-like moments, and a rigl candidate state in which
    `n_valid` candidates are outside the current support (the rest are remaining entries)."""
    method = sp.SpIEL(density=0.05, initial_reselection_rate=0.2)
    node = node_for(method, kernel(), key=seed)
    idx = node.frozen["idx"]
    k = idx.shape[0]
    val = (jnp.arange(1, k + 1, dtype=jnp.float32) * 0.01)[jax.random.permutation(jax.random.PRNGKey(1), k)]
    val = val * jnp.where(jnp.arange(k) % 2 == 0, 1.0, -1.0)
    outside = np.setdiff1d(np.arange(M_OUT * N_IN), np.asarray(idx))[:n_valid]
    largest = np.asarray(idx)[np.argsort(-np.abs(np.asarray(val)), kind="stable")]
    inside = largest[: k - n_valid]          # remaining entries (never among the smallest |val|): invalid
    cand = jnp.asarray(np.concatenate([outside, inside]).astype(np.int32))
    cand_sum = jnp.asarray(np.random.default_rng(2).permutation(np.arange(1, k + 1)).astype(np.float32))
    state = {"cand": cand, "cand_sum": cand_sum, "cand_sq": cand_sum ** 2 + 1.0, "samples": jnp.asarray(4.0)}
    node = node.replace(train={"val": val}, state=state)
    moments = [{"val": jax.random.normal(jax.random.PRNGKey(3), (k,))},
               {"val": jax.random.uniform(jax.random.PRNGKey(4), (k,))}]
    return method, node, moments


@pytest.mark.parametrize("n_valid", [20, 60])
def test_reselection_drops_smallest_grows_best_and_remaps_moments(n_valid):
    method, node, moments = reselect_setup(n_valid)
    idx, val = np.asarray(node.frozen["idx"]), np.asarray(node.train["val"])
    k = idx.shape[0]
    step = method.reselection_steps + method.accumulation_steps          # a later reselection: p = p₀
    res = method.step_hook([node], [moments], step=jnp.asarray(step), keys=[jax.random.PRNGKey(0)])
    new, new_moments = res.nodes[0], res.moments[0]
    new_idx = np.asarray(new.frozen["idx"])
    assert_support(new_idx, k)                                           # (a)
    n_change = min(int(0.2 * k), n_valid)
    removed, added = np.setdiff1d(idx, new_idx), np.setdiff1d(new_idx, idx)
    assert len(removed) == len(added) == n_change                        # (b)
    smallest = idx[np.argsort(np.abs(val), kind="stable")[:n_change]]
    np.testing.assert_array_equal(np.sort(removed), np.sort(smallest))   # (c)
    cand, score = np.asarray(node.state["cand"]), np.abs(np.asarray(node.state["cand_sum"]))
    best = cand[:n_valid][np.argsort(-score[:n_valid], kind="stable")[:n_change]]
    np.testing.assert_array_equal(np.sort(added), np.sort(best))
    # surviving entries: value and every moment carried bit for bit; new values are 0
    pos_old = {int(i): j for j, i in enumerate(idx)}
    for j, i in enumerate(new_idx):
        if int(i) in pos_old:
            o = pos_old[int(i)]
            assert new.train["val"][j] == val[o]
            for mom, old in zip(new_moments, moments):
                assert mom["val"][j] == old["val"][o]
        else:
            assert new.train["val"][j] == 0
    # (d) seeded moments: mean·(1−b1^t), meansq·(1−b2^t) for the new entries
    samples = 4.0
    for j, i in enumerate(new_idx):
        if int(i) not in pos_old:
            c = int(np.nonzero(cand == i)[0][0])
            mean, meansq = node.state["cand_sum"][c] / samples, node.state["cand_sq"][c] / samples
            np.testing.assert_allclose(new_moments[0]["val"][j] / (1 - 0.9 ** step), mean, rtol=1e-5)
            np.testing.assert_allclose(new_moments[1]["val"][j] / (1 - 0.999 ** step), meansq, rtol=1e-4)
    assert float(new.state["samples"]) == 0.0


def test_regrow_with_few_valid_candidates_and_outgoing_winners():
    idx = jnp.asarray([2, 5, 8, 11, 14, 17], jnp.int32)
    val = jnp.asarray([0.6, -0.1, 0.5, 0.2, -0.4, 0.3])          # |val| order: 5, 11, 17, 14, 8, 2
    cand = jnp.asarray([3, 8, 20, 11, 30], jnp.int32)
    score = jnp.asarray([1.0, 9.0, -jnp.inf, 5.0, 2.0])          # 8 remaining (invalid), 20 invalid
    new = np.asarray(ops.regrow(idx, val, cand, score, 3))         # outgoing 5, 11, 17; valid 3, 11, 30
    # winners 11 (outgoing: stays), 30, 3 → the two smallest non-winning outgoing (5, 17) leave
    np.testing.assert_array_equal(new, [2, 3, 8, 11, 14, 30])
    few = np.asarray(ops.regrow(idx, val, cand, jnp.asarray([1.0, 9.0, -jnp.inf, -jnp.inf, -jnp.inf]), 3))
    np.testing.assert_array_equal(few, [2, 3, 8, 11, 14, 17])      # min(⌊pk⌋ = 3, #valid = 1) = 1 change


def test_first_reselection_replaces_everything_and_no_samples_changes_nothing():
    method, node, moments = reselect_setup(60)
    k = node.frozen["idx"].shape[0]
    first = method.step_hook([node], [moments], step=jnp.asarray(method.accumulation_steps),
                             keys=[jax.random.PRNGKey(0)]).nodes[0]
    assert len(np.setdiff1d(node.frozen["idx"], first.frozen["idx"])) == 60  # p = 1: min(k, #valid)
    empty = node.replace(state={**node.state, "samples": jnp.asarray(0.0)})
    res = method.step_hook([empty], [moments], step=jnp.asarray(method.accumulation_steps),
                           keys=[jax.random.PRNGKey(0)])
    np.testing.assert_array_equal(res.nodes[0].frozen["idx"], node.frozen["idx"])
    assert k == res.nodes[0].frozen["idx"].shape[0]
    # outside the reselection step the hook is the identity
    res = method.step_hook([node], [moments], step=jnp.asarray(7), keys=[jax.random.PRNGKey(0)])
    jax.tree.map(np.testing.assert_array_equal, res.nodes[0], node)


def test_rigl_accumulates_the_dense_gradient_over_the_window():
    method = sp.SpIEL(density=0.05, reselection_steps=10, accumulation_steps=3)
    node = node_for(method, kernel())
    k = node.frozen["idx"].shape[0]
    mom = [{"val": jnp.zeros((k,))}, {"val": jnp.zeros((k,))}]
    gs = [kernel(seed=10 + t) for t in range(3)]
    assert ([method.wants_dense_grads(s) for s in (0, 1, 3, 4, 11, 13, 14)]
            == [False, True, True, False, True, True, False])
    n = node
    for t, g in zip((1, 2), gs):
        n = method.step_hook([n], [mom], step=jnp.asarray(t), keys=[jax.random.PRNGKey(0)],
                             grads=[{"val": jnp.zeros((k,)), "dense": g}]).nodes[0]
    cand = np.asarray(n.state["cand"])
    top = np.sort(np.asarray(ops.select_topk(jnp.abs(gs[0]), k)))
    np.testing.assert_array_equal(cand, top)
    np.testing.assert_allclose(n.state["cand_sum"], ops.gather_kernel(gs[0] + gs[1], n.state["cand"]), rtol=1e-6)
    np.testing.assert_allclose(n.state["cand_sq"], ops.gather_kernel(gs[0] ** 2 + gs[1] ** 2, n.state["cand"]),
                               rtol=1e-6)
    assert float(n.state["samples"]) == 2.0
    outside = method.step_hook([n], [mom], step=jnp.asarray(5), keys=[jax.random.PRNGKey(0)],
                               grads=[{"val": jnp.zeros((k,)), "dense": gs[2]}]).nodes[0]
    jax.tree.map(np.testing.assert_array_equal, outside.state, n.state)


def test_value_and_hook_grads_gives_the_dense_kernel_gradient_on_both_paths():
    method = sp.SpIEL(density=0.05)
    spec = jpeft.Spec({"w": method})
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, spec)
    t, f = jpeft.split(params)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, N_IN))
    effective = jpeft.apply(params, spec)["w"]
    want = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(effective)
    for loss in (lambda p: jnp.sum(jnp.sin(method.matmul(p["w"], x))),
                 lambda p: jnp.sum(jnp.sin(x @ jpeft.apply(p, spec)["w"]))):
        value, g, hg = value_and_hook_grads(loss, t, f)
        np.testing.assert_allclose(hg["w"].train["dense"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hg["w"].train["val"], ops.gather_kernel(want, params["w"].frozen["idx"]),
                                   rtol=1e-5, atol=1e-6)
        assert set(g["w"].train) == {"val"}
    built = hook_grads(g, {"w": want})
    np.testing.assert_array_equal(built["w"].train["dense"], want)


def test_sm3_accumulators_and_reselection():
    method = sp.SpIEL(density=0.05, selection="sm3", sm3_beta=0.5)
    node = node_for(method, kernel())
    idx = node.frozen["idx"]
    k = idx.shape[0]
    g = jax.random.normal(jax.random.PRNGKey(2), (k,))
    mom = [{"val": jnp.ones((k,))}]
    with pytest.raises(jpeft.AdapterError, match="sm3.*grads"):
        method.step_hook([node], [mom], step=jnp.asarray(1), keys=[jax.random.PRNGKey(0)])
    n1 = method.step_hook([node], [mom], step=jnp.asarray(1), keys=[jax.random.PRNGKey(0)], grads=[{"val": g}]).nodes[0]
    row, col = np.asarray(idx) // N_IN, np.asarray(idx) % N_IN
    nu = 0.5 * np.asarray(g) ** 2                                   # min(r, c) = 0 at the start
    r_want, c_want = np.zeros(M_OUT), np.zeros(N_IN)
    np.maximum.at(r_want, row, nu)
    np.maximum.at(c_want, col, nu)
    np.testing.assert_allclose(n1.state["row_acc"], r_want, rtol=1e-6)
    np.testing.assert_allclose(n1.state["col_acc"], c_want, rtol=1e-6)
    # at a reselection the new entries are the best inactive ones by r[row]·c[col]; moments zero
    step = method.reselection_steps + method.accumulation_steps
    n1 = n1.replace(train={"val": jnp.arange(1.0, k + 1.0)})
    res = method.step_hook([n1], [mom], step=jnp.asarray(step), keys=[jax.random.PRNGKey(0)], grads=[{"val": g}])
    new = res.nodes[0]
    added = np.setdiff1d(new.frozen["idx"], idx)
    assert len(added) == int(0.2 * k)
    score = np.outer(new.state["row_acc"], new.state["col_acc"]).reshape(-1)
    score[np.asarray(idx)] = -np.inf
    assert np.min(score[added]) >= np.sort(score)[-len(added)] - 1e-12
    # smallest |val| dropped
    assert np.all(np.isin(np.asarray(idx)[: len(added)], np.setdiff1d(idx, new.frozen["idx"])))
    is_new = np.isin(np.asarray(new.frozen["idx"]), added)
    assert np.all(np.asarray(res.moments[0][0]["val"])[is_new] == 0)
    assert np.all(np.asarray(res.moments[0][0]["val"])[~is_new] == 1)


def test_remap_moments_carries_seeds_and_drops():
    old = jnp.asarray([1, 4, 7, 9], jnp.int32)
    new = jnp.asarray([0, 4, 9, 12], jnp.int32)
    mom = jnp.asarray([10.0, 40.0, 70.0, 90.0])
    np.testing.assert_array_equal(ops.remap_moments(old, new, mom), [0.0, 40.0, 90.0, 0.0])
    seeded = ops.remap_moments(old, new, [mom, mom], [jnp.asarray([5.0, 6.0, 7.0, 8.0]), None])
    np.testing.assert_array_equal(seeded[0], [5.0, 40.0, 90.0, 8.0])
    np.testing.assert_array_equal(seeded[1], [0.0, 40.0, 90.0, 0.0])


@pytest.mark.parametrize("chunk", [None, 3, 64])
def test_linear_sparse_delta_equals_dense_with_gradients(x64, chunk):
    """(e) the factored sparse-delta op == `x(K + scatter)ᵀ`, values and gradients (x, val, K)."""
    w = kernel()
    idx = ops.random_indices(jax.random.PRNGKey(1), M_OUT, N_IN, 100)
    val = jax.random.normal(jax.random.PRNGKey(2), (100,))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, N_IN))        # 14 tokens: chunk 3 leaves a remainder

    def fact(x, w, val):
        return jnp.sum(jnp.sin(ops.linear_sparse_delta(x, w, idx, val, chunk=chunk)))

    def dense(x, w, val):
        return jnp.sum(jnp.sin(x @ ops.scatter_kernel(idx, val, N_IN, M_OUT, base=w)))

    np.testing.assert_allclose(fact(x, w, val), dense(x, w, val), rtol=1e-12)
    for gf, gd in zip(jax.grad(fact, argnums=(0, 1, 2))(x, w, val), jax.grad(dense, argnums=(0, 1, 2))(x, w, val)):
        np.testing.assert_allclose(gf, gd, rtol=1e-10, atol=1e-12)
    y0 = jax.random.normal(jax.random.PRNGKey(4), (2, 7, M_OUT))
    got = ops.linear_sparse_delta(x, None, idx, val, m=M_OUT, y0=y0, chunk=chunk)
    np.testing.assert_allclose(got, y0 + x @ ops.scatter_kernel(idx, val, N_IN, M_OUT), rtol=1e-12)


def test_recovers_a_planted_sparse_target_in_200_steps():
    """Starting from random indices, drop/regrow by accumulated gradient finds the planted
    support and fits it; entries outside the support never move."""
    w = kernel() / N_IN ** 0.5
    support = ops.random_indices(jax.random.PRNGKey(9), M_OUT, N_IN, 40)
    target = w + planted(support)
    method = sp.SpIEL(density=0.05, reselection_steps=20, accumulation_steps=5, initial_reselection_rate=0.3)
    node, losses, history = train(method, w, target, steps=200)
    assert losses[-1] < 1e-3 * losses[0]
    assert np.all(np.isin(np.asarray(support), np.asarray(node.frozen["idx"])))
    for n, _ in history[::37]:
        assert_support(n.frozen["idx"], 76)
        moved = np.asarray(method.materialise(n) - n.base) != 0
        outside = np.ones(M_OUT * N_IN, bool)
        outside[np.asarray(n.frozen["idx"])] = False
        assert not np.any(moved.T.reshape(-1)[outside])
    np.testing.assert_array_equal(node.base, w)  # SpIEL never rewrites the base


def test_seeded_moments_reproduce_the_mean_gradient_under_optax_adam():
    """(d) in a real run: right after the first reselection (t = 5, p = 1) the bias-corrected Adam
    first moment of every new index equals its mean accumulated gradient."""
    w = kernel() / N_IN ** 0.5
    target = w + planted(ops.random_indices(jax.random.PRNGKey(9), M_OUT, N_IN, 40))
    method = sp.SpIEL(density=0.05, reselection_steps=20, accumulation_steps=5)
    _, _, history = train(method, w, target, steps=5)
    before, after = history[3][0], history[4][0]
    opt = history[4][1]
    assert int(opt[0].count) == 5
    new = ~np.isin(np.asarray(after.frozen["idx"]), np.asarray(before.frozen["idx"]))
    assert new.sum() > 0
    mu_hat = np.asarray(opt[0].mu["w"].train["val"]) / (1 - 0.9 ** 5)
    nu_hat = np.asarray(opt[0].nu["w"].train["val"]) / (1 - 0.999 ** 5)
    assert np.all(np.asarray(after.train["val"])[new] == 0)
    # the candidate sums the reselection used are still in the state (only `samples` is reset)
    cand = np.asarray(after.state["cand"])
    where = np.searchsorted(cand, np.asarray(after.frozen["idx"])[new])
    np.testing.assert_allclose(mu_hat[new], np.asarray(after.state["cand_sum"])[where] / 5, rtol=1e-5)
    np.testing.assert_allclose(nu_hat[new], np.asarray(after.state["cand_sq"])[where] / 5, rtol=1e-4)
