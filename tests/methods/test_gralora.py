"""GraLoRA oracles: block locality, the rank `min(k·r, m, n)`, the parameter
count of LoRA(r), the hybrid branch, the scale, validation, and a toy where GraLoRA fits a
block-structured target of rank k·r that LoRA of the same budget cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods.block import GraLoRA
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def perturbed(method, w=None, seed=1):
    node = node_for(method, kernel() if w is None else w)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(node.train)))
    return node.replace(train={k: jax.random.normal(next(keys), v.shape, v.dtype) for k, v in node.train.items()})


def test_identity_at_init_and_init_distribution():
    method = GraLoRA(rank=4, alpha=8, k=2, hybrid_rank=2)
    w = kernel()
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert node.train["a"].shape == (2, N_IN // 2, 4) and node.train["b"].shape == (2, 4, M_OUT // 2)
    assert float(jnp.max(jnp.abs(node.train["a"]))) <= 1 / (N_IN // 2) ** 0.5
    assert float(jnp.max(jnp.abs(node.train["ha"]))) <= 1 / N_IN ** 0.5
    assert not np.any(node.train["b"]) and not np.any(node.train["hb"])
    assert method.scale == 8 / 6


def test_block_ij_depends_only_on_its_own_factors(x64):
    """ΔK block (i, j) = s·a_{ij} b_{ij}; perturbing a_{ij} / b_{ij} changes that block only."""
    k, r = 4, 8
    method = GraLoRA(rank=r, alpha=8, k=k)
    node = perturbed(method)
    a, b = node.train["a"], node.train["b"]
    d = np.asarray(method.delta(node))
    n_b, m_b, r_b = N_IN // k, M_OUT // k, r // k
    for i in range(k):
        for j in range(k):
            a_ij = a[i][:, j * r_b:(j + 1) * r_b]
            b_ij = b[j][i * r_b:(i + 1) * r_b]
            np.testing.assert_allclose(d[i * n_b:(i + 1) * n_b, j * m_b:(j + 1) * m_b], method.scale * a_ij @ b_ij,
                                       atol=1e-12)
    i, j = 1, 2
    a2 = a.at[i, :, j * r_b:(j + 1) * r_b].add(1.0)
    b2 = b.at[j, i * r_b:(i + 1) * r_b].add(1.0)
    d2 = np.asarray(method.delta(node.replace(train={"a": a2, "b": b2})))
    changed = np.abs(d2 - d) > 1e-12
    mask = np.zeros_like(changed)
    mask[i * n_b:(i + 1) * n_b, j * m_b:(j + 1) * m_b] = True
    assert changed[mask].any() and not changed[~mask].any()


@pytest.mark.parametrize("k, r, want", [(2, 4, 8), (4, 8, 32), (4, 16, 32)])
def test_generic_rank_is_min_of_k_r_and_the_dimensions(x64, k, r, want):
    node = perturbed(GraLoRA(rank=r, alpha=8, k=k))
    assert np.linalg.matrix_rank(np.asarray(node.method.delta(node))) == want == min(k * r, N_IN, M_OUT)


@pytest.mark.parametrize("k, r, hybrid", [(2, 4, 0), (4, 8, 0), (2, 4, 2)])
def test_parameter_count_equals_lora_of_the_same_rank(k, r, hybrid):
    w = {"w": kernel()}
    gra = jpeft.init(jax.random.PRNGKey(0), w, jpeft.Spec({"w": GraLoRA(rank=r, k=k, hybrid_rank=hybrid)}))
    lora = jpeft.init(jax.random.PRNGKey(0), w, jpeft.Spec({"w": jpeft.LoRA(rank=r + hybrid)}))
    assert jpeft.count(gra).trainable == jpeft.count(lora).trainable == (r + hybrid) * (N_IN + M_OUT)


def test_hybrid_branch_is_a_plain_lora_on_the_shared_scale(x64):
    method = GraLoRA(rank=4, alpha=6, k=2, hybrid_rank=2)
    node = perturbed(method)
    plain = GraLoRA(rank=4, alpha=4, k=2)  # scale 1: the bare grid product
    grid = plain.delta(node.replace(train={"a": node.train["a"], "b": node.train["b"]}))
    want = (6 / (4 + 2)) * (grid + node.train["ha"] @ node.train["hb"])
    np.testing.assert_allclose(method.delta(node), want, atol=1e-12)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), atol=1e-12)


def test_validation():
    with pytest.raises(ValueError, match="divisible by k"):
        GraLoRA(rank=6, k=4)
    with pytest.raises(jpeft.AdapterError, match=r"w.*\(30, 48\).*k = 4 must divide both in = 30 and out = 48"):
        node_for(GraLoRA(rank=4, k=4), kernel(shape=(30, 48)))


def test_toy_fits_a_block_structured_target_lora_of_equal_budget_cannot():
    """Target: each of the 2×2 blocks a random rank-2 matrix (total rank 8). GraLoRA(r=4, k=2) has
    rank 2 per block and fits it; LoRA(r=4), same parameter count, cannot."""
    w = kernel()
    keys = jax.random.split(jax.random.PRNGKey(11), 8)
    blocks = [[jax.random.normal(keys[2 * (2 * i + j)], (N_IN // 2, 2))
               @ jax.random.normal(keys[2 * (2 * i + j) + 1], (2, M_OUT // 2)) / 4 for j in range(2)] for i in range(2)]
    target = jnp.block(blocks)
    x = jax.random.normal(jax.random.PRNGKey(5), (128, N_IN))

    def final_loss(method):
        spec = jpeft.Spec({"w": method})
        trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(0), {"w": w}, spec))
        tx = optax.adam(1e-2)

        def step(carry, _):
            t, opt = carry
            loss, g = jax.value_and_grad(
                lambda t: jnp.mean(jnp.square(x @ (jpeft.apply(jpeft.combine(t, frozen), spec)["w"] - w - target))))(t)
            updates, opt = tx.update(g, opt, t)
            return (optax.apply_updates(t, updates), opt), loss

        _, losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))((trainable, tx.init(trainable)))
        return float(losses[0]), float(losses[-1])

    start, gra = final_loss(GraLoRA(rank=4, alpha=8, k=2))
    _, lora = final_loss(jpeft.LoRA(rank=4, alpha=8))
    assert gra < 1e-3 * start and lora > 0.1 * start
