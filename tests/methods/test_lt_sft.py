"""LT-SFT oracles ([UNVERIFIED details]): the mask is the top-K of |θ₁ − θ₀|,
nnz(φ) ≤ K, and sparse deltas compose and subtract exactly (pure functions)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.adapter import is_adapter
from jpeft.methods import sparse as sp
from jpeft.methods import sparse_delta as sd
from jpeft.methods import sparse_ops as ops
from tests.methods.helpers import M_OUT, N_IN, kernel


def test_mask_is_the_topk_of_the_full_finetuning_difference():
    theta0 = {"w": kernel(), "v": kernel(seed=1)}
    theta1 = jax.tree.map(lambda a, s: a + 0.1 * kernel(seed=s), theta0, {"w": 5, "v": 6})
    diff = jax.tree.map(lambda a, b: a - b, theta1, theta0)
    method = sp.LTSFT(density=0.05)
    spec = jpeft.Spec({"w|v": method})
    params = jpeft.init(jax.random.PRNGKey(0), theta0, spec, calib=diff)
    k = int(0.05 * M_OUT * N_IN)
    for name in ("w", "v"):
        idx = np.asarray(params[name].frozen["idx"])
        want = np.sort(np.argsort(-np.abs(np.asarray(diff[name])).T.reshape(-1), kind="stable")[:k])
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(sd.difference(theta1[name], theta0[name], k).idx, want)
    jax.tree.map(np.testing.assert_array_equal, jpeft.merge(params, spec), theta0)   # reset to θ₀
    assert jpeft.count(params).trainable == 2 * k
    # a trained φ has nnz ≤ K and `deltas` extracts it exactly
    params["w"] = params["w"].replace(train={"val": jnp.arange(k, dtype=jnp.float32) - 3.0})
    phi = sd.deltas(params)
    assert set(phi) == {"w", "v"} and all(int(jnp.sum(d.val != 0)) <= k for d in phi.values())
    np.testing.assert_allclose(phi["w"].dense_kernel(), jpeft.merge(params, spec)["w"] - theta0["w"], atol=1e-5)
    # the L1 pull toward θ₀ is a penalty only with its weight set
    assert float(jpeft.penalty(params)) == 0.0
    weighted = jax.tree.map(lambda x: x.replace(method=dataclasses.replace(x.method, l1_weight=0.5)) if is_adapter(x)
                            else x, params, is_leaf=is_adapter)
    np.testing.assert_allclose(jpeft.penalty(weighted), 0.5 * np.sum(np.abs(np.arange(k) - 3.0)))


def delta(seed, k, dyadic=True):
    idx = ops.random_indices(jax.random.PRNGKey(seed), M_OUT, N_IN, k)
    val = jax.random.normal(jax.random.PRNGKey(seed + 100), (k,))
    if dyadic:  # multiples of 1/8 in a small range: every sum below is exact in fp32
        val = jnp.round(val * 8.0) / 8.0
    return ops.SparseDelta(idx, val, (M_OUT, N_IN))


def test_composition_and_subtraction_are_exact():
    theta0 = {"w": jnp.round(kernel() * 8.0) / 8.0}
    a, b, c = delta(1, 300), delta(2, 200), delta(3, 150)
    assert len(np.intersect1d(a.idx, b.idx)) > 0                        # overlapping supports
    ab = sd.add(a, b)
    np.testing.assert_array_equal(ab.idx, np.union1d(a.idx, b.idx))
    jax.tree.map(np.testing.assert_array_equal, ab, sd.add(b, a))         # commutative
    jax.tree.map(np.testing.assert_array_equal, sd.add(ab, c), sd.add(a, sd.add(b, c)))  # associative
    back = sd.subtract(ab, b)
    np.testing.assert_array_equal(sd.prune_zeros(back).dense_kernel(), a.dense_kernel())
    np.testing.assert_array_equal(sd.subtract(a, a).val, 0.0)
    # θ₀ + φ_a + φ_b: one composed delta == adding them one by one == dense sum
    one = sd.apply_deltas(theta0, {"w": ab})["w"]
    seq = sd.apply_deltas(theta0, {"w": a}, {"w": b})["w"]
    np.testing.assert_array_equal(one, seq)
    np.testing.assert_array_equal(one, theta0["w"] + a.dense_kernel() + b.dense_kernel())
    np.testing.assert_array_equal(sd.apply_deltas(sd.apply_deltas(theta0, {"w": ab}), sd.negate({"w": b}))["w"],
                                  sd.apply_deltas(theta0, {"w": a})["w"])
    # general float values: bitwise for disjoint supports, fp32-close otherwise
    x, y = delta(4, 100, dyadic=False), delta(5, 100, dyadic=False)
    disjoint = ops.SparseDelta(*[v[~np.isin(y.idx, x.idx)] for v in (y.idx, y.val)], y.shape)
    np.testing.assert_array_equal(
        sd.subtract(sd.add(x, disjoint), disjoint).val[np.isin(sd.add(x, disjoint).idx, x.idx)], x.val)
    np.testing.assert_allclose(sd.add(x, y).dense_kernel(), x.dense_kernel() + y.dense_kernel(), rtol=1e-6)
    # dict form: several deltas on several leaves
    d = sd.add({"w": a}, {"w": b, "v": c})
    assert set(d) == {"v", "w"}
    np.testing.assert_array_equal(sd.subtract({"w": a}, {"v": c})["v"].val, -c.val)
