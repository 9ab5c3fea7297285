"""Family M oracles: the task-vector primitives (TIES, DARE, magnitude pruning) on the fixed
vectors of the method reference, and `merge_adapters` on jpeft trees (exact `cat`, PEFT's cross
terms for `linear`, Eckart–Young for `svd`, the compat scalings, scanned stacks, bad input). PEFT
parity is in tests/interop/test_merge_peft_parity.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import merging
from jpeft.merging import merge_adapters

T1 = jnp.array([3.0, -2.0, 0.5, 1.0])
T2 = jnp.array([-1.0, -4.0, 2.0, 1.0])


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_oracle(method):
    np.testing.assert_allclose(merging.ties([T1, T2], [1.0, 1.0], 0.5, method), [3.0, -3.0, 2.0, 0.0])
    np.testing.assert_allclose(merging.ties([T1, T2], [0.5, 2.0], 0.5, method), [1.5, -4.5, 4.0, 0.0])


def test_total_and_frequency_elect_differently():
    t = jnp.array([[5.0], [-1.0], [-1.0]])
    np.testing.assert_allclose(merging.ties(t, [1.0, 1.0, 1.0], 1.0, "total"), [5.0])
    np.testing.assert_allclose(merging.ties(t, [1.0, 1.0, 1.0], 1.0, "frequency"), [-1.0])


def test_magnitude_keeps_floor_density_numel():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    kept = merging.prune(x, 0.25, "magnitude")
    assert int(jnp.sum(kept != 0)) == 2
    assert set(np.abs(np.asarray(kept)[np.asarray(kept) != 0])) == set(np.sort(np.abs(np.asarray(x)).ravel())[-2:])
    np.testing.assert_array_equal(merging.prune(x, 1.0, "magnitude"), x)


def test_density_one_is_sign_election_and_weighted_disjoint_merge():
    stack = jnp.stack([T1, T2])
    expected = merging.disjoint_merge(stack * jnp.array([[0.5], [2.0]]), merging.majority_sign_mask(stack))
    np.testing.assert_allclose(merging.ties(stack, [0.5, 2.0], 1.0), expected)


def test_dare_with_masks_and_in_expectation():
    masks = [jnp.array([True, False, True, True]), jnp.array([False, False, True, True])]
    out = merging.dare_linear([T1, T2], [1.0, 2.0], 0.5, masks=masks)
    np.testing.assert_allclose(out, (T1 * masks[0] + 2 * T2 * masks[1]) / 0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 64))
    w = jnp.array([0.5, -1.0, 2.0])
    draws = jax.vmap(lambda k: merging.dare_linear(x, w, 0.3, key=k))(jax.random.split(jax.random.PRNGKey(2), 2000))
    mean = jnp.mean(draws, axis=0)
    target = merging.task_arithmetic(x, w)
    assert float(jnp.linalg.norm(mean - target) / jnp.linalg.norm(target)) < 0.03 * 3   # 2k draws, 64 entries
    pruned = merging.prune(x[0], 0.3, "random", rescale=True, key=jax.random.PRNGKey(3))
    kept = np.asarray(pruned) != 0
    np.testing.assert_allclose(np.asarray(pruned)[kept], np.asarray(x[0])[kept] / 0.3, rtol=1e-6)


def test_primitive_errors():
    with pytest.raises(ValueError, match="density must be a float in"):
        merging.prune(T1, 1.5, "magnitude")
    with pytest.raises(ValueError, match="exactly one of mask= or key="):
        merging.prune(T1, 0.5, "random")
    with pytest.raises(ValueError, match="expected 2 weights"):
        merging.task_arithmetic([T1, T2], [1.0])
    with pytest.raises(ValueError, match="majority_sign_method"):
        merging.majority_sign_mask(jnp.stack([T1, T2]), "mean")


# ------------------------------------------------------------------ merge_adapters on trees
class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, use_bias=False, name="down")(jnp.tanh(nn.Dense(10, use_bias=False, name="up")(x)))


X = jax.random.normal(jax.random.PRNGKey(9), (3, 8))
BASE = Mlp().init(jax.random.PRNGKey(0), X)["params"]
PATHS = ("up/kernel", "down/kernel")


def adapter(seed, rank=3, alpha=6.0, target=r"(up|down)/kernel", **options):
    spec = jpeft.Spec({target: jpeft.LoRA(rank=rank, alpha=alpha, **options)})
    tree = jpeft.init(jax.random.PRNGKey(seed), BASE, spec)
    key = jax.random.PRNGKey(100 + seed)

    def randomise(node):
        nonlocal key
        key, ka, kb = jax.random.split(key, 3)
        a, b = node.train["a"], node.train["b"]
        return node.replace(train={"a": jax.random.normal(ka, a.shape), "b": jax.random.normal(kb, b.shape)})

    return jax.tree.map(lambda x: randomise(x) if jpeft.is_adapter(x) else x, tree, is_leaf=jpeft.is_adapter), spec


def delta(tree, path):
    node = tree[path.split("/")[0]]["kernel"]
    return node.method.scale * (node.train["a"] @ node.train["b"])


def test_cat_is_exact_and_runs_both_paths():
    (t1, s1), (t2, s2) = adapter(1, rank=3, alpha=6.0), adapter(2, rank=2, alpha=1.0)
    merged = merge_adapters([t1, t2], [s1, s2], [0.5, -2.0], "cat")
    for path in PATHS:
        np.testing.assert_allclose(delta(merged.params, path), 0.5 * delta(t1, path) - 2.0 * delta(t2, path),
                                   atol=1e-5)
    assert merged.params["up"]["kernel"].method == jpeft.LoRA(rank=5, alpha=5.0)
    dense = {"up": {"kernel": BASE["up"]["kernel"] + delta(merged.params, "up/kernel")},
             "down": {"kernel": BASE["down"]["kernel"] + delta(merged.params, "down/kernel")}}
    expected = Mlp().apply({"params": dense}, X)
    np.testing.assert_allclose(Mlp().apply({"params": jpeft.apply(merged.params, merged.spec)}, X), expected, atol=1e-5)
    np.testing.assert_allclose(jpeft.factored(Mlp().apply, merged.spec)({"params": merged.params}, X), expected,
                               atol=1e-5)
    trainable, _ = jpeft.split(merged.params)
    assert jax.tree.leaves(trainable)   # the merged adapter trains on like any LoRA tree


def test_linear_has_peft_cross_terms():
    (t1, s), (t2, _) = adapter(1), adapter(2)
    w = [0.7, -0.3]
    merged = merge_adapters([t1, t2], s, w, "linear")
    for path in PATHS:
        n1, n2 = (t[path.split("/")[0]]["kernel"] for t in (t1, t2))
        c = [wi * n.method.scale for wi, n in zip(w, (n1, n2))]
        a = sum(np.sign(ci) * np.sqrt(abs(ci)) * n.train["a"] for ci, n in zip(c, (n1, n2)))
        b = sum(np.sqrt(abs(ci)) * n.train["b"] for ci, n in zip(c, (n1, n2)))
        np.testing.assert_allclose(delta(merged.params, path), a @ b, atol=1e-5)
        exact = w[0] * delta(t1, path) + w[1] * delta(t2, path)
        assert float(jnp.max(jnp.abs(delta(merged.params, path) - exact))) > 1e-2


def test_single_adapter_is_linear_and_negative_weight_flips_a():
    t, s = adapter(1)
    merged = merge_adapters([t], s, [-0.5])   # "svd" by default, resolved to "linear"
    node, old = merged.params["up"]["kernel"], t["up"]["kernel"]
    np.testing.assert_allclose(delta(merged.params, "up/kernel"), -0.5 * delta(t, "up/kernel"), atol=1e-5)
    assert float(jnp.min(node.train["b"] * old.train["b"])) >= 0   # b keeps its sign, a carries the minus
    with pytest.raises(ValueError, match="one adapter tree: the combination is 'linear'.*svd_rank"):
        merge_adapters([t], s, [1.0], "svd", svd_rank=2)


def test_svd_default_single_scaling_compat_double_and_eckart_young():
    (t1, s1), (t2, s2) = adapter(1, alpha=6.0), adapter(2, rank=2, alpha=1.0)
    w = [0.8, 1.5]
    full = merge_adapters([t1, t2], [s1, s2], w, "svd", svd_rank=5)
    old = merge_adapters([t1, t2], [s1, s2], w, "svd", svd_rank=5, compat="peft@5d602fd")
    small = merge_adapters([t1, t2], [s1, s2], w, "svd", svd_rank=2)
    assert merge_adapters([t1, t2], [s1, s2], w).params["up"]["kernel"].method.rank == 3   # max rank
    for path in PATHS:
        exact = w[0] * delta(t1, path) + w[1] * delta(t2, path)
        np.testing.assert_allclose(delta(full.params, path), exact, atol=1e-4)
        s_ = [t[path.split("/")[0]]["kernel"].method.scale for t in (t1, t2)]
        np.testing.assert_allclose(delta(old.params, path),
                                   w[0] * s_[0] * delta(t1, path) + w[1] * s_[1] * delta(t2, path), atol=1e-4)
        a = full.params[path.split("/")[0]]["kernel"].train["a"]
        np.testing.assert_allclose(a.T @ a, np.eye(5), atol=1e-5)   # paper A_new A_newᵀ = I
        u, sv, vh = np.linalg.svd(np.asarray(exact))
        np.testing.assert_allclose(delta(small.params, path), (u[:, :2] * sv[:2]) @ vh[:2], atol=1e-4)


def test_svd_clamp_bounds_the_factors_at_their_quantile():
    (t1, s), (t2, _) = adapter(1), adapter(2)
    merged = merge_adapters([t1, t2], s, [1.0, 1.0], "svd", svd_clamp=0.9)
    plain = merge_adapters([t1, t2], s, [1.0, 1.0], "svd")
    node, free = merged.params["up"]["kernel"], plain.params["up"]["kernel"]
    hi = np.quantile(np.concatenate([np.ravel(free.train["a"]), np.ravel(free.train["b"])]), 0.9)
    np.testing.assert_allclose(node.train["a"], np.clip(free.train["a"], -hi, hi), atol=1e-5)
    np.testing.assert_allclose(node.train["b"], np.clip(free.train["b"], -hi, hi), atol=1e-5)
    assert float(jnp.max(jnp.abs(free.train["b"]))) > hi + 0.1   # the clamp bites


def test_ties_svd_reproduces_the_oracle_before_svd():
    """M.2 (f): the TIES vectors as 1×4 ΔWs (rank-1 adapters `a = 1`, `b = T`, scale 1)."""
    base = {"w": jnp.zeros((1, 4))}
    spec = jpeft.Spec({"w": jpeft.LoRA(rank=1, alpha=1.0)})
    trees = []
    for t in (T1, T2):
        tree = jpeft.init(jax.random.PRNGKey(0), base, spec)
        trees.append({"w": tree["w"].replace(train={"a": jnp.ones((1, 1)), "b": t[None]})})
    merged = merge_adapters(trees, spec, [1.0, 1.0], "ties_svd", density=0.5)
    np.testing.assert_allclose(merged.params["w"].train["a"] @ merged.params["w"].train["b"], [[3.0, -3.0, 2.0, 0.0]],
                               atol=1e-5)


def test_dare_from_a_key_is_reproducible_and_masks_must_fit():
    (t1, s), (t2, _) = adapter(1), adapter(2)
    one = merge_adapters([t1, t2], s, [1.0, 1.0], "dare_ties", density=0.5, key=jax.random.PRNGKey(0))
    two = merge_adapters([t1, t2], s, [1.0, 1.0], "dare_ties", density=0.5, key=jax.random.PRNGKey(0))
    other = merge_adapters([t1, t2], s, [1.0, 1.0], "dare_ties", density=0.5, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(delta(one.params, "up/kernel"), delta(two.params, "up/kernel"))
    assert not np.allclose(delta(one.params, "up/kernel"), delta(other.params, "up/kernel"))
    with pytest.raises(ValueError, match="exactly one of key= or masks="):
        merge_adapters([t1, t2], s, [1.0, 1.0], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match=r"masks\['up/kernel'\]\['a'\]: expected 2 masks of shape \(8, 3\)"):
        merge_adapters([t1, t2], s, [1.0, 1.0], "dare_linear", density=0.5,
                       masks={"up/kernel": {"a": [np.ones((3, 8), bool)] * 2, "b": []},
                              "down/kernel": {"a": [np.ones((10, 3), bool)] * 2, "b": [np.ones((3, 6), bool)] * 2}})


def test_leaves_one_tree_does_not_adapt_take_the_others():
    (t1, s1), (t2, s2) = adapter(1, target="up/kernel"), adapter(2)
    merged = merge_adapters([t1, t2], [s1, s2], [2.0, 0.5], "cat")
    np.testing.assert_allclose(delta(merged.params, "down/kernel"), 0.5 * delta(t2, "down/kernel"), atol=1e-5)
    np.testing.assert_allclose(delta(merged.params, "up/kernel"),
                               2.0 * delta(t1, "up/kernel") + 0.5 * delta(t2, "up/kernel"), atol=1e-5)


def test_scanned_stack_is_merged_layer_by_layer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(8, name="proj")(x)), None

    Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    base = Stack(name="stack").init(jax.random.PRNGKey(0), X, None)["params"]
    spec = jpeft.Spec({r"proj/kernel": jpeft.LoRA(rank=2, alpha=2.0)},
                      views={"proj/kernel": jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))})
    trees = []
    for seed in (1, 2):
        tree = jpeft.init(jax.random.PRNGKey(seed), base, spec)
        node = tree["proj"]["kernel"]
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 10))
        trees.append({**tree, "proj": {**tree["proj"], "kernel": node.replace(train={
            "a": jax.random.normal(k1, node.train["a"].shape), "b": jax.random.normal(k2, node.train["b"].shape)})}})
    merged = merge_adapters(trees, spec, [1.0, 1.0], "ties", density=0.5)
    node = merged.params["proj"]["kernel"]
    assert node.train["a"].shape == (3, 8, 2) and node.view == trees[0]["proj"]["kernel"].view
    for layer in range(3):   # each layer is its own tensor for the top-k, as PEFT's modules
        a_l = [t["proj"]["kernel"].train["a"][layer] for t in trees]
        np.testing.assert_allclose(node.train["a"][layer], merging.ties(a_l, [1.0, 1.0], 0.5), atol=1e-6)


def test_bad_input_is_refused_clearly():
    (t1, s), (t2, _) = adapter(1), adapter(2)
    with pytest.raises(ValueError, match="1 weights for 2 adapter trees"):
        merge_adapters([t1, t2], s, [1.0])
    with pytest.raises(ValueError, match="combination_type must be one of"):
        merge_adapters([t1, t2], s, [1.0, 1.0], "mean")
    with pytest.raises(ValueError, match=r"'linear' does not use \['density'\]"):
        merge_adapters([t1, t2], s, [1.0, 1.0], "linear", density=0.5)
    with pytest.raises(ValueError, match="density must be a float"):
        merge_adapters([t1, t2], s, [1.0, 1.0], "ties")
    (t3, s3) = adapter(3, rank=2)
    with pytest.raises(ValueError, match=r"needs every adapter at one rank, got ranks \[3, 2\]"):
        merge_adapters([t1, t3], [s, s3], [1.0, 1.0], "linear")
    dora_spec = jpeft.Spec({r"(up|down)/kernel": jpeft.DoRA(rank=3)})
    dora = jpeft.init(jax.random.PRNGKey(0), BASE, dora_spec)
    with pytest.raises(ValueError, match="tree 1: (up|down)/kernel holds a 'dora' adapter"):
        merge_adapters([t1, dora], [s, dora_spec], [1.0, 1.0])
    pissa_spec = jpeft.Spec({r"(up|down)/kernel": jpeft.PiSSA(rank=3)})
    pissa = jpeft.init(jax.random.PRNGKey(0), BASE, pissa_spec)
    with pytest.raises(ValueError, match="differs between tree 0 and tree 1: the adapters must share one frozen base"):
        merge_adapters([t1, pissa], [s, pissa_spec], [1.0, 1.0])
    with pytest.raises(jpeft.SpecError, match="pass the Spec the tree was built with"):
        merge_adapters([t1, t2], jpeft.Spec({r"(up|down)/kernel": jpeft.LoRA(rank=3)}), [1.0, 1.0])
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda a, b: merge_adapters([a, b], s, [1.0, 1.0]).params)(t1, t2)
