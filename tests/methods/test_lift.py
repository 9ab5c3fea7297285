"""LIFT oracles: principal-weight mask, mask refresh with explicit moment
carry-over, and a 200-step planted-target toy."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods import sparse as sp
from jpeft.methods import sparse_ops as ops
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for
from tests.methods.test_spiel import assert_support, planted, train


def best_rank(w, r):
    u, s, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def paper_topk(kernel_score, k):
    """Sorted paper-layout flat indices of the top-k of a kernel-layout score (numpy)."""
    flat = np.asarray(kernel_score).T.reshape(-1)
    return np.sort(np.argsort(-flat, kind="stable")[:k])


def test_mask_is_topk_of_the_rank_r_approximation(x64):
    w = kernel()
    method = sp.LIFT(rank=R, lora_rank=2)
    node = node_for(method, w)
    k = min((M_OUT + N_IN) * 2, M_OUT * N_IN)                     # (a) k = (m+n)·r_LoRA
    assert_support(node.frozen["idx"], k)
    np.testing.assert_array_equal(node.frozen["idx"], paper_topk(np.abs(best_rank(w, R)), k))
    assert not np.array_equal(node.frozen["idx"], paper_topk(np.abs(w), k))  # not the top-k of |W|
    np.testing.assert_array_equal(method.materialise(node), w)
    assert jpeft.count({"w": node}).trainable == k
    big = node_for(sp.LIFT(rank=R, lora_rank=100), w)                # budget capped at m·n
    assert big.frozen["idx"].shape == (M_OUT * N_IN,)


def test_randomized_svd_gives_the_same_mask_on_a_decaying_spectrum():
    w = kernel(decay=True)
    exact = node_for(sp.LIFT(rank=R, lora_rank=2), w)
    fast = node_for(sp.LIFT(rank=R, lora_rank=2, svd_niter=4), w)
    np.testing.assert_array_equal(exact.frozen["idx"], fast.frozen["idx"])


def test_refresh_carries_moments_bitwise_and_keeps_the_function():
    method = sp.LIFT(rank=R, lora_rank=2, update_interval=10)
    node = node_for(method, kernel())
    idx = node.frozen["idx"]
    k = idx.shape[0]
    # a large trained delta moves the principal weights
    node = node.replace(train={"val": 3.0 * jax.random.normal(jax.random.PRNGKey(1), (k,))})
    moments = [{"val": jax.random.normal(jax.random.PRNGKey(2), (k,))},
               {"val": jax.random.uniform(jax.random.PRNGKey(3), (k,))}]
    same = method.step_hook([node], [moments], step=jnp.asarray(9), keys=[jax.random.PRNGKey(0)])
    jax.tree.map(np.testing.assert_array_equal, same.nodes[0], node)
    res = method.step_hook([node], [moments], step=jnp.asarray(10), keys=[jax.random.PRNGKey(0)])
    new, new_moments = res.nodes[0], res.moments[0]
    new_idx = np.asarray(new.frozen["idx"])
    assert_support(new_idx, k)
    np.testing.assert_array_equal(new_idx, paper_topk(np.abs(best_rank(method.materialise(node), R)), k))
    old = np.asarray(idx)
    assert 0 < len(np.setdiff1d(old, new_idx)) < k                 # the mask moved, partly
    pos = {int(i): j for j, i in enumerate(old)}
    for j, i in enumerate(new_idx):
        if int(i) in pos:                                          # (c) bitwise carry
            assert new.train["val"][j] == node.train["val"][pos[int(i)]]
            for a, b in zip(new_moments, moments):
                assert a["val"][j] == b["val"][pos[int(i)]]
        else:
            assert new.train["val"][j] == 0 and all(a["val"][j] == 0 for a in new_moments)
    # leaving entries keep their trained value, folded into the base: the function is unchanged
    np.testing.assert_allclose(method.materialise(new), method.materialise(node), rtol=1e-6, atol=1e-6)
    changed = np.asarray(new.base != node.base).T.reshape(-1)
    np.testing.assert_array_equal(np.nonzero(changed)[0], np.setdiff1d(old, new_idx))
    assert method.checkpoint_base


def test_recovers_a_planted_target_on_the_principal_weights_in_200_steps():
    """A sparse target supported on LIFT's principal weights is fitted; between refreshes
    no entry outside the mask moves."""
    w = kernel() / N_IN ** 0.5
    method = sp.LIFT(rank=R, lora_rank=1, update_interval=50)
    k = ops.budget(M_OUT, N_IN, None, 1)
    mask = method.principal_indices(None, w, k)
    support = jnp.sort(mask[jax.random.permutation(jax.random.PRNGKey(4), k)[:40]])
    target = w + 0.3 * planted(support)
    node, losses, history = train(method, w, target, steps=200, dense=False)
    assert losses[-1] < 1e-2 * losses[0]
    for (a, _), (b, _) in zip(history[:-1], history[1:]):
        if not np.array_equal(a.frozen["idx"], b.frozen["idx"]):
            continue                                               # a refresh step
        moved = np.asarray(method.materialise(b) != method.materialise(a)).T.reshape(-1)
        assert np.all(np.isin(np.nonzero(moved)[0], np.asarray(a.frozen["idx"])))
    refreshes = sum(not np.array_equal(a.frozen["idx"], b.frozen["idx"])
                    for (a, _), (b, _) in zip(history[:-1], history[1:]))
    assert 1 <= refreshes <= 3                                     # at steps 50, 100, 150 (if the mask moved)
