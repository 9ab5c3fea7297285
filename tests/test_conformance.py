"""Shared properties every method configuration in the conformance table must satisfy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jpeft
from jpeft.shared import attach_shared
from jpeft.views import materialise_node
from tests.conformance_table import CASES, adapted, base_params, calib_grads, forward, inputs, loss, spec_for, targets

ids = [c.id for c in CASES]
parametrize = pytest.mark.parametrize("case", CASES, ids=ids)


def adapter_nodes(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=jpeft.is_adapter) if isinstance(x, jpeft.Adapter)]


def test_every_registered_method_has_a_row():
    assert set(jpeft.methods()) <= {c.registry for c in CASES}


@parametrize
def test_identity_at_init_is_exactly_what_the_config_claims(case):
    """`method.identity_at_init` (per config) is true exactly when `apply(init(w)) == w`: within
    the row's tolerance where claimed, and visibly different where not."""
    params, spec, ad = adapted(case)
    eff = jpeft.apply(ad, spec)
    pairs = list(zip(jax.tree.leaves(eff), jax.tree.leaves(params)))
    if not case.method.identity_at_init:
        assert max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in pairs) > 0, \
            f"{case.method!r} claims no identity at init but is the identity"
        return
    for got, want in pairs:
        if case.tolerance == "exact":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@parametrize
def test_init_is_deterministic_per_key(case):
    _, _, a1 = adapted(case, seed=3)
    _, _, a2 = adapted(case, seed=3)
    jax.tree.map(np.testing.assert_array_equal, a1, a2)


@parametrize
def test_factored_equals_materialised(case):
    """Outputs and gradients of `method.matmul` equal those of `x @ materialise` (fp32)."""
    _, _, ad = adapted(case)
    for node in attach_shared(adapter_nodes(ad)):  # model-level state lent as jpeft.apply does
        node = perturbed(node)
        x = jax.random.normal(jax.random.PRNGKey(5), (16, materialise_node(node).shape[0]))
        dense = lambda n, x=x: x @ materialise_node(n)  # noqa: E731   (a quantised base dequantised)
        fact = lambda n, x=x: n.method.matmul(n, x)  # noqa: E731
        assert (fact(node) is not None) == case.factored
        if not case.factored:
            continue
        np.testing.assert_allclose(fact(node), dense(node), rtol=1e-5, atol=1e-5)
        g_dense = jax.grad(lambda t, dense=dense, node=node: jnp.sum(jnp.sin(dense(node.replace(train=t)))))(node.train)
        g_fact = jax.grad(lambda t, fact=fact, node=node: jnp.sum(jnp.sin(fact(node.replace(train=t)))))(node.train)
        for gf, gd in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_dense)):
            scale = float(jnp.max(jnp.abs(gd)))
            np.testing.assert_allclose(gf, gd, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def perturbed(node):
    """Move every trainable leaf off its init so that identities are not trivially true."""
    keys = iter(jax.random.split(jax.random.PRNGKey(7), len(jax.tree.leaves(node.train))))
    bump = lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape, v.dtype)  # noqa: E731
    return node.replace(train={k: jax.tree.map(bump, v) for k, v in node.train.items()})  # nested: shared state


@parametrize
def test_gradients_reach_only_trainable_leaves(case):
    _, spec, ad = adapted(case)
    trainable, frozen = jpeft.split(ad)
    x, y = inputs(), targets()
    grads = jax.grad(lambda t: loss(jpeft.apply(jpeft.combine(t, frozen), spec), x, y))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for node in adapter_nodes(trainable):
        assert node.base is None and not jax.tree.leaves(node.frozen)
        assert set(node.train) and all(v is not None for v in node.train.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
    # Every frozen leaf, including untargeted kernels and biases, stays out of the trainable tree.
    assert jpeft.count(ad).trainable == sum(int(np.size(v)) for v in jax.tree.leaves(trainable))
    assert trainable["blk"]["q_proj"]["bias"] is None and trainable["blk"]["o_proj"]["kernel"] is None


@parametrize
def test_optax_steps_change_the_output_and_only_trainable_leaves(case):
    _, spec, ad = adapted(case)
    trainable, frozen = jpeft.split(ad)
    x, y = inputs(), targets()
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        value, g = jax.value_and_grad(lambda t: loss(jpeft.apply(jpeft.combine(t, frozen), spec), x, y))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    t = trainable
    losses = []
    for _ in range(5):
        t, opt_state, value = step(t, opt_state)
        losses.append(float(value))
    before = forward(jpeft.apply(ad, spec), x)
    after = forward(jpeft.apply(jpeft.combine(t, frozen), spec), x)
    assert float(jnp.max(jnp.abs(after - before))) > 1e-3
    assert losses[-1] < losses[0]


@parametrize
def test_merge_equals_apply(case):
    _, spec, ad = adapted(case)
    nodes_perturbed = jax.tree.map(lambda n: perturbed(n) if isinstance(n, jpeft.Adapter) else n, ad,
                                   is_leaf=jpeft.is_adapter)
    merged, applied = jpeft.merge(nodes_perturbed, spec), jpeft.apply(nodes_perturbed, spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged, applied)
    assert all(not isinstance(v, jpeft.Adapter) for v in jax.tree.leaves(merged, is_leaf=jpeft.is_adapter))


@parametrize
def test_spec_json_roundtrip(case):
    spec = spec_for(case)
    again = jpeft.Spec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    params, _, ad = adapted(case)
    calib = calib_grads(params) if case.calib else None
    ad2 = jpeft.init(jax.random.PRNGKey(0), params, again, calib=calib)
    jax.tree.map(np.testing.assert_array_equal, ad, ad2)


@parametrize
def test_orbax_roundtrip(case, tmp_path):
    _, spec, ad = adapted(case)
    ad = jax.tree.map(lambda n: perturbed(n) if isinstance(n, jpeft.Adapter) else n, ad, is_leaf=jpeft.is_adapter)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", ad)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: ad))
    assert jax.tree.structure(restored) == jax.tree.structure(ad)
    jax.tree.map(np.testing.assert_array_equal, restored, ad)


# ------------------------------------------------------------------------------ bad input
def _init_leaf(method, leaf):
    params = {"blk": {"q_proj": {"kernel": leaf}}}
    return jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec({r"blk/q_proj/kernel": method}))


