"""LoRA-GA oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests.methods.helpers import R, kernel, node_for


def best_rank(g, k):
    u, s, vh = jnp.linalg.svd(g, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_first_step_equals_best_rank_2r_of_the_gradient(x64, direction):
    """With unit scale, one SGD step on (a, b) moves K' by −η s²·P_2r(G) to first order."""
    w, g = kernel(), kernel(seed=5, decay=True)
    method = jpeft.LoRAGA(rank=R, alpha=8, ga_scale="unit", ga_direction=direction)
    node = node_for(method, w, calib=g)
    np.testing.assert_allclose(method.materialise(node), w, atol=1e-12)  # (a)
    grads = jax.grad(lambda t: jnp.sum(g * method.materialise(node.replace(train=t))))(node.train)
    a, b, s = node.train["a"], node.train["b"], method.scale
    first_order = -(grads["a"] @ b + a @ grads["b"]) * s  # d/dη of s·(a−η·ga)(b−η·gb) at η=0
    np.testing.assert_allclose(first_order, -(s ** 2) * best_rank(g, 2 * R), atol=1e-10)


@pytest.mark.parametrize("scale_mode", ["stable", "gd", "unit", "weightS"])
def test_factors_are_orthogonal_and_residual_is_exact(x64, scale_mode):
    w, g = kernel(), kernel(seed=5)
    method = jpeft.LoRAGA(rank=R, alpha=8, ga_scale=scale_mode)
    node = node_for(method, w, calib=g)
    a, b = node.train["a"], node.train["b"]
    c_a, c_b = (a.T @ a)[0, 0], (b @ b.T)[0, 0]
    np.testing.assert_allclose(a.T @ a, c_a * jnp.eye(R), atol=1e-12)  # (c) A₀A₀ᵀ ∝ I
    np.testing.assert_allclose(b @ b.T, c_b * jnp.eye(R), atol=1e-12)  #     B₀ᵀB₀ ∝ I
    np.testing.assert_allclose(node.base + method.scale * a @ b, w, atol=1e-12)
    if scale_mode == "stable":
        np.testing.assert_allclose(c_a, (w.shape[1] ** 0.25 / 16 ** 0.5) ** 2, rtol=1e-12)


def test_randomized_svd_variant_matches_exact(x64):
    w, g = kernel(), kernel(seed=5, decay=True)
    exact = node_for(jpeft.LoRAGA(rank=R), w, calib=g)
    fast = node_for(jpeft.LoRAGA(rank=R, svd_niter=4), w, calib=g)
    np.testing.assert_allclose(jnp.abs(fast.train["a"]), jnp.abs(exact.train["a"]), atol=1e-6)
    np.testing.assert_allclose(jnp.abs(fast.train["b"]), jnp.abs(exact.train["b"]), atol=1e-6)
    # The residual base depends on the singular vectors' signs (LoRA-GA is sign-invariant), so each
    # variant is checked to reconstruct W exactly rather than against the other.
    for node in (fast, exact):
        np.testing.assert_allclose(node.base + node.method.scale * node.train["a"] @ node.train["b"], w, atol=1e-12)
