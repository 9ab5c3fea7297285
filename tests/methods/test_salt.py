"""SALT oracles: scale/shift of the top-r singular values + a tail LoRA."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.salt import SALT
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for

K, Q = min(N_IN, M_OUT), 3


def paper_svd(w):
    u, s, vh = jnp.linalg.svd(w.T, full_matrices=False)
    return u, s, vh.T


def test_identity_and_count():
    w = kernel()
    for method, count in [(SALT(rank=R, lora_rank=Q), 2 * R + 2 * (K - R) * Q),
                          (SALT(rank=R, lora_rank=Q, tail_projected=False), 2 * R + Q * (N_IN + M_OUT))]:
        node = node_for(method, w)
        np.testing.assert_array_equal(method.materialise(node), w)
        assert jpeft.count({"w": node}).trainable == count


def test_scale_shift_act_only_on_the_top_r_subspace_and_the_lora_only_on_the_tail(x64):
    w = kernel(decay=True)
    method = SALT(rank=R, lora_rank=Q, lora_scale=0.5)
    node = node_for(method, w)
    u, s, v = paper_svd(w)
    scale, shift = jnp.asarray([1.1, 0.9, 1.3, 0.5]), jnp.asarray([0.01, -0.02, 0.0, 0.03])
    head = node.replace(train={**node.train, "scale": scale, "shift": shift})
    dw = (method.materialise(head) - w).T
    np.testing.assert_allclose(u[:, :R] @ (u[:, :R].T @ dw) @ v[:, :R] @ v[:, :R].T, dw, atol=1e-12)
    np.testing.assert_allclose(u[:, :R].T @ dw @ v[:, :R], jnp.diag(s[:R] * scale + shift - s[:R]), atol=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(1), (K - R, Q))
    tail = node.replace(train={**node.train, "x": x})
    dw = (method.materialise(tail) - w).T
    np.testing.assert_allclose(u[:, :R].T @ dw, 0.0, atol=1e-12)                  # nothing in span(U_r)
    np.testing.assert_allclose(dw @ v[:, :R], 0.0, atol=1e-12)                    # nor in span(V_r)
    uu, vv = node.frozen["b"].T, node.frozen["a"]
    np.testing.assert_allclose(dw, 0.5 * uu[:, R:] @ (x @ tail.train["y"]) @ vv[:, R:].T, atol=1e-12)


def test_reference_form_is_not_identity_and_clamps_the_spectrum(x64):
    """The reference code: X, Y ~ 0.01·N(0,1) (W' ≠ W at init) and W' = U relu(S_new) Vᵀ."""
    w = kernel(decay=True)
    method = SALT(rank=R, lora_rank=Q, reference=True)
    node = node_for(method, w)
    diff = float(jnp.max(jnp.abs(method.materialise(node) - w)))
    assert 0 < diff < 1e-2                                                        # explicit non-identity
    node = node.replace(train={**node.train, "shift": jnp.asarray([0.0, -5.0, 0.0, 0.0])})
    u, s, v = paper_svd(w)
    uu, vv, sig = node.frozen["b"].T, node.frozen["a"], node.frozen["sigma"]
    s_new = jnp.diag(sig).at[1, 1].set(sig[1] - 5.0).at[R:, R:].add(node.train["x"] @ node.train["y"])
    np.testing.assert_allclose(method.materialise(node).T, uu @ jax.nn.relu(s_new) @ vv.T, atol=1e-12)
    assert float(s[1] - 5.0) < 0                                                  # that singular value is clamped to 0
    np.testing.assert_allclose(uu[:, 1] @ method.materialise(node).T @ vv[:, 1], 0.0, atol=1e-12)


def test_penalty_is_the_reference_regulariser(x64):
    w = kernel()
    method = SALT(rank=R, lora_rank=Q)
    node = node_for(method, w)
    assert float(jpeft.penalty({"w": node})) == 0.0
    node = node.replace(train={**node.train, "shift": jnp.full((R,), 0.5), "x": jnp.ones((K - R, Q))})
    want = jnp.linalg.norm(jnp.full((R,), 0.5)) + jnp.linalg.norm(jnp.ones((K - R, Q)) @ node.train["y"])
    np.testing.assert_allclose(jpeft.penalty({"w": node, "other": jnp.ones(3)}), want, rtol=1e-12)
