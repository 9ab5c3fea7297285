"""LoRA-SB oracles: LoRA-XS frames from the simulated first update."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import LoRASB, lora_sb_step_size
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def best_rank(m, k):
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_init_is_the_best_rank_r_simulated_first_step_not_the_identity(x64):
    """(a) s·BRA == best_rank_r(−η·sign(Ĝ)) at init, so W' ≠ W (intentional)."""
    w, g = kernel(), kernel(seed=5)
    method = LoRASB(rank=R, step_size=1e-2)
    node = node_for(method, w, calib=g)
    dw = (method.materialise(node) - w).T
    np.testing.assert_allclose(dw, best_rank(-1e-2 * jnp.sign(g.T), R), atol=1e-12)
    assert float(jnp.max(jnp.abs(dw))) > 1e-3                     # explicit non-identity
    # with α ≠ r the frames and R are unchanged (R = S_r, as the reference): s·BRA = s·best_rank_r
    scaled = LoRASB(rank=R, alpha=2.0 * R, step_size=1e-2)
    np.testing.assert_allclose((scaled.materialise(node_for(scaled, w, calib=g)) - w).T, 2.0 * dw, atol=1e-12)
    plain = LoRASB(rank=R, step_size=1e-2, sign=False)
    np.testing.assert_allclose((plain.materialise(node_for(plain, w, calib=g)) - w).T, best_rank(-1e-2 * g.T, R),
                               atol=1e-12)


def test_frames_are_orthonormal_and_only_the_core_trains(x64):
    """(b) BᵀB = I, AAᵀ = I; (c) only R is trainable (r² per matrix)."""
    w, g = kernel(), kernel(seed=5)
    node = node_for(LoRASB(rank=R), w, calib=g)
    a, b = node.frozen["a"], node.frozen["b"]                    # a = Aᵀ (in×r), b = Bᵀ (r×out)
    np.testing.assert_allclose(a.T @ a, jnp.eye(R), atol=1e-12)
    np.testing.assert_allclose(b @ b.T, jnp.eye(R), atol=1e-12)
    assert set(node.train) == {"core"} and jpeft.count({"w": node}).trainable == R * R


def test_core_gradient_is_the_projected_full_gradient(x64):
    """(d) ∂L/∂R = s·Bᵀ G Aᵀ for L = <G, W'> (G the full paper-layout gradient)."""
    w, g = kernel(), kernel(seed=5)
    method = LoRASB(rank=R, alpha=8.0)
    node = node_for(method, w, calib=g)
    big_g = kernel(seed=6, shape=(M_OUT, N_IN))                   # paper layout (out, in)
    grad = jax.grad(lambda t: jnp.sum(big_g.T * method.materialise(node.replace(train=t))))(node.train)["core"]
    b_paper, a_paper = node.frozen["b"].T, node.frozen["a"].T
    np.testing.assert_allclose(grad, method.scale * b_paper.T @ big_g @ a_paper.T, atol=1e-12)


def test_step_size_helper():
    assert lora_sb_step_size(1e-4, 0.02, 1000) == 1e-4 / 20
