"""Fused dequantise + matmul (+ LoRA) for a 4-bit blockwise-quantised frozen weight (QLoRA;
docs/quant.md): `y = x @ deq(K) + s·(x @ a) @ b` without an `(n, m)` float weight.

Layout (bitsandbytes' on the torch weight `W = Kᵀ`): `codes (m, n/2)` uint8, row `o` holding the
`n` input features of output `o` two per byte, the even feature in the high nibble; `absmax
(n/block, m)`, the scale of each `block` consecutive input features of each output (`jpeft.quant`
gives both, its double-quantised scales already expanded); `table`, the 16 code values (NF4, FP4).

Forward kernel, grid (token tiles, out tiles): per `block`-wide slice of the input features it
decodes the slice's codes (`(out tile, block/2)` bytes: two nibbles, a 16-way select each),
contracts them with the even / odd input columns of x, and scales the `(tokens, out)` partial
product by the slice's row of `absmax`; the low-rank term `(s·x@a) @ b[:, tile]` is added in the
same tile. Backward (`jax.custom_vjp`): `dx` by a second kernel, grid (token tiles), looping
over input blocks and, inside, out tiles: `(g ⊙ absmax row) @ decoded codes`, the even and odd
columns interleaved afterwards; `da`, `db` are `(tokens, r)` panel products (XLA). The weight is frozen
(zero cotangents for codes and scales). Every impl decodes exactly what `jpeft.quant` decodes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    flatten_tokens,
    pad2d,
    pick_block,
    platform,
    rank_pad,
    resolve_impl,
    round_up,
    unflatten_tokens,
)
from pallas_kernels._kernels import F32, call_options, mm


class QConfig(NamedTuple):
    """Static part of a call: sizes, tiles, the code table and the platform to lower for."""

    m: int             # outputs, padded to the out tile
    n: int
    block: int
    table: tuple[float, ...]
    tokens: int        # token tile
    out: int           # out tile
    platform: str


def check_qlora(x, codes, absmax, table, a, b, block: int) -> tuple[int, int]:
    """`(n, m)` of the quantised weight; a `ValueError` naming the operand otherwise."""
    m, half = codes.shape
    n = 2 * half
    if codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8 (two 4-bit codes per byte), got {codes.dtype}")
    if block < 2 or block % 2 or n % block:
        raise ValueError(f"block {block} must be even and divide the input size {n}")
    if absmax.shape != (n // block, m):
        raise ValueError(f"absmax must be (n/block, m) = {(n // block, m)}, got {absmax.shape}")
    if len(table) != 16:
        raise ValueError(f"table must have the 16 code values, got {len(table)}")
    if x.shape[-1] != n:
        raise ValueError(f"x must have last dimension {n} (the weight's input size), got {x.shape}")
    if (a is None) != (b is None):
        raise ValueError("a and b: pass both (the low-rank term) or neither; "
                         f"got a={'None' if a is None else a.shape}, b={'None' if b is None else b.shape}")
    if a is not None and (a.shape[0] != n or b.shape != (a.shape[1], m)):
        raise ValueError(f"a must be (n, r) and b (r, m) with n={n}, m={m}; got {a.shape}, {b.shape}")
    return n, m


def dequantize_reference(codes, absmax, table, block: int):
    """The float kernel `deq(K)` (n, m): what every impl contracts with."""
    t = jnp.asarray(np.asarray(table, np.float32))
    c = codes.astype(jnp.int32)
    values = jnp.stack([t[c >> 4], t[c & 15]], axis=-1).reshape(codes.shape[0], -1)     # (m, n)
    scale = jnp.repeat(absmax.T, block, axis=1)
    return (values * scale).T


def fused_qlora_matmul_reference(x, codes, absmax, table, a, b, s, *, block: int):
    """jnp reference: `x @ deq(K) + s·(x @ a) @ b` (`a`, `b` may be None: no low-rank term)."""
    check_qlora(x, codes, absmax, table, a, b, block)
    w = lax.stop_gradient(dequantize_reference(codes, absmax, table, block))
    y = x.astype(F32) @ w
    if a is not None:
        y = y + s * ((x @ a) @ b).astype(F32)
    return y.astype(jnp.result_type(x, b) if b is not None else x.dtype)


def fused_qlora_matmul(x, codes, absmax, table, a=None, b=None, s=1.0, *, block: int = 64,
                       impl: str = "auto", tokens_block: int = 64, out_block: int = 128):
    """`x @ deq(K) + s·(x @ a) @ b` (see the module docstring), x `(..., n)`. Gradients: x, a, b
    (and `s` when traced); the quantised weight is frozen. impl: "auto" (kernel on GPU/TPU,
    reference on CPU) | "kernel" (Pallas interpret mode on CPU) | "reference"."""
    n, m = check_qlora(x, codes, absmax, table, a, b, block)
    if resolve_impl(impl) == "reference":
        return fused_qlora_matmul_reference(x, codes, absmax, table, a, b, s, block=block)
    x2d, lead = flatten_tokens(x, n)
    plat = platform()
    bt, bo = pick_block(x2d.shape[0], tokens_block), pick_block(m, out_block)   # powers of two (Triton)
    m_pad = round_up(m, bo)   # padded outputs decode to 0·absmax: exact, a copy of the codes per call
    cfg = QConfig(m_pad, n, block, tuple(float(v) for v in table), bt, bo, plat)
    if a is None:
        a, b = jnp.zeros((n, 1), x.dtype), jnp.zeros((1, m), x.dtype)
    y = _qlora_apply(cfg, x2d, pad2d(codes, m_pad, n // 2), pad2d(absmax.astype(F32), n // block, m_pad), a,
                     pad2d(b, b.shape[0], m_pad), jnp.asarray(s, F32))
    return unflatten_tokens(y[:, :m], lead)


# ----------------------------------------------------------------------------- kernels
def _decode(c, table):
    """16-way select of the code values for int32 codes `c` (lowers on Triton and Mosaic)."""
    out = jnp.zeros(c.shape, F32)
    for k, v in enumerate(table):
        out = jnp.where(c == k, jnp.float32(v), out)
    return out


def _forward_body(cfg: QConfig, xe_ref, xo_ref, codes_ref, absmax_ref, t_ref, b_ref, o_ref):
    half = cfg.block // 2

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * half, half), half)
        c = codes_ref[:, cols].astype(jnp.int32)                       # (bo, block/2)
        part = mm(xe_ref[:, cols].astype(F32), _decode(c >> 4, cfg.table), trans_b=True) + \
            mm(xo_ref[:, cols].astype(F32), _decode(c & 15, cfg.table), trans_b=True)
        return acc + part * absmax_ref[pl.ds(k, 1), :]

    acc = lax.fori_loop(0, cfg.n // cfg.block, step, jnp.zeros(o_ref.shape, F32))
    o_ref[...] = (acc + mm(t_ref[...].astype(F32), b_ref[...].astype(F32))).astype(o_ref.dtype)


def _dx_body(cfg: QConfig, g_ref, codes_ref, absmax_ref, de_ref, do_ref):
    half, bo = cfg.block // 2, cfg.out

    def block_step(k, carry):
        cols = pl.ds(pl.multiple_of(k * half, half), half)

        def out_step(j, acc):
            rows = pl.ds(pl.multiple_of(j * bo, bo), bo)
            gs = g_ref[:, rows].astype(F32) * absmax_ref[pl.ds(k, 1), rows]   # (bt, bo): g ⊙ the block's scales
            c = codes_ref[rows, cols].astype(jnp.int32)                        # (bo, block/2)
            return acc[0] + mm(gs, _decode(c >> 4, cfg.table)), acc[1] + mm(gs, _decode(c & 15, cfg.table))

        zeros = jnp.zeros((de_ref.shape[0], half), F32)
        de, do = lax.fori_loop(0, cfg.m // bo, out_step, (zeros, zeros))
        de_ref[:, cols] = de.astype(de_ref.dtype)
        do_ref[:, cols] = do.astype(do_ref.dtype)
        return carry

    lax.fori_loop(0, cfg.n // cfg.block, block_step, 0)


def _forward_call(cfg: QConfig, xe, xo, codes, absmax, t, b, out_dtype):
    tokens, half_n = xe.shape
    r = t.shape[1]
    return pl.pallas_call(
        functools.partial(_forward_body, cfg),
        out_shape=jax.ShapeDtypeStruct((tokens, cfg.m), out_dtype),
        grid=(tokens // cfg.tokens, cfg.m // cfg.out),
        in_specs=[pl.BlockSpec((cfg.tokens, half_n), lambda i, j: (i, 0)),
                  pl.BlockSpec((cfg.tokens, half_n), lambda i, j: (i, 0)),
                  pl.BlockSpec((cfg.out, half_n), lambda i, j: (j, 0)),
                  pl.BlockSpec((cfg.n // cfg.block, cfg.out), lambda i, j: (0, j)),
                  pl.BlockSpec((cfg.tokens, r), lambda i, j: (i, 0)),
                  pl.BlockSpec((r, cfg.out), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((cfg.tokens, cfg.out), lambda i, j: (i, j)),
        **call_options(cfg.platform, ("parallel", "parallel")),
    )(xe, xo, codes, absmax, t, b)


def _dx_call(cfg: QConfig, g, codes, absmax, out_dtype):
    """(dx_even, dx_odd), each (tokens, n/2): grid over token tiles; each program walks the input
    blocks and, inside, the out tiles (the whole codes array is one block: on TPU it sits in VMEM)."""
    tokens = g.shape[0]
    shape = jax.ShapeDtypeStruct((tokens, cfg.n // 2), out_dtype)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_dx_body, cfg),
        out_shape=(shape, shape),
        grid=(tokens // cfg.tokens,),
        in_specs=[pl.BlockSpec((cfg.tokens, cfg.m), lambda i: (i, 0)), whole(codes), whole(absmax)],
        out_specs=(pl.BlockSpec((cfg.tokens, cfg.n // 2), lambda i: (i, 0)),
                   pl.BlockSpec((cfg.tokens, cfg.n // 2), lambda i: (i, 0))),
        **call_options(cfg.platform, ("parallel",)),
    )(g, codes, absmax)


def _forward(cfg: QConfig, x, codes, absmax, a, b, s):
    tokens = x.shape[0]
    padded = round_up(tokens, cfg.tokens)
    x_p = pad2d(x, padded, cfg.n)
    pairs = x_p.reshape(padded, cfg.n // 2, 2)
    t = (x_p @ a).astype(F32)
    r_pad = rank_pad(a.shape[1])   # zero rank columns: exact
    y = _forward_call(cfg, pairs[..., 0], pairs[..., 1], codes, absmax, pad2d(s * t, padded, r_pad),
                      pad2d(b, r_pad, cfg.m), jnp.result_type(x, b))
    return y[:tokens], t[:tokens]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qlora_apply(cfg: QConfig, x, codes, absmax, a, b, s):
    return _forward(cfg, x, codes, absmax, a, b, s)[0]


def _fwd(cfg, x, codes, absmax, a, b, s):
    y, t = _forward(cfg, x, codes, absmax, a, b, s)
    return y, (x, codes, absmax, a, b, s, t)


def _bwd(cfg, res, g):
    x, codes, absmax, a, b, s, t = res
    tokens = x.shape[0]
    padded = round_up(tokens, cfg.tokens)
    g32 = g.astype(F32)
    de, do = _dx_call(cfg, pad2d(g32, padded, cfg.m), codes, absmax, F32)
    gb = g32 @ b.astype(F32).T                                           # (tokens, r)
    dx = jnp.stack([de[:tokens], do[:tokens]], axis=-1).reshape(tokens, cfg.n) + s * (gb @ a.astype(F32).T)
    da = s * (x.astype(F32).T @ gb)
    db = s * (t.T @ g32)
    ds = jnp.sum(t * gb)
    zero_codes = np.zeros(codes.shape, jax.dtypes.float0)
    return (dx.astype(x.dtype), zero_codes, jnp.zeros_like(absmax), da.astype(a.dtype), db.astype(b.dtype),
            ds.astype(s.dtype))


_qlora_apply.defvjp(_fwd, _bwd)
