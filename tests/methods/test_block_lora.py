"""Block-LoRA oracles: ΔW = Σ_i B_i A_s = (Σ_i B_i) A_s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.bank import BlockLoRA
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for


def test_identity_at_init_shapes_and_count():
    w = kernel()
    method = BlockLoRA(rank=8, alpha=16.0, blocks=4)
    node = node_for(method, w)
    np.testing.assert_array_equal(method.materialise(node), w)
    assert node.train["a"].shape == (N_IN, 2) and node.train["b"].shape == (4, 2, M_OUT)
    # n·m·(r/n) + (r/n)·n_in
    assert jpeft.count({"w": node}).trainable == 4 * M_OUT * 2 + 2 * N_IN


def test_delta_is_sum_of_blocks_times_shared_down_projection(x64):
    method = BlockLoRA(rank=8, alpha=16.0, blocks=4)
    node = node_for(method, kernel(dtype=jnp.float64))
    b = jax.random.normal(jax.random.PRNGKey(1), node.train["b"].shape, jnp.float64)
    node = node.replace(train={**node.train, "b": b})
    a_s = np.asarray(node.train["a"]).T                    # paper A_s (r/n, in)
    blocks = [np.asarray(b[i]).T for i in range(4)]        # paper B_i (out, r/n)
    delta_w = np.asarray(method.materialise(node) - node.base).T
    np.testing.assert_allclose(delta_w, method.scale * sum(bi @ a_s for bi in blocks), rtol=1e-12)
    np.testing.assert_allclose(delta_w, method.scale * sum(blocks) @ a_s, rtol=1e-12)
    assert np.linalg.matrix_rank(delta_w) == 2  # rank r/n


def test_blocks_must_divide_rank():
    with pytest.raises(ValueError, match="blocks must be a positive divisor of rank"):
        BlockLoRA(rank=6, blocks=4)