@parametrize
def test_bad_input_non_float_leaf(case):
    with pytest.raises(jpeft.AdapterError, match=r"blk/q_proj/kernel.*\(32, 48\).*int32.*floating"):
        _init_leaf(case.method, jnp.ones((32, 48), jnp.int32))


@parametrize
def test_bad_input_non_matrix_leaf(case):
    if case.registry == "full":  # Full trains any float leaf, whatever its ndim.
        assert jpeft.count(_init_leaf(case.method, jnp.ones((4, 3, 2)))).trainable == 24
        return
    # an N-D kernel is adapted through a declared view (tests/test_any_model.py); without one the
    # error names the path and shape and shows a view to declare
    with pytest.raises(jpeft.AdapterError, match=r"blk/q_proj/kernel.*\(4, 3, 2\).*3-D kernel needs a View.*"
                                                 r"jpeft\.View\(inputs="):
        _init_leaf(case.method, jnp.ones((4, 3, 2)))


@parametrize
def test_bad_input_rank_too_large(case):
    rank = getattr(case.method, "rank", None)
    if rank is None:  # Full, or a method without a rank option (e.g. the sparse families): nothing to bound
        assert case.registry == "full" or not hasattr(case.method, "rank")
        return
    with pytest.raises(jpeft.AdapterError, match=rf"blk/q_proj/kernel.*\(3, 48\).*rank {rank}.*min\(in, out\) = 3"):
        _init_leaf(case.method, jnp.ones((3, 48)))


@pytest.mark.parametrize("case", [c for c in CASES if c.calib], ids=[c.id for c in CASES if c.calib])
def test_bad_input_missing_or_misshapen_calibration(case):
    params = base_params()
    with pytest.raises(jpeft.AdapterError, match=r"blk/(q|v)_proj/kernel.*calibration gradient"):
        jpeft.init(jax.random.PRNGKey(0), params, spec_for(case))
    bad = jax.tree.map(lambda g: g[:-1], calib_grads(params))
    with pytest.raises(jpeft.AdapterError, match=r"blk/(q|v)_proj/kernel.*calibration gradient has shape"):
        jpeft.init(jax.random.PRNGKey(0), params, spec_for(case), calib=bad)


HOOKED = [c for c in CASES if c.method.step_hook is not None]


@pytest.mark.parametrize("case", HOOKED, ids=[c.id for c in HOOKED])
def test_step_hooks_are_jittable_and_keep_every_shape(case):
    """`jpeft.after_step` with the row's hook, under `jax.jit` (the step a traced array, so one
    compile serves every step): the same values as eagerly, and the adapted tree and optimizer
    state keep their structure, shapes and dtypes (hooks mask, never resize)."""
    _, spec, ad = adapted(case)
    trainable, frozen = jpeft.split(ad)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    x, y = inputs(), targets()
    grads = jax.grad(lambda t: loss(jpeft.apply(jpeft.combine(t, frozen), spec), x, y))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    params = jpeft.combine(optax.apply_updates(trainable, updates), frozen)
    hook = jax.jit(lambda p, s, step, key: jpeft.after_step(p, s, spec, step=step, key=key, grads=grads))
    shapes = lambda tree: jax.tree.map(lambda v: (np.shape(v), jnp.result_type(v)), tree)  # noqa: E731
    want_shapes = shapes((params, opt_state))
    for step in range(1, 5):
        key = jax.random.PRNGKey(step)
        got = hook(params, opt_state, jnp.asarray(step), key)
        assert jax.tree.structure(got) == jax.tree.structure((params, opt_state))
        assert shapes(got) == want_shapes, f"step {step}: the hook changed a shape or dtype"
        eager = jpeft.after_step(params, opt_state, spec, step=step, key=key, grads=grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, eager)
        params, opt_state = got
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params) if jnp.issubdtype(v.dtype, jnp.inexact))
