"""Sparse-delta operations shared by the sparse family and SLTrain: flat index helpers in the papers'
`(out, in)` layout (gather, scatter, top-k, regrowth, moment remapping) and the factored
`x @ (K + scatter(idx, val))` matmul with its chunked custom VJP; on GPU/TPU the sparse path runs
`pallas_kernels`' kernels (`pallas_ops`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jpeft.methods.base import require

PATHS = ("sparse", "dense")  # the factored gather path, or scatter into the kernel then one GEMM
INT32_MAX = 2 ** 31 - 1


def budget(m: int, n: int, density: float | None, lora_rank: int | None) -> int:
    """Number of tunable entries of an `(m, n)` matrix: `⌊density·m·n⌋`, or LoRA-matched
    `min((m+n)·lora_rank, m·n)` (LIFT's budget); at least 1."""
    if lora_rank is not None:
        return max(1, min((m + n) * lora_rank, m * n))
    if density is None:
        raise ValueError("budget: pass density or lora_rank")
    return max(1, min(m * n, math.floor(density * m * n + 1e-9)))


def rows_cols(idx: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """`(row, col) = divmod(idx, n)` of paper-layout flat indices."""
    return idx // n, idx % n


def kernel_flat_to_paper(f: jax.Array, m: int, n: int) -> jax.Array:
    """Kernel-layout flat index `col·m + row` → paper-layout `row·n + col`."""
    return ((f % m) * n + f // m).astype(jnp.int32)


def topk_kernel(score: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`(values, paper flat indices)` of the `k` largest entries of a kernel-layout `(n, m)`
    score (unsorted). Ties go to the lower kernel-flat index."""
    n, m = score.shape
    v, f = lax.top_k(score.reshape(-1), k)
    return v, kernel_flat_to_paper(f, m, n)


def select_topk(score: jax.Array, k: int) -> jax.Array:
    """Sorted paper-layout flat indices of the `k` largest entries of a kernel-layout score."""
    return jnp.sort(topk_kernel(score, k)[1])


def random_indices(key: jax.Array, m: int, n: int, k: int) -> jax.Array:
    """`k` distinct uniformly random flat indices of an `(m, n)` matrix, sorted (int32)."""
    return jnp.sort(jax.random.permutation(key, m * n)[:k]).astype(jnp.int32)


def scatter_kernel(idx: jax.Array, val: jax.Array, n: int, m: int, base: jax.Array | None = None) -> jax.Array:
    """`base + ΔK` (kernel layout `(n, m)`, `ΔK[col, row] = val`); `base=None` means zeros."""
    row, col = rows_cols(idx, n)
    out = jnp.zeros((n, m), val.dtype) if base is None else base
    return out.at[col, row].add(val.astype(out.dtype))


def gather_kernel(g: jax.Array, idx: jax.Array) -> jax.Array:
    """`g[idx]` for a kernel-layout `(n, m)` array and paper-layout flat indices."""
    n, m = g.shape
    row, col = rows_cols(idx, n)
    return g[col, row]


def lookup(sorted_keys: jax.Array, queries: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(position, found)` of each query in a sorted key array (position is clipped)."""
    pos = jnp.clip(jnp.searchsorted(sorted_keys, queries), 0, sorted_keys.shape[0] - 1)
    return pos, sorted_keys[pos] == queries


def remap_moments(old_idx: jax.Array, new_idx: jax.Array, moments, seed=None):
    """Move per-index arrays (optimizer moments, values) from one sorted index set to another
    (explicit optimizer-state surgery): entries whose index is in both sets are carried bit for
    bit; entries of new indices get `seed` (an array aligned with `new_idx`; only its new entries
    are read) or zero; entries of removed indices are dropped.

    `moments` is an array with leading dimension `len(old_idx)` or a list of them; `seed` is then
    None, one array, or a list (with None for "zero") of the same length. Returns the same kind.
    """
    single = not isinstance(moments, (list, tuple))
    ms = [moments] if single else list(moments)
    seeds = [seed] if single else (list(seed) if seed is not None else [None] * len(ms))
    require(len(seeds) == len(ms), "remap_moments: seed must match moments")
    pos, hit = lookup(old_idx, new_idx)
    out = []
    for mom, s in zip(ms, seeds):
        fill = jnp.zeros((), mom.dtype) if s is None else s.astype(mom.dtype)
        mask = hit.reshape(hit.shape + (1,) * (mom.ndim - 1))
        out.append(jnp.where(mask, mom[pos], fill))
    return out[0] if single else out


def regrow(idx: jax.Array, val: jax.Array, cand: jax.Array, score: jax.Array, n_drop) -> jax.Array:
    """Drop-and-grow (RigL; SpIEL reference semantics): the `n_drop` entries of
    smallest `|val|` are outgoing; the candidates not among the remaining entries compete by
    `score` (`-inf` = invalid) for `n_drop` slots. An outgoing index that wins a slot stays (with
    its value); the other winners replace the smallest-`|val|` outgoing entries, so exactly
    `min(n_drop, #valid candidates)` indices change when no winner is outgoing.

    `idx` sorted unique int32[k], `val` [k], `cand` unique int32[c], `score` [c], `n_drop` a
    (traced) int. Returns the new sorted unique int32[k]. Jit-able, fixed shapes.
    """
    k = idx.shape[0]
    n_drop = jnp.asarray(n_drop, jnp.int32)
    order = jnp.argsort(jnp.abs(val), stable=True)
    rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
    outgoing = rank < n_drop
    pos, present = lookup(idx, cand)
    valid = jnp.isfinite(score) & ~(present & ~outgoing[pos])
    s = jnp.where(valid, score, -jnp.inf)
    corder = jnp.argsort(-s, stable=True)
    crank = jnp.zeros(cand.shape, jnp.int32).at[corder].set(jnp.arange(cand.shape[0], dtype=jnp.int32))
    incoming = valid & (crank < n_drop)
    stays = incoming & present                      # outgoing entries that win a slot again
    kept = jnp.zeros((k,), bool).at[jnp.where(stays, pos, k)].set(True, mode="drop")
    fresh = incoming & ~present
    droppable = outgoing & ~kept
    drop_rank = jnp.zeros((k,), jnp.int32).at[order].set(jnp.cumsum(droppable[order].astype(jnp.int32)))
    dropped = droppable & (drop_rank <= jnp.sum(fresh.astype(jnp.int32)))
    big = jnp.asarray(INT32_MAX, idx.dtype)
    merged = jnp.concatenate([jnp.where(dropped, big, idx), jnp.where(fresh, cand.astype(idx.dtype), big)])
    return jnp.sort(merged)[:k]


# ============================================================================ factored matmul
def auto_chunk(k: int, m: int, n: int) -> int:
    """Tokens per chunk of the sparse term: its `(chunk, k)` panels stay near `m·n/24` elements
    (a few of them are live at once), so together well under one `(m, n)` array."""
    return max(1, (m * n) // (24 * k))


def _token_loop(tokens: int, chunk: int, body, init):
    full, rest = divmod(tokens, chunk)
    out = lax.fori_loop(0, full, lambda i, carry: body(i * chunk, chunk, carry), init) if full else init
    return body(full * chunk, rest, out) if rest else out


def _sparse_forward(y, x, idx, val, chunk):
    """`y + x @ scatter(idx, val)ᵀ`, in place over token chunks."""
    tokens, n = x.shape
    row, col = rows_cols(idx, n)

    def body(start, size, y):
        xc = lax.dynamic_slice_in_dim(x, start, size, 0)
        yc = lax.dynamic_slice_in_dim(y, start, size, 0)
        yc = yc.at[:, row].add((xc[:, col] * val).astype(y.dtype), indices_are_sorted=True)
        return lax.dynamic_update_slice_in_dim(y, yc, start, 0)

    return _token_loop(tokens, min(chunk, tokens), body, y)


def _sparse_backward(dx, dy, x, idx, val, chunk):
    """`(dx + dy @ scatter(idx, val), Σ_tokens dy[:, row]·x[:, col])` over token chunks; `dx=None`
    skips the input gradient."""
    tokens, n = x.shape
    row, col = rows_cols(idx, n)

    def body(start, size, carry):
        dx, dval = carry
        g = lax.dynamic_slice_in_dim(dy, start, size, 0)[:, row]
        xc = lax.dynamic_slice_in_dim(x, start, size, 0)
        dval = dval + jnp.sum(g * xc[:, col], axis=0).astype(dval.dtype)
        if dx is not None:
            dxc = lax.dynamic_slice_in_dim(dx, start, size, 0).at[:, col].add((g * val).astype(dx.dtype))
            dx = lax.dynamic_update_slice_in_dim(dx, dxc, start, 0)
        return dx, dval

    return _token_loop(tokens, min(chunk, tokens), body,
                       (dx, jnp.zeros(val.shape, jnp.promote_types(val.dtype, jnp.float32))))


def _linear_sparse_impl(x, K, y0, idx, val, chunk):
    m = K.shape[1] if K is not None else y0.shape[1]
    y = x @ K if K is not None else jnp.zeros((x.shape[0], m), jnp.result_type(x, val))
    if y0 is not None:
        y = y + y0
    return _sparse_forward(y, x, idx, val, chunk)


_linear_sparse = jax.custom_vjp(_linear_sparse_impl, nondiff_argnums=(5,))


def _linear_sparse_fwd(x, K, y0, idx, val, chunk):
    xv, Kv, iv, vv = x.value, None if K is None else K.value, idx.value, val.value
    y0v = None if y0 is None else y0.value
    flags = (x.perturbed, K is not None and K.perturbed, y0 is not None)
    return _linear_sparse_impl(xv, Kv, y0v, iv, vv, chunk), (xv, Kv, iv, vv, flags)


def _linear_sparse_bwd(chunk, res, dy):
    x, K, idx, val, (x_perturbed, k_perturbed, has_y0) = res
    dx = None
    if x_perturbed:
        dx = (dy @ K.T.astype(dy.dtype)).astype(x.dtype) if K is not None else jnp.zeros_like(x)
    dx, dval = _sparse_backward(dx, dy, x, idx, val, chunk)
    dK = (x.T @ dy).astype(K.dtype) if k_perturbed else None
    return dx, dK, dy if has_y0 else None, None, dval.astype(val.dtype)


_linear_sparse.defvjp(_linear_sparse_fwd, _linear_sparse_bwd, symbolic_zeros=True)
_linear_sparse_jit = jax.jit(_linear_sparse, static_argnums=(5,))  # one compiled unit, also when called eagerly


def pallas_ops():
    """The `pallas_kernels` module when running on an accelerator and importable, else None."""
    if jax.default_backend() == "cpu":
        return None
    try:
        import pallas_kernels
    except ImportError:
        return None
    return pallas_kernels


def linear_sparse_delta(x: jax.Array, K: jax.Array | None, idx: jax.Array, val: jax.Array, *,
                        m: int | None = None, y0: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """`[x @ K] [+ y0] + x @ scatter(idx, val)ᵀ` without an `(m, n)` array (forward and backward).

    `x (..., n)`; `K (n, m)` or None (then pass `m`); `y0 (..., m)` an extra term added in place
    (e.g. SLTrain's low-rank branch); `idx` sorted paper-layout flat indices, `val [k]`. Gradients
    flow to `x`, `K` (only when differentiated), `y0` and `val`. `chunk`: tokens per chunk
    (default `auto_chunk`).
    """
    n = x.shape[-1]
    m = K.shape[1] if K is not None else (y0.shape[-1] if y0 is not None else m)
    if m is None:
        raise ValueError("linear_sparse_delta: pass m when K and y0 are None")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    y02 = None if y0 is None else y0.reshape(-1, m)
    chunk = auto_chunk(idx.shape[0], m, n) if chunk is None else chunk
    y = _linear_sparse_jit(x2, K, y02, idx, val.astype(jnp.result_type(x, val)), chunk)
    return y.reshape(*lead, m)


@struct.dataclass
class SparseDelta:
    """A sparse paper-layout `(m, n)` delta: sorted unique flat `idx`, values `val`."""

    idx: jax.Array
    val: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)

    def dense_kernel(self) -> jax.Array:
        """The kernel-layout `(n, m)` dense array."""
        m, n = self.shape
        return scatter_kernel(self.idx, self.val, n, m)
