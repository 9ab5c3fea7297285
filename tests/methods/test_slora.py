"""SLoRA oracles: three-factor LoRA `W + s·B N A`, all trainable, `B = 0`."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import SLoRA
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def test_identity_count_and_factored_form():
    w = kernel()
    method = SLoRA(rank=R, alpha=8.0)
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert set(node.train) == {"a", "core", "b"}
    assert jpeft.count({"w": node}).trainable == R * (N_IN + M_OUT) + R * R
    assert float(jnp.max(jnp.abs(node.train["a"]))) <= N_IN ** -0.5                 # Kaiming-uniform A
    assert float(jnp.max(jnp.abs(node.train["core"]))) <= R ** -0.5                 # Kaiming-uniform N
    node = node.replace(train={**node.train, "b": jax.random.normal(jax.random.PRNGKey(1), (R, M_OUT))})
    a, n, b = node.train["a"], node.train["core"], node.train["b"]
    np.testing.assert_allclose(method.materialise(node) - w, method.scale * a @ n.T @ b, atol=1e-5)  # (BNA)ᵀ
    x = jax.random.normal(jax.random.PRNGKey(2), (3, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), atol=1e-5)
