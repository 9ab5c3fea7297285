"""Dispatcher shared by the public kernels: kernel on GPU/TPU, reference on CPU (docs/design.md §5).

Every impl treats K as frozen (`lax.stop_gradient` on the reference path, a None cotangent in the
custom VJP), so `jax.grad` w.r.t. K is zero whichever impl runs. path="dense" (the scatter-then-GEMM
fallback of the sparse term) is plain XLA on every backend; `impl` selects the sparse/fused path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import flatten_tokens, platform, resolve_impl, resolve_tiles, unflatten_tokens
from pallas_kernels._fused import Config, fused_apply
from pallas_kernels.reference import reference_apply

# Jitted with the static config so that eager calls reuse the traced kernels (an eager
# pallas_call would otherwise be re-traced and re-compiled on every call).
_kernel_apply = jax.jit(fused_apply, static_argnums=(0,))


def dispatch(x, *, m: int, n: int, impl: str, blocks, path: str = "sparse", K=None, a=None,
             b=None, core=None, gate=None, s=1.0, idx=None, val=None):
    """Flatten tokens, freeze K, and run the kernel or the reference; returns (..., m)."""
    impl = resolve_impl(impl)
    x2d, lead = flatten_tokens(x, n)
    K = None if K is None else lax.stop_gradient(K)
    terms = dict(K=K, a=a, b=b, core=core, gate=gate, idx=idx, val=val)
    if impl == "reference" or path == "dense":
        y = reference_apply(x2d, m=m, n=n, s=s, path=path, **terms)
    else:
        plat = platform()
        cfg = Config(m, n, resolve_tiles(blocks, x2d.shape[0], m, n, plat), plat)
        s_arr = jnp.asarray(s, jnp.float32)
        y = _kernel_apply(cfg, x2d, K, a, b, core, gate, s_arr, idx, val)
    return unflatten_tokens(y, lead)
