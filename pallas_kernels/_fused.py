"""One differentiable op behind all three public kernels (docs/design.md §5).

    fused_apply(x, K, a, b, core, gate, s, idx, val)
        = x @ K + s·((x @ a) [@ core] [* gate]) @ b + x @ scatter(idx, val)ᵀ

on 2-D, unpadded operands (every term optional: pass None). Kernel layout: K (n, m), a (n, r),
b (r, m), core (r, r), gate (r,); idx are flat paper-layout (m, n) indices.

Forward: t = x @ a is computed once per token tile by a projection call, then a single fused call
tiles (tokens x out) and adds the dense, low-rank (core/gate/s applied in-kernel) and sparse terms.

Backward (`jax.custom_vjp`; gradients do not flow through pallas_call):
  * K is frozen: its cotangent is None (a zero gradient). idx gets none either.
  * dx is one more fused call with the transposed structure: g @ Kᵀ + dt @ aᵀ + sparseᵀ(g),
    where dt = s·((g @ bᵀ) * gate) @ coreᵀ and sparseᵀ re-buckets the entries by input tile.
  * dval is a sampled product Σ_tokens g[:, row]·x[:, col] (sddmm_call), never an (m, n) array.
  * da, db, dcore, dgate, ds are token-reductions of (tokens x r) panels, done with jnp (XLA).

Uneven shapes are zero-padded up to the tiles (exact). Padding K is a copy per call (forward and
backward): choose blocks that divide n and m for large frozen weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._common import Tiles, pad2d, rank_pad, round_up, split_flat_index
from pallas_kernels._kernels import LowRank, Sparse, fused_linear_call, sddmm_call
from pallas_kernels._plan import bucket_values, build_plan, unbucket_values


class Config(NamedTuple):
    """Static (hashable) part of a call: logical sizes, tiles, and the platform to lower for
    ("gpu": Triton, "tpu": Mosaic, "cpu": Pallas interpret mode)."""

    m: int
    n: int
    tiles: Tiles
    platform: str


class _Dims(NamedTuple):
    tokens: int  # padded token count
    m: int       # padded output size
    n: int       # padded input size


def _dims(cfg: Config, tokens: int) -> _Dims:
    t = cfg.tiles
    return _Dims(round_up(tokens, t.tokens), round_up(cfg.m, t.out), round_up(cfg.n, t.inner))


def _project(x_p, a, cfg: Config):
    """x_p (T_pad, N_pad) @ a (n, r) -> (T_pad, R) float32, once per token tile."""
    r_pad = rank_pad(a.shape[1])
    tiles = cfg.tiles._replace(out=r_pad)
    return fused_linear_call(x_p, out_dim=r_pad, tiles=tiles, platform=cfg.platform,
                             weight=pad2d(a, x_p.shape[1], r_pad), out_dtype=jnp.float32)


def _gate_vector(s, gate, r: int):
    """s folded into the diagonal gate: s·gate (or s·1), shape (r,)."""
    ones = jnp.ones((r,), jnp.float32)
    return s.astype(jnp.float32) * (ones if gate is None else gate.astype(jnp.float32))


def _row(v, size: int):
    return pad2d(v.reshape(1, -1), 1, size)


def _forward_plan(idx, cfg: Config, d: _Dims):
    rows, cols = split_flat_index(idx, cfg.n)
    t = cfg.tiles
    return build_plan(rows, cols, out_block=t.out, in_block=t.inner, n_out_tiles=d.m // t.out,
                      n_in_tiles=d.n // t.inner, chunk=t.chunk)


def _transposed_plan(idx, cfg: Config, d: _Dims):
    rows, cols = split_flat_index(idx, cfg.n)
    t = cfg.tiles
    return build_plan(cols, rows, out_block=t.inner, in_block=t.out, n_out_tiles=d.n // t.inner,
                      n_in_tiles=d.m // t.out, chunk=t.chunk)


def _forward(cfg: Config, x, K, a, b, core, gate, s, idx, val):
    d = _dims(cfg, x.shape[0])
    x_p = pad2d(x, d.tokens, d.n)
    lowrank = t = plan = None
    if a is not None:
        r_pad = rank_pad(a.shape[1])
        t = _project(x_p, a, cfg)
        lowrank = LowRank(t, None if core is None else pad2d(core, r_pad, r_pad),
                          _row(_gate_vector(s, gate, a.shape[1]), r_pad), pad2d(b, r_pad, d.m))
    sparse = None
    if idx is not None and idx.shape[0]:
        plan = _forward_plan(idx, cfg, d)
        sparse = Sparse(plan, bucket_values(plan, val))
    y = fused_linear_call(x_p, out_dim=d.m, tiles=cfg.tiles, platform=cfg.platform,
                          weight=None if K is None else pad2d(K, d.n, d.m), lowrank=lowrank,
                          sparse=sparse, out_dtype=_out_dtype(x, K, b, val))
    return y[: x.shape[0], : cfg.m], (t, plan)


def _out_dtype(*arrays):
    return jnp.result_type(*[a for a in arrays if a is not None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_apply(cfg: Config, x, K, a, b, core, gate, s, idx, val):
    """See the module docstring; `s` must be a float array (a traced scale is allowed)."""
    return _forward(cfg, x, K, a, b, core, gate, s, idx, val)[0]


def _fwd(cfg, x, K, a, b, core, gate, s, idx, val):
    y, (t, plan) = _forward(cfg, x, K, a, b, core, gate, s, idx, val)
    return y, (x, K, a, b, core, gate, s, idx, val, t, plan)


class _LowRankGrads(NamedTuple):
    dt: jnp.ndarray   # (T, r): cotangent of t = x @ a
    da: jnp.ndarray
    db: jnp.ndarray
    dcore: jnp.ndarray | None
    dgate: jnp.ndarray | None
    ds: jnp.ndarray


def _lowrank_grads(x, g, t, a, b, core, gate, s, gb) -> _LowRankGrads:
    """Grads of s·((t @ core) * gate) @ b, t = x @ a, from gb = g @ bᵀ (all (T, r) panels)."""
    u0 = t if core is None else t @ core.astype(jnp.float32)
    gate_s = _gate_vector(s, gate, a.shape[1])
    db = (u0 * gate_s).T @ g.astype(jnp.float32)
    du0 = gb * gate_s
    dgate_s = jnp.sum(gb * u0, axis=0)               # d/d(s·gate)
    dgate = None if gate is None else s * dgate_s
    ds = jnp.sum(dgate_s * (1.0 if gate is None else gate))
    dcore = None if core is None else t.T @ du0
    dt = du0 if core is None else du0 @ core.astype(jnp.float32).T
    da = x.astype(jnp.float32).T @ dt
    return _LowRankGrads(dt, da, db, dcore, dgate, ds)


def _bwd(cfg, res, g):
    x, K, a, b, core, gate, s, idx, val, t, plan = res
    d = _dims(cfg, x.shape[0])
    tiles_t = cfg.tiles._replace(out=cfg.tiles.inner, inner=cfg.tiles.out)
    g_p = pad2d(g, d.tokens, d.m)
    grads = lowrank = None
    if a is not None:
        tokens, r = x.shape[0], a.shape[1]
        gb = _project(g_p, b.T, cfg._replace(tiles=tiles_t))[:tokens, :r]
        grads = _lowrank_grads(x, g, t[:tokens, :r], a, b, core, gate, s, gb)
        r_pad = rank_pad(r)
        lowrank = LowRank(pad2d(grads.dt, d.tokens, r_pad), None, None, pad2d(a.T, r_pad, d.n))
    sparse = dval = None
    if plan is not None:
        plan_t = _transposed_plan(idx, cfg, d)
        sparse = Sparse(plan_t, bucket_values(plan_t, val))
        x_p = pad2d(x, d.tokens, d.n)
        table = sddmm_call(g_p, x_p, plan, tiles=cfg.tiles, platform=cfg.platform)
        dval = unbucket_values(plan, table).astype(val.dtype)
    elif val is not None:
        dval = jnp.zeros_like(val)
    dx = fused_linear_call(g_p, out_dim=d.n, tiles=tiles_t, platform=cfg.platform,
                           weight=None if K is None else pad2d(K, d.n, d.m),
                           weight_transposed=True, lowrank=lowrank, sparse=sparse,
                           out_dtype=x.dtype)[: x.shape[0], : cfg.n]
    return (dx, None, *_cast_lowrank(grads, a, b, core, gate, s), None, dval)


def _cast_lowrank(grads, a, b, core, gate, s):
    """(da, db, dcore, dgate, ds) in the primal dtypes (None where the input is None)."""
    if grads is None:
        return (None,) * 5
    return (grads.da.astype(a.dtype), grads.db.astype(b.dtype),
            None if core is None else grads.dcore.astype(core.dtype),
            None if gate is None else grads.dgate.astype(gate.dtype),
            grads.ds.astype(s.dtype))


fused_apply.defvjp(_fwd, _bwd)
