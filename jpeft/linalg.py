"""Linear algebra shared by SVD/QR-based inits and projectors (always fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def upcast(x: jax.Array) -> jax.Array:
    """`x` in at least float32 (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD `m = u @ diag(s) @ vh` in float32."""
    return jnp.linalg.svd(upcast(m), full_matrices=False, compute_uv=True)


def randomized_svd(key: jax.Array, m: jax.Array, rank: int, niter: int = 4, oversample: int = 8):
    """Leading `rank` singular triplets by randomised subspace iteration (Halko et al. 2011, Alg. 4.4).

    `niter` power iterations with re-orthonormalisation, `oversample` extra probe columns.
    Returns `(u, s, vh)` with shapes `(rows, rank)`, `(rank,)`, `(rank, cols)`.
    """
    m = upcast(m)
    q_dim = min(rank + oversample, *m.shape)
    probe = jax.random.normal(key, (m.shape[1], q_dim), m.dtype)
    q, _ = jnp.linalg.qr(m @ probe)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(m.T @ q)
        q, _ = jnp.linalg.qr(m @ z)
    u_small, s, vh = jnp.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def leading_svd(key: jax.Array, m: jax.Array, rank: int, niter: int | None):
    """Exact thin SVD truncated to `rank` when `niter is None`, randomised SVD otherwise."""
    if niter is None:
        u, s, vh = svd(m)
        return u[:, :rank], s[:rank], vh[:rank]
    return randomized_svd(key, m, rank, niter=niter)
