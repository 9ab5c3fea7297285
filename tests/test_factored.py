"""`jpeft.factored(model.apply, spec)` equals the materialised path, outputs and gradients, for
every conformance case; non-Dense uses of an adapted leaf fall back to the materialised weight."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from tests.conformance_table import CASES


class Direct(nn.Module):
    """A module that reads its weight directly (no Dense): must get the materialised weight."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.normal(0.2), (x.shape[-1], 40))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(48, name="q_proj")(x))
        x = jnp.tanh(Direct(name="direct")(x))
        return nn.Dense(24, use_bias=False, name="v_proj")(x)


MODEL = Net()
X = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 32))
PARAMS = MODEL.init(jax.random.PRNGKey(0), X)["params"]
TARGET = r"(q_proj|v_proj)/kernel|direct/w"


def perturbed_tree(case):
    spec = jpeft.Spec({TARGET: case.method})
    calib = jax.grad(lambda p: jnp.sum(jnp.square(MODEL.apply({"params": p}, X))))(PARAMS) if case.calib else None
    tree = jpeft.init(jax.random.PRNGKey(1), PARAMS, spec, calib=calib)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))

    def bump(n):  # nested dicts: a method's shared state
        return n.replace(train={k: jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), v)
                                for k, v in n.train.items()})

    return spec, jax.tree.map(lambda n: bump(n) if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_factored_equals_materialised(case):
    spec, tree = perturbed_tree(case)
    trainable, frozen = jpeft.split(tree)
    run = jpeft.factored(MODEL.apply, spec)
    fact = lambda t: run({"params": jpeft.combine(t, frozen)}, X)  # noqa: E731
    mat = lambda t: MODEL.apply({"params": jpeft.apply(jpeft.combine(t, frozen), spec)}, X)  # noqa: E731
    np.testing.assert_allclose(jax.jit(fact)(trainable), mat(trainable), rtol=1e-5, atol=1e-5)
    g_fact = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(fact(t)))))(trainable)
    g_mat = jax.grad(lambda t: jnp.sum(jnp.sin(mat(t))))(trainable)
    for a, b in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_mat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


def test_factored_checks_the_spec():
    spec, tree = perturbed_tree(CASES[0])
    with pytest.raises(jpeft.SpecError, match="holds a lora adapter but the spec targets no such leaf"):
        jpeft.factored(MODEL.apply, jpeft.Spec({r"q_proj/kernel": CASES[0].method}))({"params": tree}, X)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(32, 48, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(48, 48, rngs=rngs)])
        self.w = nnx.Param(jax.random.normal(jax.random.PRNGKey(3), (48, 40)) * 0.2)  # not a Linear
        self.v_proj = nnx.Linear(40, 24, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.layers[0](jnp.tanh(self.q_proj(x))))
        return self.v_proj(jnp.tanh(x @ self.w[...]))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_nnx_factored_equals_materialised(case):
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    spec = jpeft.Spec({r"(q_proj|v_proj|layers/0)/kernel|w": case.method})
    forward = lambda s: nnx.merge(graphdef, s)(X)  # noqa: E731
    calib = jax.grad(lambda s: jnp.sum(jnp.square(forward(s))))(state) if case.calib else None
    tree = jpeft.init(jax.random.PRNGKey(1), state, spec, calib=calib)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    tree = jax.tree.map(lambda n: n.replace(train={k: jax.tree.map(
                                                       lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), v)
                                                   for k, v in n.train.items()})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)
    trainable, frozen = jpeft.split(tree)
    run = jpeft.factored_nnx(graphdef, spec)
    fact = lambda t: run(jpeft.combine(t, frozen), X)  # noqa: E731
    mat = lambda t: forward(jpeft.apply(jpeft.combine(t, frozen), spec))  # noqa: E731
    np.testing.assert_allclose(jax.jit(fact)(trainable), mat(trainable), rtol=1e-5, atol=1e-5)
    g_fact = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(fact(t)))))(trainable)
    g_mat = jax.grad(lambda t: jnp.sum(jnp.sin(mat(t))))(trainable)
    for a, b in zip(jax.tree.leaves(g_fact), jax.tree.leaves(g_mat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))
