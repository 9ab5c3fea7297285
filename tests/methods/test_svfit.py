"""SVFit oracles: only the top-r singular values train."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import SVFit
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def test_count_identity_and_diagonal_update_in_the_top_r_basis(x64):
    w = kernel(decay=True)
    method = SVFit(rank=R)
    node = node_for(method, w)
    assert jpeft.count({"w": node}).trainable == R                                # r parameters
    np.testing.assert_array_equal(method.materialise(node), w)                    # W' == W at init
    delta = jnp.asarray([0.3, -0.2, 0.1, 0.05])
    node = node.replace(train={"delta": delta})
    dw = (method.materialise(node) - w).T
    u, s, vh = jnp.linalg.svd(w.T)
    coords = u.T @ dw @ vh.T                                                      # ΔW in the full singular basis
    want = jnp.zeros_like(coords).at[jnp.arange(R), jnp.arange(R)].set(delta)
    np.testing.assert_allclose(coords, want, atol=1e-12)                          # diagonal, top-r only
    # W' = U_r diag(σ_r + δ) V_rᵀ + W_tail: the singular values move by δ
    np.testing.assert_allclose(jnp.linalg.svd(method.materialise(node), compute_uv=False)[:R],
                               jnp.sort(s[:R] + delta)[::-1], atol=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), atol=1e-12)
    assert method.materialise(node).shape == (N_IN, M_OUT)
