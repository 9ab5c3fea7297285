"""The two Pallas kernels every public op is built from (docs/design.md §5).

`fused_linear_call` computes, per (token tile i, output tile j) program,

    y[i, j] = x[i] @ W[:, j]                       (dense term, optional; W in (in, out) layout,
                                                    or (out, in) with `weight_transposed`)
            + ((t[i] [@ core]) [* gate]) @ b[:, j]  (low-rank term, optional; t = x @ a precomputed)
            + Σ_{entries e in out tile j} val_e · x[i, in_e] placed at column out_e
                                                    (sparse term, optional, gather-based)

and `sddmm_call` computes, for every sparse entry e, Σ_tokens g[:, out_e] · x[:, in_e] (the
sampled product used for dL/dval).

Design (portable to Triton, which has no scratch buffers, no scalar prefetch and runs grid
programs in parallel): grid (token tiles, output tiles); the reduction over the input dimension
is an in-kernel loop over `inner`-wide slices of a full-width x block, accumulating in registers;
integer tables are ordinary full-array inputs. In-block gathers/scatters of the sparse term are
one-hot matmuls (iota == index), which lower everywhere and run on the matrix units; their cost
relative to the dense tile GEMM is about density·(out + inner) (docs in `linear_sparse_delta`).
All operand shapes must already be padded to multiples of the tiles (see `_fused.py`).
Each program holds a (tokens, n) row panel of x and an (n, out) column panel of W as blocks:
fine for Triton (pointers), but on TPU those panels live in VMEM, which bounds n.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import Tiles
from pallas_kernels._plan import SparsePlan

F32 = jnp.float32


class _Layout(NamedTuple):
    """Static description of which terms a fused call has (closed over by the kernel body)."""

    dense: bool
    weight_transposed: bool
    lowrank: bool
    core: bool
    gate: bool
    sparse: bool
    inner: int
    n_inner: int
    chunk: int


def mm(a, b, trans_b: bool = False, exact: bool = False):
    """a @ b (or a @ b.T) with float32 accumulation.

    exact=True forces full-precision inputs (IEEE on Triton, not TF32): used for the one-hot
    gathers/scatters, which must move values unchanged. Other products follow
    `jax.default_matmul_precision`, like XLA's own matmuls.
    """
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if exact else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _one_hot_cols(ids, size: int):
    """(size, C) selector with [p, c] = (p == ids[0, c]); ids is a (1, C) int row."""
    return (lax.broadcasted_iota(jnp.int32, (size, ids.shape[1]), 0) == ids).astype(F32)


def _full_spec(shape):
    """The whole array in every program (used for small or data-indexed operands)."""
    nd = len(shape)
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * nd)


def _table_spec(shape, platform: str):
    """Integer tables read as scalars: SMEM on TPU, a whole-array block elsewhere."""
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return _full_spec(shape)


def call_options(platform: str, semantics: tuple[Literal["parallel", "arbitrary"], ...]):
    """interpret / compiler_params for pl.pallas_call on `platform` ("gpu" selects Triton)."""
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return dict(interpret=False, compiler_params=pltriton.CompilerParams())
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return dict(interpret=False,
                    compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))
    return dict(interpret=True)


def _dense_term(x_ref, w_ref, acc, lay: _Layout):
    def step(kk, acc):
        start = pl.multiple_of(kk * lay.inner, lay.inner)
        xs = x_ref[:, pl.ds(start, lay.inner)]
        if lay.weight_transposed:
            return acc + mm(xs, w_ref[:, pl.ds(start, lay.inner)], trans_b=True)
        return acc + mm(xs, w_ref[pl.ds(start, lay.inner), :])

    return lax.fori_loop(0, lay.n_inner, step, acc)


def _lowrank_term(t_ref, core_ref, gate_ref, b_ref, acc):
    u = t_ref[...].astype(F32)
    if core_ref is not None:
        u = mm(u, core_ref[...].astype(F32))
    if gate_ref is not None:
        u = u * gate_ref[...].astype(F32)
    return acc + mm(u, b_ref[...].astype(F32))


def _sparse_term(x_ref, refs, acc, lay: _Layout):
    """acc[:, out_e] += val_e * x[:, in_e] for the entries of this program's output tile."""
    start_ref, tile_ref, out_ref, in_ref, val_ref = refs
    j = pl.program_id(1)
    lo = start_ref[j * lay.n_inner]
    hi = start_ref[(j + 1) * lay.n_inner]
    block_out = acc.shape[1]

    def step(q, acc):
        col0 = pl.multiple_of(tile_ref[q] * lay.inner, lay.inner)
        xs = x_ref[:, pl.ds(col0, lay.inner)].astype(F32)
        pick = _one_hot_cols(in_ref[pl.ds(q, 1), :], lay.inner)                # (bi, C)
        picked = mm(xs, pick, exact=True) * val_ref[pl.ds(q, 1), :].astype(F32)  # gather
        place = _one_hot_cols(out_ref[pl.ds(q, 1), :], block_out)             # (bo, C)
        return acc + mm(picked, place, trans_b=True, exact=True)              # scatter-add

    return lax.fori_loop(lo, hi, step, acc)


