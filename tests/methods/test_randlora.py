"""RandLoRA oracles: frozen shared random bases, trainable diagonals, full rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.bank import RandLoRA
from jpeft.shared import attach_shared
from tests.methods.helpers import kernel, node_for


def generic(node, seed=1):
    """The node with generic (non-init) λ, γ."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    lam, gamma = node.train["lam"], node.train["gamma"]
    return node.replace(train={"lam": jax.random.normal(k1, lam.shape, lam.dtype),
                               "gamma": jax.random.normal(k2, gamma.shape, gamma.dtype)})


def paper_delta(node):
    """`ΔW = s·Σ_j B_j Λ_j A Γ_j` (paper layout, d = min side) with B_j the column block {k·N + j}."""
    m = node.method
    bases = node.frozen["shared"]
    lam, gamma = np.asarray(node.train["lam"]), np.asarray(node.train["gamma"])
    nb, d = gamma.shape
    big = max(node.base.shape)
    a = np.asarray(bases["a"])[:, :d]
    b_flat = np.asarray(bases["b"])[:big, :nb, :].reshape(big, nb * m.rank)
    total = 0
    for j in range(nb):
        b_j = b_flat[:, [k * nb + j for k in range(m.rank)]]
        total = total + b_j @ np.diag(lam[:, j]) @ a @ np.diag(gamma[j])
    return m.scale * total  # (D, d)


def test_zero_lambda_is_exact_identity_and_gamma_init():
    w = kernel()
    node = node_for(RandLoRA(rank=4, alpha=32.0), w)
    np.testing.assert_array_equal(node.method.materialise(node), w)
    np.testing.assert_array_equal(node.train["lam"], 0.0)
    assert node.train["lam"].shape == (4, 8) and node.train["gamma"].shape == (8, 32)
    np.testing.assert_array_equal(node.train["gamma"], 1.0 / 32)  # PEFT reset: 1/max(N, d)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)], ids=["in<out", "in>out"])
def test_delta_is_the_sum_over_bases_in_both_orientations(x64, shape):
    node = generic(node_for(RandLoRA(rank=4, alpha=8.0), kernel(shape=shape, dtype=jnp.float64)))
    delta_k = np.asarray(node.method.materialise(node) - node.base)
    want = paper_delta(node)  # (D, d) = (48, 32)
    # The random side with N bases is the larger dimension: ΔW (out×in) is want or wantᵀ.
    delta_w = delta_k.T
    np.testing.assert_allclose(delta_w, want if shape[1] >= shape[0] else want.T, rtol=1e-10, atol=1e-12)


def test_generic_update_is_full_rank(x64):
    """48×80, r = 8 ⇒ N = 6 bases, rank(ΔW) = min(m, n) = 48."""
    node = generic(node_for(RandLoRA(rank=8, alpha=16.0), kernel(shape=(80, 48), dtype=jnp.float64)))
    delta = np.asarray(node.method.materialise(node) - node.base)
    assert node.train["lam"].shape == (8, 6)
    assert np.linalg.matrix_rank(delta) == 48
    lora_like = node.replace(train={"lam": node.train["lam"].at[:, 1:].set(0.0), "gamma": node.train["gamma"]})
    assert np.linalg.matrix_rank(np.asarray(node.method.materialise(lora_like) - node.base)) == 8  # one basis: rank r


def test_counts_bases_stored_once_and_shared_by_all_layers():
    r = 4
    shapes = [(32, 48), (48, 32), (32, 32)]
    params = {f"l{i}": {"kernel": kernel(seed=i, shape=s)} for i, s in enumerate(shapes)}
    method = RandLoRA(rank=r, alpha=8.0)
    spec = jpeft.Spec({r"l\d/kernel": method})
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    n_bases = lambda d: -(-d // r)  # noqa: E731
    trainable = sum(r * n_bases(min(s)) + n_bases(min(s)) * min(s) for s in shapes)  # rN + Nd per layer
    big, small = 48, 48  # element-wise max (out, in) = (48, 48)
    shared = r * small + big * n_bases(small) * r
    count = jpeft.count(tree)
    assert count.trainable == trainable
    assert count.frozen == shared + sum(int(np.prod(s)) for s in shapes)
    nodes = attach_shared([tree[f"l{i}"]["kernel"] for i in range(3)])
    assert all(n.frozen["shared"]["a"] is nodes[0].frozen["shared"]["a"] for n in nodes)
    # Gradients flow to λ (γ has zero gradient while λ = 0), never to the bases.
    trainable_t, frozen_t = jpeft.split(tree)
    g = jax.jit(jax.grad(
        lambda t: sum(jnp.sum(jnp.sin(k)) for k in jax.tree.leaves(jpeft.apply(jpeft.combine(t, frozen_t), spec)))
    ))(trainable_t)
    assert float(jnp.max(jnp.abs(g["l0"]["kernel"].train["lam"]))) > 0
    assert "shared" not in g["l0"]["kernel"].train


@pytest.mark.parametrize("basis", ["dense", "sparse", "very_sparse"])
def test_bases_are_standardised_and_sparse_ones_ternary(basis):
    params = {"w": kernel(shape=(256, 64))}
    tree = jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec({"w": RandLoRA(rank=4, basis=basis)}))
    b = np.asarray(tree["w"].frozen["shared"]["b"])
    assert b.shape == (256, 16, 4)
    assert np.std(b, ddof=1) == pytest.approx(1.0, rel=1e-5)
    if basis == "dense":
        assert len(np.unique(b)) > 1000
        return
    values = np.unique(np.round(b, 5))
    assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]
    density = np.mean(b != 0)
    expected = 1 / 3 if basis == "sparse" else 1 / np.sqrt(64)
    assert density == pytest.approx(expected, rel=0.1)
