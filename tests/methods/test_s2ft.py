"""S2FT oracles: gradients and changes only on the selected slices,
co-permutation leaves the network unchanged, structured selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods import s2ft
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


@pytest.mark.parametrize("axis, group, units", [("in", 1, 5), ("out", 4, 3)])
def test_only_the_selected_slices_train(axis, group, units):
    method = s2ft.S2FT(axis=axis, group=group, units=units)
    w = kernel()
    node = node_for(method, w)
    sel = np.asarray(node.frozen["sel"])
    assert sel.shape == (units * group,) and np.all(np.diff(sel) > 0)
    assert np.all(sel.reshape(units, group) - sel.reshape(units, group)[:, :1] == np.arange(group))  # whole groups
    other = M_OUT if axis == "in" else N_IN
    assert jpeft.count({"w": node}).trainable == units * group * other
    np.testing.assert_array_equal(method.materialise(node), w)
    # the gradient of the effective weight reaches the parameters only through the slices
    x = jax.random.normal(jax.random.PRNGKey(1), (8, N_IN))
    loss = lambda t: jnp.sum(jnp.sin(method.matmul(node.replace(train=t), x)))  # noqa: E731
    g = jax.grad(loss)(node.train)["s2"]
    G = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(w)
    np.testing.assert_allclose(g, G[sel, :] if axis == "in" else G[:, sel], rtol=1e-5, atol=1e-6)
    moved = node.replace(train={"s2": jnp.ones_like(node.train["s2"])})
    changed = np.asarray(method.materialise(moved) != w)
    mask = np.zeros_like(changed)
    if axis == "in":
        mask[sel, :] = True
    else:
        mask[:, sel] = True
    np.testing.assert_array_equal(changed, mask)
    d = method.sparse_delta(moved)
    np.testing.assert_allclose(d.dense_kernel(), method.materialise(moved) - w, atol=1e-6)


def test_weight_selection_picks_the_largest_groups():
    w = kernel().at[:, 8:12].multiply(10.0).at[:, 40:44].multiply(5.0)
    node = node_for(s2ft.S2FT(axis="out", group=4, units=2, selection="weight"), w)
    np.testing.assert_array_equal(node.frozen["sel"], [8, 9, 10, 11, 40, 41, 42, 43])
    grad_node = node_for(s2ft.S2FT(axis="in", units=3, selection="grad"), kernel(),
                         calib=kernel(seed=2).at[7].mul(50.0))
    assert 7 in np.asarray(grad_node.frozen["sel"])
    with pytest.raises(jpeft.AdapterError, match="not a multiple of group=5"):
        node_for(s2ft.S2FT(axis="in", group=5), kernel())


def test_copermutation_leaves_the_mlp_unchanged():
    up, down = kernel(seed=1, shape=(N_IN, M_OUT)), kernel(seed=2, shape=(M_OUT, N_IN))
    x = jax.random.normal(jax.random.PRNGKey(3), (6, N_IN))
    mlp = lambda u, d: jax.nn.silu(x @ u) @ d  # noqa: E731
    sel = jnp.asarray([3, 17, 30, 44])
    perm = s2ft.contiguous_permutation(sel, M_OUT)
    np.testing.assert_array_equal(perm[:4], sel)
    assert sorted(np.asarray(perm).tolist()) == list(range(M_OUT))
    up_p, down_p = s2ft.copermute(up, down, perm)
    np.testing.assert_allclose(mlp(up_p, down_p), mlp(up, down), rtol=1e-5, atol=1e-5)