def _fused_body(lay: _Layout, *refs):
    *in_refs, o_ref = refs
    it = iter(in_refs)
    x_ref = next(it)
    acc = jnp.zeros(o_ref.shape, F32)
    if lay.dense:
        acc = _dense_term(x_ref, next(it), acc, lay)
    if lay.lowrank:
        t_ref = next(it)
        core_ref = next(it) if lay.core else None
        gate_ref = next(it) if lay.gate else None
        acc = _lowrank_term(t_ref, core_ref, gate_ref, next(it), acc)
    if lay.sparse:
        acc = _sparse_term(x_ref, [next(it) for _ in range(5)], acc, lay)
    o_ref[...] = acc.astype(o_ref.dtype)


class LowRank(NamedTuple):
    """Padded low-rank operands: t (T, R), core (R, R)|None, gate (1, R)|None, b (R, M)."""

    t: jnp.ndarray
    core: jnp.ndarray | None
    gate: jnp.ndarray | None
    b: jnp.ndarray


class Sparse(NamedTuple):
    """Operands of the sparse term: a plan over (out tile, in tile) blocks and its value table."""

    plan: SparsePlan
    values: jnp.ndarray


def fused_linear_call(x, *, out_dim: int, tiles: Tiles, platform: str, weight=None,
                      weight_transposed: bool = False, lowrank: LowRank | None = None,
                      sparse: Sparse | None = None, out_dtype=None):
    """Pallas call for x @ W + lowrank + sparse on padded operands; returns (T, out_dim)."""
    tokens, n_in = x.shape
    bt, bo, bi = tiles.tokens, tiles.out, tiles.inner
    if tokens % bt or out_dim % bo or n_in % bi:
        raise ValueError(f"operands not padded to tiles: x {x.shape}, out {out_dim}, tiles {tiles}")
    lay = _Layout(weight is not None, weight_transposed, lowrank is not None,
                  lowrank is not None and lowrank.core is not None,
                  lowrank is not None and lowrank.gate is not None,
                  sparse is not None, bi, n_in // bi, tiles.chunk)
    operands = [x]
    specs = [pl.BlockSpec((bt, n_in), lambda i, j: (i, 0))]
    if weight is not None:
        operands.append(weight)
        specs.append(pl.BlockSpec((bo, n_in), lambda i, j: (j, 0)) if weight_transposed
                     else pl.BlockSpec((n_in, bo), lambda i, j: (0, j)))
    if lowrank is not None:
        rank = lowrank.t.shape[1]
        operands.append(lowrank.t)
        specs.append(pl.BlockSpec((bt, rank), lambda i, j: (i, 0)))
        for extra in (lowrank.core, lowrank.gate):
            if extra is not None:
                operands.append(extra)
                specs.append(_full_spec(extra.shape))
        operands.append(lowrank.b)
        specs.append(pl.BlockSpec((rank, bo), lambda i, j: (0, j)))
    if sparse is not None:
        p = sparse.plan
        operands += [p.chunk_start, p.chunk_tile, p.local_out, p.local_in, sparse.values]
        specs += [_table_spec(p.chunk_start.shape, platform),
                  _table_spec(p.chunk_tile.shape, platform),
                  _full_spec(p.local_out.shape), _full_spec(p.local_in.shape),
                  _full_spec(sparse.values.shape)]
    call = pl.pallas_call(
        lambda *refs: _fused_body(lay, *refs),
        out_shape=jax.ShapeDtypeStruct((tokens, out_dim), out_dtype or x.dtype),
        grid=(tokens // bt, out_dim // bo),
        in_specs=specs,
        out_specs=pl.BlockSpec((bt, bo), lambda i, j: (i, j)),
        **call_options(platform, ("parallel", "parallel")),
    )
    return call(*operands)


def _sddmm_body(tiles: Tiles, n_in_tiles: int, g_ref, x_ref, start_ref, out_ref, in_ref, o_ref):
    b = pl.program_id(0) * n_in_tiles + pl.program_id(1)
    n_token_tiles = g_ref.shape[0] // tiles.tokens

    def entry_chunk(q, carry):
        pick_out = _one_hot_cols(out_ref[pl.ds(q, 1), :], g_ref.shape[1])
        pick_in = _one_hot_cols(in_ref[pl.ds(q, 1), :], x_ref.shape[1])

        def token_tile(ti, acc):
            rows = pl.ds(pl.multiple_of(ti * tiles.tokens, tiles.tokens), tiles.tokens)
            gq = mm(g_ref[rows, :], pick_out, exact=True)   # (bt, C): g[:, out_e]
            xq = mm(x_ref[rows, :], pick_in, exact=True)    # (bt, C): x[:, in_e]
            return acc + jnp.sum(gq * xq, axis=0, keepdims=True)

        acc = lax.fori_loop(0, n_token_tiles, token_tile, jnp.zeros((1, tiles.chunk), F32))
        o_ref[pl.ds(q, 1), :] = acc.astype(o_ref.dtype)
        return carry

    lax.fori_loop(start_ref[b], start_ref[b + 1], entry_chunk, 0)


def sddmm_call(g, x, plan: SparsePlan, *, tiles: Tiles, platform: str):
    """Per-slot Σ_tokens g[:, out] · x[:, in] over the plan's (out tile, in tile) blocks.

    g: (T, M) padded output cotangent; x: (T, N) padded input. Returns a float32 (Q, chunk)
    table laid out like `plan` (read it with `unbucket_values`). Grid: one program per block.
    """
    tokens, out_dim = g.shape
    n_in = x.shape[1]
    bo, bi = tiles.out, tiles.inner
    n_in_tiles = n_in // bi
    return pl.pallas_call(
        lambda *refs: _sddmm_body(tiles, n_in_tiles, *refs),
        out_shape=jax.ShapeDtypeStruct(plan.local_out.shape, F32),
        grid=(out_dim // bo, n_in_tiles),
        in_specs=[pl.BlockSpec((tokens, bo), lambda j, k: (0, j)),
                  pl.BlockSpec((tokens, bi), lambda j, k: (0, k)),
                  _table_spec(plan.chunk_start.shape, platform),
                  _full_spec(plan.local_out.shape),
                  _full_spec(plan.local_in.shape)],
        out_specs=_full_spec(plan.local_out.shape),
        **call_options(platform, ("arbitrary", "arbitrary")),
    )(g, x, plan.chunk_start, plan.local_out, plan.local_in)
