"""`state_bytes` from shapes alone, checked against closed-form counts."""

import jax
import jax.numpy as jnp
import optax

import jpeft.optim as jo
from experiments.bench_optim import PROJECTED, llama7b


def test_adamw_state_is_two_copies_of_the_params_plus_a_counter():
    params = {"w": jnp.zeros((48, 32)), "b": jnp.zeros((32,), jnp.bfloat16)}
    assert jo.state_bytes(optax.adamw(1e-3), params) == 2 * (48 * 32 * 4 + 32 * 2) + 4


def test_galore_and_dct_states_by_formula():
    m, n, r = 48, 32, 4
    params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32), "b": jax.ShapeDtypeStruct((n,), jnp.float32)}
    counts = 4 * (1 + 2 + 2)  # global count; per leaf: step count + the inner Adam's count
    low = 2 * m * r * 4 + 2 * n * 4  # moments of the projected (m×r) and fall-through (n) leaves
    assert jo.state_bytes(jo.scale_by_galore(rank=r), params) == low + r * n * 4 + counts
    assert jo.state_bytes(jo.scale_by_dct_adamw(rank=r), params) == low + r * 4 + counts
    ng = jo.scale_by_natural_galore(rank=r, history=5)
    assert jo.state_bytes(ng, params) == low + r * n * 4 + 5 * m * r * 4 + counts


def test_llama7b_state_is_sized_without_allocating():
    """~19 GB of fp32 GaLore state: only possible through `jax.eval_shape`."""
    tree = llama7b()
    n_params = sum(x.size for x in jax.tree.leaves(tree))
    assert 6.7e9 < n_params < 6.8e9
    adamw = jo.state_bytes(optax.adamw(1e-3), tree)
    assert adamw == 8 * n_params + 4
    galore = jo.state_bytes(jo.galore(1e-3, rank=1024, include=PROJECTED), tree)
    projected = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    # attention: P (4096×1024) + 2 moments (1024×4096); MLP: Q (1024×4096) + 2 moments (11008×1024)
    expected_low = 32 * 4 * (3 * 4096 * 1024) + 32 * 3 * (1024 * 4096 + 2 * 11008 * 1024)
    assert abs(galore - 4 * (expected_low + 2 * (n_params - projected))) < 1e6  # counters only
    by_path = jo.state_bytes(jo.galore(1e-3, rank=1024, include=PROJECTED), tree, by_path=True)
    assert sum(by_path.values()) == galore
    assert any(p.endswith("basis/left") for p in by_path)
