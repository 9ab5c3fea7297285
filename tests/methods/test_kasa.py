"""KaSA oracles: truncated base `W_world` + `s·B diag(d) A`, and its penalty."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import KaSA
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for

K = min(N_IN, M_OUT)


def test_world_knowledge_base_drops_the_r_smallest_components(x64):
    """(a) σ(W_world) = the top k−r singular values of W, the last r zero."""
    w = kernel()
    node = node_for(KaSA(rank=R), w)
    sig, sig_world = jnp.linalg.svd(w, compute_uv=False), jnp.linalg.svd(node.base, compute_uv=False)
    np.testing.assert_allclose(sig_world[: K - R], sig[: K - R], atol=1e-12)
    np.testing.assert_allclose(sig_world[K - R:], 0.0, atol=1e-12)


def test_init_is_w_world_not_w(x64):
    """(b) at init W' = W_world (B = 0), which differs from W by its r smallest components."""
    w = kernel()
    method = KaSA(rank=R)
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), node.base)
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(w - method.materialise(node), (u[:, K - R:] * s[K - R:]) @ vh[K - R:], atol=1e-12)
    assert float(jnp.max(jnp.abs(w - method.materialise(node)))) > 1e-2          # explicit non-identity
    assert np.all(node.train["d"] != 0) and not np.any(node.train["b"])            # d ~ N(0,1), B = 0
    assert jpeft.count({"w": node}).trainable == R * (N_IN + M_OUT) + R


def test_penalty(x64):
    """(c) the orthogonality terms vanish for orthonormal A, B: penalty = β‖d‖²."""
    w = kernel()
    method = KaSA(rank=R, beta=0.1, gamma=0.01)
    node = node_for(method, w)
    q_a = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (N_IN, R)))[0]
    q_b = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (M_OUT, R)))[0].T
    d = jnp.asarray([1.0, 2.0, -1.0, 0.5])
    ortho = node.replace(train={"a": q_a, "b": q_b, "d": d})
    np.testing.assert_allclose(method.node_penalty(ortho), 0.1 * jnp.sum(d ** 2), rtol=1e-12)
    scaled = ortho.replace(train={"a": 2 * q_a, "b": q_b, "d": d})
    # ‖4I−I‖_F = 6
    np.testing.assert_allclose(method.node_penalty(scaled), 0.1 * jnp.sum(d ** 2) + 0.01 * 3 * 2, rtol=1e-12)
    np.testing.assert_allclose(jpeft.penalty({"w": scaled}), method.node_penalty(scaled), rtol=1e-12)
    # reference orientation: AᵀA (in×in), BBᵀ (out×out) against identity — never 0 for r < in, out
    ref = KaSA(rank=R, beta=0.1, gamma=0.01, reference=True)
    want = 0.1 * jnp.sum(d ** 2) + 0.01 * ((M_OUT - R) ** 0.5 + (N_IN - R) ** 0.5)
    np.testing.assert_allclose(ref.node_penalty(ortho), want, rtol=1e-12)


def test_reference_truncation_uses_in_features_minus_r(x64):
    """[CODE≠PAPER] the reference keeps `in − r` components: the same for in <= out, none dropped
    when in − r >= min(in, out)."""
    wide, tall = kernel(), kernel(shape=(M_OUT, N_IN))                           # (in, out) = (32, 48), (48, 32)
    for w, dropped in [(wide, True), (tall, False)]:
        ref = node_for(KaSA(rank=R, reference=True), w)
        np.testing.assert_allclose(ref.base, w if not dropped else node_for(KaSA(rank=R), w).base, atol=1e-12)
    assert not np.allclose(node_for(KaSA(rank=R), tall).base, tall)
