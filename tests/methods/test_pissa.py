"""PiSSA oracles, exact and randomised SVD."""

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from tests.methods.helpers import R, kernel, node_for


@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_pissa_oracles(x64, alpha):
    w = kernel(decay=True)
    method = jpeft.PiSSA(rank=R, alpha=alpha)
    node = node_for(method, w)
    a, b, s = node.train["a"], node.train["b"], method.scale
    sig = jnp.linalg.svd(w, compute_uv=False)
    # (a) W_res + s·B₀A₀ == W
    np.testing.assert_allclose(node.base + s * a @ b, w, atol=1e-12)
    # (b) σ(W_res) == σ_{r+1..k}(W)
    np.testing.assert_allclose(jnp.linalg.svd(node.base, compute_uv=False)[: len(sig) - R], sig[R:], atol=1e-12)
    # (c) s·B₀A₀ is the best rank-r approximation of W
    u, _, vh = jnp.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(s * a @ b, (u[:, :R] * sig[:R]) @ vh[:R], atol=1e-12)
    # (d) A₀A₀ᵀ = B₀ᵀB₀ = Σ_r / s (kernel layout: aᵀa and b bᵀ)
    np.testing.assert_allclose(a.T @ a, jnp.diag(sig[:R] / s), atol=1e-12)
    np.testing.assert_allclose(b @ b.T, jnp.diag(sig[:R] / s), atol=1e-12)


def test_randomized_svd_matches_exact_on_a_decaying_spectrum(x64):
    w = kernel(decay=True)
    exact = node_for(jpeft.PiSSA(rank=R), w)
    fast = node_for(jpeft.PiSSA(rank=R, svd_niter=4), w)
    np.testing.assert_allclose(fast.base, exact.base, atol=1e-8)
    np.testing.assert_allclose(fast.train["a"] @ fast.train["b"], exact.train["a"] @ exact.train["b"], atol=1e-8)
