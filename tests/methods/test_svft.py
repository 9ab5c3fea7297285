"""SVFT oracles: `W' = U(Σ + σ(g)M)Vᵀ`, `M` sparse on a fixed pattern Ω."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.svdcore import core_matrix
from jpeft.methods.svft import SVFT, band_size
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for

K = min(N_IN, M_OUT)


def paper_svd(w):
    u, s, vh = jnp.linalg.svd(w.T, full_matrices=False)
    return u, s, vh.T


def test_zero_init_is_exactly_the_identity_and_the_svd_reconstructs_w():
    """(a) with M = 0, W' == W; the full thin SVD reconstructs W to 1e-5 (fp32)."""
    w = kernel()
    method = SVFT(zero_init=True)
    np.testing.assert_array_equal(method.materialise(node_for(method, w)), w)
    ref = SVFT(zero_init=True, residual=False)                  # base = U Σ Vᵀ (reference form)
    np.testing.assert_allclose(ref.materialise(node_for(ref, w)), w, atol=1e-5)


def test_default_init_is_not_the_identity():
    """The reference's Kaiming-normal M (std √(2/|Ω|)) and σ(0) = ½: W' ≠ W by a small amount."""
    w = kernel()
    method = SVFT(sparsity="banded", off_diag=2)
    node = node_for(method, w)
    nnz = band_size(K, 2)
    assert node.train["m"].shape == (nnz,) and float(node.train["gate"]) == 0.0
    np.testing.assert_allclose(float(jnp.std(node.train["m"])), (2.0 / nnz) ** 0.5, rtol=0.2)
    diff = float(jnp.max(jnp.abs(method.materialise(node) - w)))
    assert 1e-3 < diff < 0.5


@pytest.mark.parametrize("sparsity,d", [("plain", 0), ("banded", 1), ("banded", 3), ("random", 2), ("top_k", 2)])
@pytest.mark.parametrize("rank", [None, 10])
def test_trainable_count(sparsity, d, rank):
    """(b) plain: k + 1; banded / random / top-k: k(2d+1) − d(d+1) + 1 (the gate)."""
    params = {"q": kernel(), "v": kernel(1, (M_OUT, N_IN))}
    tree = jpeft.init(jax.random.PRNGKey(0), params,
                      jpeft.Spec({"q|v": SVFT(rank=rank, sparsity=sparsity, off_diag=d)}))
    k = K if rank is None else rank
    assert jpeft.count(tree).trainable == 2 * (k * (2 * d + 1) - d * (d + 1) + 1)


def positions(node):
    return set(zip(np.asarray(node.frozen["rows"]).tolist(), np.asarray(node.frozen["cols"]).tolist()))


def test_patterns():
    w = kernel()
    band = positions(node_for(SVFT(sparsity="banded", off_diag=2), w))
    assert band == {(i, j) for i in range(K) for j in range(K) if abs(i - j) <= 2}
    assert positions(node_for(SVFT(), w)) == {(i, i) for i in range(K)}
    rnd = node_for(SVFT(sparsity="random", off_diag=2), w)
    assert len(positions(rnd)) == band_size(K, 2) and positions(rnd) != band    # distinct positions
    assert positions(rnd) != positions(node_for(SVFT(sparsity="random", off_diag=2), w, key=1))
    # top-k: the |Ω| largest alignment coefficients u_iᵀ v_j (over the shared leading coordinates)
    u, _, v = paper_svd(w)
    for method in (SVFT(sparsity="top_k", off_diag=1), SVFT(sparsity="top_k", off_diag=1, topk="reference")):
        node = node_for(method, w)
        uu, vv = node.frozen["b"].T, node.frozen["a"]                               # U (m×k), V (n×k)
        coeff = uu[:K].T @ vv[:K] if method.topk == "paper" else vv.T               # ref: the square Vᵀ (n = k)
        want = np.argsort(-np.asarray(coeff).reshape(-1))[: band_size(K, 1)]
        assert positions(node) == {(int(i) // K, int(i) % K) for i in want}


def test_square_reference_top_k_uses_u_times_v():
    w = kernel(shape=(N_IN, N_IN))
    node = node_for(SVFT(sparsity="top_k", off_diag=1, topk="reference"), w)
    uu, vv = node.frozen["b"].T, node.frozen["a"]
    want = np.argsort(-np.asarray(uu @ vv).reshape(-1))[: band_size(N_IN, 1)]
    assert positions(node) == {(int(i) // N_IN, int(i) % N_IN) for i in want}


def test_gradient_of_m_is_the_gated_projected_gradient(x64):
    """(c) ∂L/∂M_ij = σ(g)·(UᵀGV)_ij on Ω, for L = <G, W'>."""
    w = kernel()
    method = SVFT(sparsity="banded", off_diag=1)
    node = node_for(method, w)
    node = node.replace(train={**node.train, "gate": jnp.asarray(0.7)})
    big_g = kernel(seed=6, shape=(M_OUT, N_IN))
    grad = jax.grad(lambda t: jnp.sum(big_g.T * method.materialise(node.replace(train=t))))(node.train)["m"]
    u, v = node.frozen["b"].T, node.frozen["a"]
    proj = u.T @ big_g @ v
    np.testing.assert_allclose(grad, jax.nn.sigmoid(0.7) * proj[node.frozen["rows"], node.frozen["cols"]], atol=1e-12)


def test_effective_weight_is_u_sigma_plus_gated_m_v(x64):
    """W' = U(Σ + σ(g)M)Vᵀ (full rank); truncated: residual keeps the tail, the reference drops it."""
    w = kernel()
    u, s, v = paper_svd(w)
    for rank, residual in [(None, True), (12, True), (12, False)]:
        method = SVFT(rank=rank, sparsity="random", off_diag=1, residual=residual)
        node = node_for(method, w)
        node = node.replace(train={**node.train, "gate": jnp.asarray(-0.3)})
        k = K if rank is None else rank
        term = method.terms(node)[0]
        m_dense = core_matrix(term)                                           # σ(g)·M, k×k
        uu, vv = node.frozen["b"].T, node.frozen["a"]
        np.testing.assert_allclose(jnp.abs(uu), jnp.abs(u[:, :k]), atol=1e-10)
        tail = w.T - (u[:, :k] * s[:k]) @ v[:, :k].T if residual else 0.0
        want = uu @ (jnp.diag(s[:k]) + m_dense) @ vv.T + tail
        np.testing.assert_allclose(method.materialise(node).T, want, atol=1e-10)
        x = jax.random.normal(jax.random.PRNGKey(3), (5, N_IN))
        np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), atol=1e-10)


def test_off_diagonals_must_fit():
    with pytest.raises(jpeft.AdapterError, match=r"w.*off_diag 32 must be < .* 32"):
        node_for(SVFT(sparsity="banded", off_diag=32), kernel())
    with pytest.raises(ValueError, match="sparsity='plain' is the diagonal"):
        SVFT(off_diag=1)
