"""Helpers shared by every kernel: backend dispatch, token flattening, padding, block sizes.

See docs/design.md §5. Nothing here is kernel-specific; the kernels import these so that dispatch,
tiling and padding rules are identical across `fused_lora_matmul`, `linear_sparse_delta` and
`fused_lr_sparse_matmul`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("auto", "kernel", "reference")
PATHS = ("sparse", "dense", "auto")
# Above ~1% density the dense scatter-then-GEMM fallback is the better default.
DENSE_DENSITY_THRESHOLD = 0.01
MIN_BLOCK = 16  # Triton's dot needs every operand dimension >= 16


class Blocks(NamedTuple):
    """Requested tile sizes (powers of two); each is clipped to the padded problem size.

    tokens: rows of x per program; out: output columns per program; inner: reduction slice
    per loop step; chunk: sparse entries handled per loop step.
    """

    tokens: int = 64
    out: int = 64
    inner: int = 64
    chunk: int = 32


class Tiles(NamedTuple):
    """Resolved tile sizes for one call (all powers of two, hashable: used as a static arg)."""

    tokens: int
    out: int
    inner: int
    chunk: int


def platform() -> str:
    """"gpu", "tpu" or "cpu" (anything without a native Pallas backend counts as "cpu")."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if backend == "tpu" else "cpu"


def on_accelerator() -> bool:
    """True when the default backend can compile Pallas kernels natively (GPU or TPU)."""
    return platform() != "cpu"


def resolve_impl(impl: str) -> str:
    """Map `impl` to "kernel"/"reference": "auto" is the kernel on GPU/TPU, else the reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "kernel" if on_accelerator() else "reference"
    return impl


def resolve_path(path: str, k: int, m: int, n: int) -> str:
    """Map `path` to "sparse" or "dense"; "auto" picks dense above DENSE_DENSITY_THRESHOLD."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "dense" if k > DENSE_DENSITY_THRESHOLD * m * n else "sparse"
    return path


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def round_up(v: int, b: int) -> int:
    return -(-v // b) * b


def pick_block(dim: int, requested: int) -> int:
    """Tile size for a dimension: the requested power of two, shrunk for small dimensions."""
    if not is_pow2(requested):
        raise ValueError(f"block sizes must be powers of two, got {requested}")
    return min(requested, max(MIN_BLOCK, next_pow2(dim)))


# TPU (Mosaic) wants lane dimensions in multiples of 128; Triton is happiest with smaller tiles.
_DEFAULT_BLOCKS = {"tpu": Blocks(128, 128, 128, 128)}


def resolve_tiles(blocks: Blocks | None, tokens: int, m: int, n: int,
                  platform_name: str = "cpu") -> Tiles:
    """Clip requested blocks (default: per-platform) to a (tokens, m, n) problem."""
    b = _DEFAULT_BLOCKS.get(platform_name, Blocks()) if blocks is None else Blocks(*blocks)
    if not is_pow2(b.chunk):
        raise ValueError(f"chunk must be a power of two, got {b.chunk}")
    return Tiles(pick_block(tokens, b.tokens), pick_block(m, b.out), pick_block(n, b.inner),
                 max(MIN_BLOCK, b.chunk))


def rank_pad(r: int) -> int:
    """Padded rank: a power of two >= MIN_BLOCK (zero padding of the factors is exact)."""
    return max(MIN_BLOCK, next_pow2(r))


def pad2d(x, rows: int, cols: int):
    """Zero-pad a 2-D array up to (rows, cols); returns `x` itself when nothing is needed."""
    if x.shape == (rows, cols):
        return x
    if x.shape[0] > rows or x.shape[1] > cols:
        raise ValueError(f"cannot pad {x.shape} down to {(rows, cols)}")
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def flatten_tokens(x, n: int):
    """(..., n) -> ((tokens, n), leading shape)."""
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have last dimension {n} (the kernel's input size), got {x.shape}")
    return x.reshape(-1, n), x.shape[:-1]


def unflatten_tokens(y, lead):
    return y.reshape(*lead, y.shape[-1])


def split_flat_index(idx, n: int):
    """Paper-layout flat indices -> (row = output unit, col = input unit); paper layout is `(out, in)`."""
    return idx // n, idx % n


def check_shape(name: str, arr, shape) -> None:
    if arr is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_lowrank(n: int, m: int, a, b, core, gate) -> int:
    """Validate kernel-layout factors a (n, r), b (r, m), core (r, r), gate (r,); return r."""
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"a must have shape (n={n}, r), got {tuple(a.shape)}")
    r = a.shape[1]
    check_shape("b", b, (r, m))
    check_shape("core", core, (r, r))
    check_shape("gate", gate, (r,))
    return r


def check_sparse(idx, val) -> None:
    """idx: int[k] flat paper-layout indices; val: [k] (family C)."""
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be a 1-D integer array, got {idx.dtype}{tuple(idx.shape)}")
    check_shape("val", val, idx.shape)
