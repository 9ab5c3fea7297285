"""Bucketing of sparse entries into per-block chunks (pallas_kernels/_plan.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._plan import bucket_values, build_plan, num_chunks, unbucket_values

OUT_BLOCK, IN_BLOCK, N_OUT, N_IN, CHUNK = 8, 4, 3, 5, 4


def _plan(out_ids, in_ids):
    return jax.jit(lambda o, i: build_plan(o, i, out_block=OUT_BLOCK, in_block=IN_BLOCK,
                                           n_out_tiles=N_OUT, n_in_tiles=N_IN, chunk=CHUNK))(
        out_ids, in_ids)


def test_every_entry_lands_in_its_block_chunk_and_round_trips():
    rng = np.random.default_rng(0)
    cells = rng.choice(OUT_BLOCK * N_OUT * IN_BLOCK * N_IN, size=70, replace=False)
    cells = np.concatenate([cells[cells >= 40], np.arange(12)])  # crowd one block
    out_ids, in_ids = np.divmod(cells, IN_BLOCK * N_IN)
    plan = _plan(jnp.asarray(out_ids), jnp.asarray(in_ids))
    slot = np.asarray(plan.slot)
    q = np.asarray(plan.chunk_start)
    assert len(set(slot.tolist())) == len(slot)
    assert plan.local_out.shape[0] == num_chunks(len(cells), N_OUT * N_IN, CHUNK)
    for e, s in enumerate(slot):
        block = (out_ids[e] // OUT_BLOCK) * N_IN + in_ids[e] // IN_BLOCK
        assert q[block] <= s // CHUNK < q[block + 1]
        assert plan.chunk_tile[s // CHUNK] == in_ids[e] // IN_BLOCK
        assert plan.local_out.reshape(-1)[s] == out_ids[e] % OUT_BLOCK
        assert plan.local_in.reshape(-1)[s] == in_ids[e] % IN_BLOCK
    val = jnp.arange(1, len(cells) + 1, dtype=jnp.float32)
    table = bucket_values(plan, val)
    assert float(jnp.sum(table)) == float(jnp.sum(val))  # padding slots hold zeros
    np.testing.assert_array_equal(unbucket_values(plan, table), val)
