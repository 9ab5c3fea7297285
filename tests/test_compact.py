"""`jpeft.compact` (jpeft/compact.py): masked ranks are sliced away at export, the merged weights
do not change, methods without `compact` pass through unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.compact import compact
from jpeft.methods.adaptive import AdaLoRA, SoRA, rank_pattern
from jpeft.methods.block import GraLoRA
from tests.conformance_table import base_params

TARGET = r"blk/(q_proj|v_proj)/kernel"


def masked_tree(method, gate, patterns, seed=0):
    """The toy model's tree with perturbed factors and the given zero patterns in the gate."""
    spec = jpeft.Spec({TARGET: method})
    params = jpeft.init(jax.random.PRNGKey(seed), base_params(), spec)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    for name, keep in zip(("q_proj", "v_proj"), patterns):
        node = params["blk"][name]["kernel"]
        train = {k: v + 0.1 * jax.random.normal(next(keys), v.shape) for k, v in node.train.items()}
        train[gate] = jnp.where(jnp.asarray(keep), train[gate] + 1.0, 0.0)
        params["blk"][name]["kernel"] = node.replace(train=train)
    return spec, params


@pytest.mark.parametrize("method, gate", [(AdaLoRA(init_r=6, target_r=2, total_step=10), "e"),
                                          (SoRA(rank=6), "g")])
def test_compact_keeps_merge_and_shrinks_shapes(method, gate):
    patterns = ([True, False, True, False, False, True], [False] * 5 + [True])
    spec, params = masked_tree(method, gate, patterns)
    small = compact(params, spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 jpeft.merge(small, spec), jpeft.merge(params, spec))
    for name, keep in zip(("q_proj", "v_proj"), patterns):
        node = small["blk"][name]["kernel"]
        r = sum(keep)
        n, m = node.base.shape
        assert node.train["a"].shape == (n, r) and node.train[gate].shape == (r,) and node.train["b"].shape == (r, m)
        assert all(v.shape[-1] == r or v.shape[0] == r for k, v in node.state.items())
        assert np.all(np.asarray(node.train[gate]) != 0)
    before, after = jpeft.count(params).trainable, jpeft.count(small).trainable
    assert after == sum(sum(k) for k in patterns) * (32 + 48 + 1) < before
    assert list(map(sum, rank_pattern(small).values())) == [3, 1]
    # The factored path of the compacted tree agrees too.
    node, full = small["blk"]["q_proj"]["kernel"], params["blk"]["q_proj"]["kernel"]
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32))
    np.testing.assert_allclose(method.matmul(node, x), method.matmul(full, x), rtol=1e-5, atol=1e-5)


def test_compact_after_adalora_training_follows_the_rank_pattern():
    """AdaLoRA's final mask (state["keep"]) is what survives compaction."""
    method = AdaLoRA(init_r=4, target_r=1, total_step=6, delta_t=1)
    spec = jpeft.Spec({TARGET: method})
    params = jpeft.init(jax.random.PRNGKey(0), base_params(), spec)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    params = jax.tree.map(lambda n: n.replace(train={k: v + jax.random.normal(next(keys), v.shape)
                                                     for k, v in n.train.items()})
                          if isinstance(n, jpeft.Adapter) else n, params, is_leaf=jpeft.is_adapter)
    trainable, _ = jpeft.split(params)
    for step in range(1, 8):
        grads = jax.tree.map(lambda v, step=step: jax.random.normal(jax.random.PRNGKey(step), v.shape), trainable)
        params, _ = jpeft.after_step(params, {}, spec, step=step, key=jax.random.PRNGKey(0), grads=grads)
    keeps = [np.asarray(params["blk"][n]["kernel"].state["keep"]) for n in ("q_proj", "v_proj")]
    assert sum(int(k.sum()) for k in keeps) == 2  # b_T = target_r · #matrices
    small = compact(params, spec)
    for name, keep in zip(("q_proj", "v_proj"), keeps):
        assert small["blk"][name]["kernel"].train["e"].shape == (int(keep.sum()),)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 jpeft.merge(small, spec), jpeft.merge(params, spec))


@pytest.mark.parametrize("method", [jpeft.LoRA(rank=4), GraLoRA(rank=4, alpha=8, k=2)])
def test_methods_without_compact_pass_through(method):
    spec = jpeft.Spec({TARGET: method})
    params = jpeft.init(jax.random.PRNGKey(0), base_params(), spec)
    small = compact(params, spec)
    assert jax.tree.structure(small) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(params)):
        assert a is b


def test_compact_checks_the_spec():
    spec = jpeft.Spec({TARGET: SoRA(rank=4)})
    params = jpeft.init(jax.random.PRNGKey(0), base_params(), spec)
    with pytest.raises(jpeft.SpecError, match="spec says"):
        compact(params, jpeft.Spec({TARGET: SoRA(rank=2)}))


def test_fully_masked_node_compacts_to_rank_zero():
    method = SoRA(rank=4)
    spec, params = masked_tree(method, "g", ([False] * 4, [True] * 4))
    small = compact(params, spec)
    assert small["blk"]["q_proj"]["kernel"].train["a"].shape == (32, 0)
    np.testing.assert_array_equal(jpeft.merge(small, spec)["blk"]["q_proj"]["kernel"],
                                  base_params()["blk"]["q_proj"]["kernel"])


def test_compact_is_a_top_level_function():
    assert jpeft.compact is compact
