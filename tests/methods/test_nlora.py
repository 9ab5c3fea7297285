"""NLoRA oracles: Nyström init `A = W[:r,:]`, `B = W[:,:r]`, `N = W[:r,:r]⁺`."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import NLoRA
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def paper_factors(node):
    """`(B, N, A)` in paper layout."""
    return get(node, "b").T, node.train["core"], get(node, "a").T


def get(node, k):
    return node.train[k] if k in node.train else node.frozen[k]


def test_pinv_residual_is_identity_and_exact_nystrom_on_a_rank_r_weight(x64):
    low = kernel(decay=True)
    u, s, vh = jnp.linalg.svd(low, full_matrices=False)
    low = (u[:, :R] * s[:R]) @ vh[:R]                                        # rank(W) = r
    method = NLoRA(rank=R, alpha=float(R))                                   # s = 1
    node = node_for(method, low)
    np.testing.assert_allclose(method.materialise(node), low, atol=1e-12)    # W' == W
    b, n, a = paper_factors(node)
    wp = low.T
    np.testing.assert_allclose(a, wp[:R, :], atol=0)
    np.testing.assert_allclose(b, wp[:, :R], atol=0)
    np.testing.assert_allclose(n, jnp.linalg.pinv(wp[:R, :R]), atol=1e-12)
    np.testing.assert_allclose(b @ n @ a, wp, atol=1e-9)                     # exact Nyström: B N⁺ A == W
    np.testing.assert_allclose(node.base, 0.0, atol=1e-9)                    # so the residual is 0


def test_reference_init_is_not_the_identity(x64):
    """[CODE≠PAPER] the reference: N = W_II and no residual, so W' = W + s·B W_II A at init."""
    w = kernel()
    method = NLoRA(rank=R, nystrom="reference", residual=False)
    node = node_for(method, w)
    np.testing.assert_array_equal(node.base, w)
    wp = w.T
    want = w + method.scale * (wp[:, :R] @ wp[:R, :R] @ wp[:R, :]).T
    np.testing.assert_allclose(method.materialise(node), want, atol=1e-12)
    assert float(jnp.max(jnp.abs(method.materialise(node) - w))) > 1e-2     # explicit non-identity


def test_all_three_factors_train(x64):
    w = kernel()
    node = node_for(NLoRA(rank=R), w)
    assert set(node.train) == {"a", "core", "b"}
    assert jpeft.count({"w": node}).trainable == R * (N_IN + M_OUT) + R * R
    x = jax.random.normal(jax.random.PRNGKey(1), (3, N_IN))
    node = node.replace(train={k: v + 0.01 for k, v in node.train.items()})
    np.testing.assert_allclose(node.method.matmul(node, x), x @ node.method.materialise(node), atol=1e-9)
