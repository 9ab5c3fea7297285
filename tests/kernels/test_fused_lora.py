"""fused_lora_matmul: interpret-mode kernel vs reference, forward and gradients."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from tests.kernels._helpers import SMALL, assert_matches, normal, pallas_calls

# Uneven on purpose: 38 tokens, n=40, m=72, r=5 all need padding to the 32-wide tiles.
LEAD, N, M, R = (2, 19), 40, 72, 5


def operands(seed=0):
    x = normal(seed, (*LEAD, N))
    K = normal(seed + 1, (N, M))
    a = normal(seed + 2, (N, R)) / N ** 0.5
    b = normal(seed + 3, (R, M))
    core = normal(seed + 4, (R, R))
    gate = normal(seed + 5, (R,))
    return x, K, a, b, core, gate


def kernel(x, K, a, b, s, core=None, gate=None):
    return pk.fused_lora_matmul(x, K, a, b, s, core, gate, impl="kernel", blocks=SMALL)


@pytest.mark.parametrize("use_core,use_gate", [(False, False), (True, False), (False, True),
                                               (True, True)])
def test_forward_and_grads_match_reference(use_core, use_gate):
    """Values and jax.grad w.r.t. x, a, b, s (and core / gate when present)."""
    x, K, a, b, core, gate = operands()
    args = (x, a, b, jnp.float32(0.75), core if use_core else None, gate if use_gate else None)
    argnums = tuple(i for i, v in enumerate(args) if v is not None)

    def bind(fn):
        return lambda x, a, b, s, core, gate: fn(x, K, a, b, s, core, gate)

    assert_matches(bind(kernel), bind(pk.fused_lora_matmul_reference), args, argnums,
                   normal(9, (*LEAD, M)))


def test_projection_runs_once_per_token_tile():
    """t = x @ a is its own call with one program per token tile, reused by every out tile."""
    x, K, a, b, core, gate = operands()
    jaxpr = jax.make_jaxpr(lambda x: kernel(x, K, a, b, 1.0, core, gate))(x)
    grids = [e.params["grid_mapping"].grid for e in pallas_calls(jaxpr)]
    token_tiles = -(-38 // SMALL.tokens)
    assert grids == [(token_tiles, 1), (token_tiles, -(-M // SMALL.out))]


def test_bad_arguments_raise():
    x, K, a, b, core, gate = operands()
    with pytest.raises(ValueError, match="impl"):
        pk.fused_lora_matmul(x, K, a, b, 1.0, impl="triton")
    with pytest.raises(ValueError, match="b must have shape"):
        pk.fused_lora_matmul(x, K, a, b.T, 1.0)
    with pytest.raises(ValueError, match="core must have shape"):
        pk.fused_lora_matmul(x, K, a, b, 1.0, core=core[:, :2])
    with pytest.raises(ValueError, match="last dimension"):
        pk.fused_lora_matmul(x[..., :-1], K, a, b, 1.0)
    with pytest.raises(ValueError, match="powers of two"):
        pk.fused_lora_matmul(x, K, a, b, 1.0, impl="kernel", blocks=pk.Blocks(24, 32, 32, 16))
