"""Model-level shared state (`jpeft.shared`): stored once, lent to every leaf, trained by all."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.methods.base import Method
from tests.conformance_table import base_params, forward, inputs, targets


@dataclasses.dataclass(frozen=True)
class SharedScaleLoRA(Method):
    """A test-only method (not registered): `K' = K + a·diag(g)·b` with one `g` for all leaves."""

    name = "shared_scale_lora_test"
    rank: int = 3

    def create(self, key, w, calib=None):
        ka, kb = jax.random.split(key)
        return self.node(w, train={"b": 0.1 * jax.random.normal(kb, (self.rank, w.shape[1]))},
                         frozen={"a": jax.random.normal(ka, (w.shape[0], self.rank))})

    def create_shared(self, key, leaves):
        assert len(leaves) == 2
        return {"g": jnp.ones((self.rank,))}, {}

    def materialise(self, node, rng=None):
        return node.base + (node.frozen["a"] * node.train["shared"]["g"]) @ node.train["b"]


SPEC = jpeft.Spec({r"blk/(q|v)_proj/kernel": SharedScaleLoRA()})


def test_shared_state_is_stored_once_and_reaches_every_leaf():
    tree = jpeft.init(jax.random.PRNGKey(0), base_params(), SPEC)
    q, v = tree["blk"]["q_proj"]["kernel"], tree["blk"]["v_proj"]["kernel"]
    assert "shared" in q.train and "shared" not in v.train
    assert jpeft.count(tree).trainable == 3 + 3 * 48 + 3 * 32
    applied = jpeft.apply(tree, SPEC)
    np.testing.assert_allclose(applied["blk"]["v_proj"]["kernel"], v.base + v.frozen["a"] @ v.train["b"], rtol=1e-6)


def test_shared_gradient_sums_over_layers_and_training_updates_it_once():
    tree = jpeft.init(jax.random.PRNGKey(0), base_params(), SPEC)
    trainable, frozen = jpeft.split(tree)
    x, y = inputs(), targets()
    loss = lambda t: jnp.mean(jnp.square(forward(jpeft.apply(jpeft.combine(t, frozen), SPEC), x) - y))  # noqa: E731
    g = jax.grad(loss)(trainable)["blk"]["q_proj"]["kernel"].train["shared"]["g"]

    def loss_with_separate_gains(gq, gv):
        p = jpeft.combine(trainable, frozen)
        q, v = p["blk"]["q_proj"]["kernel"], p["blk"]["v_proj"]["kernel"]
        eff = base_params()
        eff["blk"]["q_proj"]["kernel"] = q.base + (q.frozen["a"] * gq) @ q.train["b"]
        eff["blk"]["v_proj"]["kernel"] = v.base + (v.frozen["a"] * gv) @ v.train["b"]
        return jnp.mean(jnp.square(forward(eff, x) - y))

    gq, gv = jax.grad(loss_with_separate_gains, argnums=(0, 1))(jnp.ones(3), jnp.ones(3))
    np.testing.assert_allclose(g, gq + gv, rtol=1e-5)
    tx = optax.sgd(0.1)
    updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable))
    stepped = optax.apply_updates(trainable, updates)
    np.testing.assert_allclose(stepped["blk"]["q_proj"]["kernel"].train["shared"]["g"], 1 - 0.1 * g, rtol=1e-6)
