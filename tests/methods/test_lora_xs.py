"""LoRA-XS oracles: `W' = W + s·U_r R Σ_r V_rᵀ`, only `R` trains."""

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.methods.svdcore import LoRAXS
from tests.methods.helpers import M_OUT, N_IN, R, kernel, node_for


def paper_svd(w):
    """`W = U Σ Vᵀ` of the paper-layout weight `W = Kᵀ`."""
    u, s, vh = jnp.linalg.svd(w.T, full_matrices=False)
    return u[:, :R], s[:R], vh[:R].T


def with_core(node, core):
    return node.replace(train={"core": core})


def test_trainable_count_is_r_squared_per_matrix():
    """(a) r² per adapted matrix, whatever its shape; the frames are frozen."""
    params = {"q": kernel(), "v": kernel(1, (M_OUT, N_IN)), "o": kernel(2, (N_IN, N_IN))}
    spec = jpeft.Spec({"q|v|o": LoRAXS(rank=R)})
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    assert jpeft.count(tree).trainable == 3 * R * R
    assert set(tree["q"].train) == {"core"} and set(tree["q"].frozen) == {"a", "b"}


def test_delta_is_rank_r_inside_the_singular_subspaces(x64):
    """(b) rank(ΔW) <= r, (I − U_rU_rᵀ)ΔW = 0, ΔW(I − V_rV_rᵀ) = 0 for any R."""
    w = kernel(decay=True)
    method = LoRAXS(rank=R, alpha=16.0)
    node = with_core(node_for(method, w), jax.random.normal(jax.random.PRNGKey(3), (R, R)))
    dw = (method.materialise(node) - w).T
    u_r, _, v_r = paper_svd(w)
    assert np.linalg.matrix_rank(np.asarray(dw), tol=1e-9) == R
    np.testing.assert_allclose(dw - u_r @ (u_r.T @ dw), 0.0, atol=1e-12)
    np.testing.assert_allclose(dw - (dw @ v_r) @ v_r.T, 0.0, atol=1e-12)


def test_core_identity_over_s_gives_the_best_rank_r_approximation(x64):
    """(c) with R = I/s, ΔW == U_r Σ_r V_rᵀ; and the factored form ((x@V_rΣ_r)@Rᵀ)@U_rᵀ."""
    w = kernel(decay=True)
    method = LoRAXS(rank=R, alpha=16.0)
    node = with_core(node_for(method, w), jnp.eye(R) / method.scale)
    u_r, s_r, v_r = paper_svd(w)
    np.testing.assert_allclose((method.materialise(node) - w).T, (u_r * s_r) @ v_r.T, atol=1e-12)
    # the frames are A = Σ_rV_rᵀ (a = V_rΣ_r) and B = U_r, up to one sign per component
    a, b = node.frozen["a"], node.frozen["b"]
    sign = jnp.sign(jnp.sum(a * v_r, axis=0))
    np.testing.assert_allclose(a, v_r * s_r * sign, atol=1e-12)
    np.testing.assert_allclose(b, (u_r * sign).T, atol=1e-12)
    core = jax.random.normal(jax.random.PRNGKey(4), (R, R))
    node = with_core(node, core)
    x = jax.random.normal(jax.random.PRNGKey(5), (7, N_IN))
    want = x @ w + method.scale * (((x @ a) @ core.T) @ b)       # ((x@V_rΣ_r)@Rᵀ)@U_rᵀ
    np.testing.assert_allclose(method.matmul(node, x), want, atol=1e-12)
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), atol=1e-12)


def test_init_is_identity_up_to_the_tiny_core():
    """R ~ N(0, 1e-10) (reference σ = 1e-5): W' ≈ W, not exactly; init_std=0 gives exactly W."""
    w = kernel()
    node = node_for(LoRAXS(rank=R), w)
    core = node.train["core"]
    assert 0 < float(jnp.std(core)) < 3e-5
    diff = jnp.abs(LoRAXS(rank=R).materialise(node) - w)
    assert 0 < float(jnp.max(diff)) < 1e-3 * float(jnp.max(jnp.abs(w)))
    np.testing.assert_array_equal(LoRAXS(rank=R, init_std=0.0).materialise(node_for(LoRAXS(rank=R, init_std=0.0), w)),
                                  w)


def test_randomized_svd_frames_match_the_exact_ones(x64):
    w = kernel(decay=True)
    method = LoRAXS(rank=R, svd_niter=6)
    fast = with_core(node_for(method, w), jnp.eye(R))
    exact = with_core(node_for(LoRAXS(rank=R), w), jnp.eye(R))
    np.testing.assert_allclose(method.materialise(fast), LoRAXS(rank=R).materialise(exact), atol=1e-8)
