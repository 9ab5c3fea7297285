"""S2-LoRA oracles: factors shared per shape, per-layer rank gates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.methods.bank import S2LoRA
from jpeft.shared import attach_shared
from tests.methods.helpers import kernel

R = 4
SHAPES = [(32, 48), (32, 48), (48, 32), (32, 48)]


def tree_for(method, seed=0):
    params = {f"l{i}": {"kernel": kernel(seed=i, shape=s)} for i, s in enumerate(SHAPES)}
    spec = jpeft.Spec({r"l\d/kernel": method})
    return spec, jpeft.init(jax.random.PRNGKey(seed), params, spec)


def perturbed(tree):
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda n: n.replace(train=jax.tree.map(
                            lambda v: v + rng.standard_normal(v.shape).astype(v.dtype), n.train))
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


def test_identity_at_init_and_counts():
    spec, tree = tree_for(S2LoRA(rank=R, alpha=8.0))
    for leaf, base in zip(jax.tree.leaves(jpeft.apply(tree, spec)), jax.tree.leaves(jax.tree.map(
            lambda n: n.base, tree, is_leaf=jpeft.is_adapter))):
        np.testing.assert_array_equal(leaf, base)
    groups = {(32, 48), (48, 32)}
    assert jpeft.count(tree).trainable == sum(R * (n + m) for n, m in groups) + R * len(SHAPES)
    shared = tree["l0"]["kernel"].train["shared"]
    assert set(shared) == {"32x48", "48x32"} and not np.any(shared["32x48"]["b"])
    assert float(jnp.max(jnp.abs(shared["32x48"]["a"]))) <= 1 / 32 ** 0.5
    np.testing.assert_array_equal(tree["l1"]["kernel"].train["lam"], 1.0)


def test_every_delta_lies_in_the_span_of_the_shared_factors(x64):
    method = S2LoRA(rank=R, alpha=8.0)
    _, tree = tree_for(method)
    nodes = attach_shared([perturbed(tree)[f"l{i}"]["kernel"] for i in range(len(SHAPES))])
    for node in nodes:
        g = node.train["shared"]["x".join(map(str, node.base.shape))]
        delta = np.asarray(method.delta(node), np.float64)  # ΔK = s·a·diag(λ)·b
        b = np.asarray(g["b"], np.float64)
        np.testing.assert_allclose(delta @ np.linalg.pinv(b) @ b, delta, atol=1e-9)  # paper: columns in span(B)
        want = method.scale * np.asarray(g["a"]) * np.asarray(node.train["lam"]) @ b
        np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-6)
    # Same-shape layers share the identical factor objects; layers differ only by λ.
    assert nodes[1].train["shared"]["32x48"]["a"] is nodes[0].train["shared"]["32x48"]["a"]


def test_proximal_hook_soft_thresholds_lambda():
    method = S2LoRA(rank=R, alpha=8.0, threshold=0.3)
    spec, tree = tree_for(method)
    assert S2LoRA(rank=R).step_hook is None and method.step_hook is not None
    lam = jnp.array([1.0, -0.2, 0.1, -0.9])
    tree = jax.tree.map(lambda n: n.replace(train={**n.train, "lam": lam}) if isinstance(n, jpeft.Adapter) else n,
                        tree, is_leaf=jpeft.is_adapter)
    trainable, frozen = jpeft.split(tree)
    opt_state = optax.adam(1e-3).init(trainable)
    new, new_state = jpeft.after_step(tree, opt_state, spec, step=1, key=jax.random.PRNGKey(0))
    for i in range(len(SHAPES)):
        np.testing.assert_allclose(new[f"l{i}"]["kernel"].train["lam"], [0.7, 0.0, 0.0, -0.6], atol=1e-7)
    assert "shared" in new["l0"]["kernel"].train and "shared" not in new["l1"]["kernel"].train
    jax.tree.map(np.testing.assert_array_equal, new_state, opt_state)  # moments untouched
