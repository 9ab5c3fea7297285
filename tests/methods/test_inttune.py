"""IntTune oracles: the NLoRA init, only the r×r core `N` trains."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from tests.methods.helpers import R, kernel, node_for


def test_only_the_core_trains_and_init_is_the_identity(x64):
    method = jpeft.method("inttune", rank=R)
    assert method.train_factors is False and method.name == "nlora"
    w = kernel()
    node = node_for(method, w)
    assert set(node.train) == {"core"} and set(node.frozen) == {"a", "b"}
    assert jpeft.count({"w": node}).trainable == R * R
    np.testing.assert_allclose(method.materialise(node), w, atol=1e-10)
    g = jax.grad(lambda t: jnp.sum(jnp.sin(method.materialise(node.replace(train=t)))))(node.train)
    assert set(g) == {"core"} and float(jnp.max(jnp.abs(g["core"]))) > 0
