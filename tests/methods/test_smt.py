"""SMT oracles ([UNVERIFIED details]): block scores are sums of |G| over the
warm-up steps, the top blocks are selected, only they change, block-dense factored form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods import sparse as sp
from tests.methods.helpers import M_OUT, N_IN, kernel, node_for
from tests.methods.test_spiel import assert_support

B = 8


def test_blocks_are_the_top_warmup_gradient_mass_and_only_they_change():
    warmup = [kernel(seed=10 + t) for t in range(3)]
    calib = sp.abs_grad_sum(warmup)
    method = sp.SMT(block=B, n_blocks=4)
    node = node_for(method, kernel(), calib=calib)
    scores = sum(np.abs(np.asarray(g)) for g in warmup).reshape(N_IN // B, B, M_OUT // B, B).sum(axis=(1, 3))
    np.testing.assert_allclose(method.block_scores(calib), scores, rtol=1e-5)
    paper = scores.T.reshape(-1)                                           # block id br·(n/b) + bc
    np.testing.assert_array_equal(node.frozen["blocks"], np.sort(np.argsort(-paper, kind="stable")[:4]))
    k = 4 * B * B
    assert_support(node.frozen["idx"], k)
    assert jpeft.count({"w": node}).trainable == k
    np.testing.assert_array_equal(method.materialise(node), kernel())
    # perturbed values change exactly the selected blocks
    node = node.replace(train={"val": jax.random.normal(jax.random.PRNGKey(1), (k,))})
    changed = np.asarray(method.materialise(node) != node.base).T                      # paper layout
    blocks = changed.reshape(M_OUT // B, B, N_IN // B, B).any(axis=(1, 3)).reshape(-1)
    np.testing.assert_array_equal(np.nonzero(blocks)[0], node.frozen["blocks"])
    x = jax.random.normal(jax.random.PRNGKey(2), (5, N_IN))
    np.testing.assert_allclose(method.matmul(node, x), x @ method.materialise(node), rtol=1e-5, atol=1e-5)


def test_budget_and_bad_shapes():
    method = sp.SMT(block=B, lora_rank=2)                                  # ⌊2(m+n)/b²⌋ = 2 blocks
    node = node_for(method, kernel(), calib=kernel(seed=1))
    assert node.frozen["blocks"].shape == (2 * (M_OUT + N_IN) // B ** 2,)
    with pytest.raises(jpeft.AdapterError, match=r"\(30, 48\).*multiples of block=8"):
        node_for(method, jnp.ones((30, 48)), calib=jnp.ones((30, 48)))
