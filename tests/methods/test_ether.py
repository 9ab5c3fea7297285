"""ETHER / ETHER+ oracles: orthogonality of the reflection, ETHER's explicit
non-identity at init, ETHER+ identity at init and bounded distance, the block-diagonal form on
the right sides, the factored path, parameter counts and a 200-step toy regression."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.methods.orthogonal import ETHER, ETHERPlus
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def perturbed(method, w, seed=1):
    node = node_for(method, w)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(node.train)))
    return node.replace(train={k: v + 0.3 * jax.random.normal(next(keys), v.shape, v.dtype)
                               for k, v in node.train.items()})


def explicit_h(node, side, plus):
    """`H = blockdiag(H_b)` from the paper's formula, built densely (tests only)."""
    u = np.asarray(node.train[f"u_{side}"])
    blocks = []
    for b in range(u.shape[0]):
        uh = u[b] / np.linalg.norm(u[b])
        if plus:
            vh = np.asarray(node.train[f"v_{side}"][b]) / np.linalg.norm(node.train[f"v_{side}"][b])
            blocks.append(np.eye(len(uh)) - np.outer(uh, uh) + np.outer(vh, vh))
        else:
            blocks.append(np.eye(len(uh)) - 2 * np.outer(uh, uh))
    d = sum(len(x) for x in blocks)
    h = np.zeros((d, d))
    off = 0
    for blk in blocks:
        h[off:off + len(blk), off:off + len(blk)] = blk
        off += len(blk)
    return h


def test_ether_reflection_is_orthogonal_block_diagonal_and_not_the_identity(x64):
    """Materialising on `K = I` gives `H` itself: `HᵀH = I`, `H = Hᵀ`, off-diagonal blocks are
    zero, and (explicit non-identity at init) `‖H_b − I‖_F = 2` for every block."""
    method = ETHER(n_blocks=4)
    node = node_for(method, jnp.eye(N_IN))
    h = np.asarray(method.materialise(node))
    np.testing.assert_allclose(h.T @ h, np.eye(N_IN), atol=1e-12)
    np.testing.assert_allclose(h, h.T, atol=1e-12)
    d = N_IN // 4
    for i in range(4):
        for j in range(4):
            blk = h[i * d:(i + 1) * d, j * d:(j + 1) * d]
            if i == j:
                np.testing.assert_allclose(np.linalg.norm(blk - np.eye(d)), 2.0, rtol=1e-12)
            else:
                assert not np.any(blk)
    np.testing.assert_allclose(h, explicit_h(node, "in", plus=False), atol=1e-12)
    w = kernel()
    assert not np.allclose(method.materialise(node_for(method, w)), w)  # not the identity at init


def test_ether_plus_is_exactly_the_identity_at_init():
    for side in ("in", "out", "both"):
        method = ETHERPlus(n_blocks=4, side=side)
        w = kernel()
        node = node_for(method, w)
        np.testing.assert_array_equal(method.materialise(node), w)
        x = jax.random.normal(jax.random.PRNGKey(2), (5, N_IN))
        np.testing.assert_allclose(method.matmul(node, x), x @ w, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(node.train[f"v_{side if side != 'both' else 'in'}"],
                                      -node.train[f"u_{side if side != 'both' else 'in'}"])


def test_ether_plus_stays_within_bounded_distance_of_the_identity(x64):
    method = ETHERPlus(n_blocks=2)
    node = perturbed(method, jnp.eye(N_IN))
    h = np.asarray(method.materialise(node))
    dist = np.linalg.norm(h - np.eye(N_IN), 2)
    assert 0 < dist <= 1.0 + 1e-12  # ‖v̂v̂ᵀ − ûûᵀ‖₂ = sin∠(u, v) ≤ 1 (≤ 2 claimed)
    np.testing.assert_allclose(h, explicit_h(node, "in", plus=True), atol=1e-12)


@pytest.mark.parametrize("cls", [ETHER, ETHERPlus])
@pytest.mark.parametrize("side", ["in", "out", "both"])
def test_sides_match_the_paper_layout_and_factored_path(x64, cls, side):
    """Paper `W' = H_out W H_in` ⇔ kernel `K' = H_in K H_out`; `matmul` equals it on batched input."""
    method = cls(n_blocks=4, side=side)
    w = kernel()
    node = perturbed(method, w)
    h_in = explicit_h(node, "in", cls.plus) if side in ("in", "both") else np.eye(N_IN)
    h_out = explicit_h(node, "out", cls.plus) if side in ("out", "both") else np.eye(M_OUT)
    want = h_in @ np.asarray(w) @ h_out
    np.testing.assert_allclose(method.materialise(node), want, atol=1e-12)
    np.testing.assert_allclose((h_out @ np.asarray(w).T @ h_in).T, want, atol=1e-12)  # paper layout
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ want, atol=1e-12)


@pytest.mark.parametrize("method, want", [
    (ETHER(n_blocks=4), N_IN), (ETHER(n_blocks=4, side="out"), M_OUT),
    (ETHERPlus(n_blocks=4), 2 * N_IN), (ETHERPlus(n_blocks=4, side="both"), 2 * (N_IN + M_OUT))])
def test_parameter_count(method, want):
    params = jpeft.init(jax.random.PRNGKey(0), {"w": kernel()}, jpeft.Spec({"w": method}))
    assert jpeft.count(params).trainable == want


def test_blocks_must_divide_the_dimension():
    with pytest.raises(jpeft.AdapterError, match=r"w.*\(32, 48\).*n_blocks = 5 must divide the input dimension 32"):
        node_for(ETHER(n_blocks=5), kernel())
    with pytest.raises(jpeft.AdapterError, match=r"n_blocks = 5 must divide the output dimension 48"):
        node_for(ETHERPlus(n_blocks=5, side="out"), kernel(shape=(40, 48)))


@pytest.mark.parametrize("method", [ETHER(n_blocks=2), ETHERPlus(n_blocks=2, side="both")])
def test_toy_regression_fits_a_planted_transform(method):
    """200 Adam steps on `y = x·K*` with `K*` from the same family (other init): the loss falls
    by two orders of magnitude."""
    w = kernel()
    spec = jpeft.Spec({"w": method})
    target = perturbed(method, w, seed=4)
    k_star = method.materialise(target)
    params = jpeft.init(jax.random.PRNGKey(0), {"w": w}, spec)
    x = jax.random.normal(jax.random.PRNGKey(5), (64, N_IN))
    tx = optax.adam(2e-2)
    trainable, frozen = jpeft.split(params)

    def step(carry, _):
        t, opt = carry
        loss, g = jax.value_and_grad(
            lambda t: jnp.mean(jnp.square(x @ jpeft.apply(jpeft.combine(t, frozen), spec)["w"] - x @ k_star)))(t)
        updates, opt = tx.update(g, opt, t)
        return (optax.apply_updates(t, updates), opt), loss

    _, losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))((trainable, tx.init(trainable)))
    assert float(losses[-1]) < 1e-2 * float(losses[0])
