"""DoRA oracles."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.dora import column_norms, factored_column_norms
from tests.methods.helpers import M_OUT, R, kernel, node_for


def perturbed_dora(seed=1):
    method = jpeft.DoRA(rank=R, alpha=8)
    node = node_for(method, kernel())
    b = jax.random.normal(jax.random.PRNGKey(seed), (R, M_OUT))
    m = node.train["m"] * (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 1), (M_OUT,)))
    return method, node.replace(train={**node.train, "b": b, "m": m})


def test_identity_at_init_and_magnitude_is_the_column_norm(x64):
    w = kernel()
    method = jpeft.DoRA(rank=R, alpha=8)
    node = node_for(method, w)
    np.testing.assert_allclose(method.materialise(node), w, rtol=1e-12)
    np.testing.assert_allclose(node.train["m"], jnp.linalg.norm(w, axis=0), rtol=1e-12)


def test_every_output_unit_has_norm_equal_to_its_magnitude(x64):
    method, node = perturbed_dora()
    np.testing.assert_allclose(jnp.linalg.norm(method.materialise(node), axis=0), node.train["m"], rtol=1e-12)


def test_magnitude_gradient_uses_the_stop_gradient_norm(x64):
    """∂L/∂m = Σ_in G ⊙ V̂ with V̂ the unit-norm direction (the norm is a constant)."""
    method, node = perturbed_dora()
    g = kernel(seed=9)
    grads = jax.grad(lambda t: jnp.sum(g * method.materialise(node.replace(train=t))))(node.train)
    direction = node.base + method.delta(node)
    v_hat = direction / jnp.linalg.norm(direction, axis=0)
    np.testing.assert_allclose(grads["m"], jnp.sum(g * v_hat, axis=0), rtol=1e-10)


def test_factored_column_norms_equal_dense_norms(x64):
    method, node = perturbed_dora()
    a, b = node.train["a"], node.train["b"]
    np.testing.assert_allclose(factored_column_norms(node.base, a, b, method.scale),
                               column_norms(node.base + method.scale * a @ b), rtol=1e-12)
