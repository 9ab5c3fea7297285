"""Quantised frozen weights (family K, docs/quant.md): NF4 / FP4 blockwise 4-bit codes with
optional double quantisation of the block scales (QLoRA), and symmetric absmax int8 / int4 per
output channel or per group.

    qparams = jpeft.quantize(params, {r".*_proj/kernel": jpeft.quant.nf4()})   # QTensor leaves
    plain = jpeft.dequantize(qparams)

A quantised leaf is a `QTensor` pytree node (packed codes and scales as arrays, the config, the
logical shape and dtype static), so `jit`, `jax.eval_shape`, sharding and Orbax see ordinary
arrays. It is frozen: `jpeft.split` always puts it in the frozen half.

Layout. A 2-D kernel `K (in, out)` is quantised as bitsandbytes quantises the torch weight
`W = Kᵀ (out, in)`: flattened row-major (`Kᵀ.reshape(-1)`), blocks of `block` consecutive values
along the input dimension of one output row, the last block possibly shorter with its own
absmax (byte-compatible with `bitsandbytes.functional.quantize_4bit`). A leaf with more axes is
a stack of its trailing 2-D matrices, each quantised alone, so the leading axes stay slicable.
int8 / int4 keep the kernel's shape: one scale per output channel, or per group of `group`
consecutive input features of one output channel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jpeft.adapter import Adapter
from jpeft.errors import SpecError
from jpeft.paths import leaves_with_paths
from pallas_kernels import on_accelerator

#: bitsandbytes' NF4 table (`get_4bit_type("nf4")`, = QLoRA's), index 0…15.
NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

#: bitsandbytes' FP4 table (`get_4bit_type("fp4")`: 1 sign, 2 exponent, 1 mantissa bit), index 0…15.
FP4_CODE = np.array([0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
                     0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
                     -0.3333333432674408, -0.5, -0.1666666716337204, -0.25], np.float32)


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map by its definition (`create_dynamic_map(True, 7, 8)`: for
    i = 0…6 the midpoints of `linspace(0.1, 1, 2^i + 1)` times ±10^(i−6), then 0 and 1), in
    numpy's float32 arithmetic: within one float32 ulp of `DYN8_CODE`, which holds
    bitsandbytes' exact values (torch's float32 `linspace` rounds some points differently)."""
    values = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        values += list(np.float32(10.0 ** (i - 6)) * means) + list(-np.float32(10.0 ** (i - 6)) * means)
    return np.sort(np.array(values + [0.0, 1.0], np.float32))


#: The code of the double-quantised block scales: bitsandbytes' `create_dynamic_map(signed=True)`
#: (256 sorted float32 values, max 1.0, min -0.99296875, one zero), as little-endian float32 bytes.
DYN8_CODE = np.frombuffer(bytes.fromhex(
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf"
    "000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbf"
    "cdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf"
    "3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabe"
    "cccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be666652be000044be9a9935be333327be"
    "cdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd"
    "0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc"
    "643b1fbc180416bccdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb"
    "5c8f42bb2db21dbbfca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b9"
    "4b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a9defa73a"
    "fca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b6abcf43b8195033c"
    "cdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3d"
    "eb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d"
    "0000f83d66660a3ecdcc183e3333273e9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e"
    "6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33e"
    "ccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f"
    "9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483f"
    "cdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
), "<f4").copy()
DQ_BLOCK = 256   # scales per double-quantisation block


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a leaf is quantised. Build one with `nf4`, `fp4`, `int8` or `int4`."""

    kind: str                  # "nf4" | "fp4" | "int8" | "int4"
    block: int | None = None   # 4-bit float codes: values per absmax block
    double_quant: bool = False  # 4-bit float codes: quantise the absmax values to 8 bit (QLoRA)
    group: int | None = None   # int codes: input features per scale (None: one per output channel)

    KINDS: ClassVar[tuple[str, ...]] = ("nf4", "fp4", "int8", "int4")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise SpecError(f"quantisation kind {self.kind!r}: expected one of {self.KINDS}")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        if self.kind in ("nf4", "fp4"):
            if not positive(self.block) or self.block % 2:
                raise SpecError(f"{self.kind}: block must be a positive even int, got {self.block!r}")
            if self.group is not None:
                raise SpecError(f"{self.kind}: blocks, not groups (group={self.group!r} is for int8 / int4)")
        else:
            if self.group is not None and not positive(self.group):
                raise SpecError(f"{self.kind}: group must be a positive int or None, got {self.group!r}")
            if self.block is not None or self.double_quant:
                raise SpecError(f"{self.kind}: block / double_quant are for nf4 / fp4")

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4


def nf4(block: int = 64, double_quant: bool = True) -> QuantConfig:
    """QLoRA's NormalFloat4 with blocks of 64 and double quantisation (about 4.127 bits per value)."""
    return QuantConfig("nf4", block=block, double_quant=double_quant)


def fp4(block: int = 64, double_quant: bool = False) -> QuantConfig:
    """bitsandbytes' 4-bit float (sign, 2 exponent bits, 1 mantissa bit), blocks of 64."""
    return QuantConfig("fp4", block=block, double_quant=double_quant)


def int8(group: int | None = None) -> QuantConfig:
    """Symmetric absmax int8 codes in [-127, 127]: one scale per output channel, or per `group`
    input features of each output channel."""
    return QuantConfig("int8", group=group)


def int4(group: int | None = 64) -> QuantConfig:
    """Symmetric absmax int4 codes in [-7, 7], two per byte, one scale per `group` input features
    of each output channel (None: per output channel)."""
    return QuantConfig("int4", group=group)


@struct.dataclass
class QTensor:
    """A quantised leaf: `codes` (uint8 packed 4-bit codes, or int8), `scales` (the block / channel
    scales; with double quantisation `absmax_q`, `absmax2`, `offset`), and static metadata."""

    codes: jax.Array
    scales: dict[str, jax.Array]
    config: QuantConfig = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QTensor)


def is_leaf_node(x: Any) -> bool:
    """Adapter nodes and quantised leaves: the units `init`, `apply`, `split` and `quantize`
    treat whole (a flattening predicate)."""
    return isinstance(x, (Adapter, QTensor))


# ----------------------------------------------------------------------------- 4-bit float codes
def _bucketize(u, code: np.ndarray):
    """Index into `code` of the nearest value (`torch.bucketize(right=False)` over the sorted
    code's midpoints: a value on a midpoint takes the lower one), as bitsandbytes does."""
    order = np.argsort(code, kind="stable")
    mid = (code[order[:-1]] + code[order[1:]]) / np.float32(2)
    q = jnp.searchsorted(jnp.asarray(mid), u, side="left")
    return jnp.asarray(order, jnp.int32)[q]


def _blockwise(v, block: int):
    """`(absmax, scaled)` of a flat fp32 vector in blocks (the last one may be shorter)."""
    n = v.shape[0]
    full = n - n % block
    parts = []
    head = v[:full].reshape(-1, block)
    amax = jnp.max(jnp.abs(head), axis=1)
    parts.append(jnp.clip(head * (1.0 / jnp.maximum(amax, 1e-38))[:, None], -1, 1).reshape(-1))
    if n % block:
        tail_max = jnp.maximum(jnp.max(jnp.abs(v[full:])), 1e-38)
        amax = jnp.concatenate([amax, tail_max[None]])
        parts.append(jnp.clip(v[full:] / tail_max, -1, 1))  # bitsandbytes divides in the tail block
    return amax, jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _block(config: QuantConfig) -> int:
    """The absmax block size of a 4-bit float config (`QuantConfig` requires one for nf4 / fp4)."""
    if config.block is None:
        raise SpecError(f"{config.kind}: a 4-bit float config needs a block size")
    return config.block


def _unblock(values, amax, block: int):
    n = values.shape[0]
    full = n - n % block
    head = (values[:full].reshape(-1, block) * amax[:full // block, None]).reshape(-1)
    if n % block:
        return jnp.concatenate([head, values[full:] * amax[-1]])
    return head


def _quantize_4bit_matrix(k, config: QuantConfig) -> dict:
    v = jnp.asarray(k, jnp.float32).T.reshape(-1)
    code = NF4_CODE if config.kind == "nf4" else FP4_CODE
    amax, scaled = _blockwise(v, _block(config))
    if scaled.shape[0] % 2:
        scaled = jnp.concatenate([scaled, jnp.zeros((1,), scaled.dtype)])
    q = _bucketize(scaled, code).astype(jnp.uint8)
    out = {"codes": (q[0::2] << 4) | q[1::2]}
    if config.double_quant:
        offset = jnp.mean(amax)
        amax2, scaled2 = _blockwise(amax - offset, DQ_BLOCK)
        out.update(absmax_q=_bucketize(scaled2, DYN8_CODE).astype(jnp.uint8), absmax2=amax2, offset=offset)
    else:
        out["absmax"] = amax
    return out


def _absmax_of(q: dict, config: QuantConfig, tie=None):
    if not config.double_quant:
        return q["absmax"]
    dyn = jnp.asarray(DYN8_CODE) if tie is None else jnp.asarray(DYN8_CODE) + tie
    return _unblock(dyn[q["absmax_q"].astype(jnp.int32)], q["absmax2"], DQ_BLOCK) + q["offset"]


def _byte_table(values: np.ndarray) -> np.ndarray:
    """`(256, 2)`: the values of a byte's high and low nibble. Looking a packed byte up here is
    one gather on the codes themselves (no unpacked intermediate)."""
    byte = np.arange(256)
    return np.stack([values[byte >> 4], values[byte & 0xF]], axis=1).astype(np.float32)


_NF4_BYTES, _FP4_BYTES = _byte_table(NF4_CODE), _byte_table(FP4_CODE)
_INT4_BYTES = _byte_table(np.arange(16, dtype=np.float32) - 8)


def _lookup_bytes(table: np.ndarray, packed, count: int, tie=None):
    t = jnp.asarray(table) if tie is None else jnp.asarray(table) + tie   # (see `dequantized_after`)
    return t[packed.astype(jnp.int32)].reshape(-1)[:count]


def _dequantize_4bit_matrix(q: dict, config: QuantConfig, shape: tuple[int, int], tie=None):
    table = _NF4_BYTES if config.kind == "nf4" else _FP4_BYTES
    values = _lookup_bytes(table, q["codes"], shape[0] * shape[1], tie)
    w = _unblock(values, _absmax_of(q, config, tie), _block(config))
    return w.reshape(shape[1], shape[0]).T


# ----------------------------------------------------------------------------- int codes
def _bound(config: QuantConfig) -> int:
    return 127 if config.kind == "int8" else 7


def group_absmax(k, group: int | None) -> jax.Array:
    """`(in/g, out)` absmax of each `group` input features of each output of an `(in, out)`
    matrix (None: one per output), in fp32; 1 for an all-zero group (its codes are 0)."""
    k = jnp.asarray(k, jnp.float32)
    n, m = k.shape
    amax = jnp.max(jnp.abs(k.reshape(n // (group or n), group or n, m)), axis=1)
    return jnp.where(amax > 0, amax, 1.0)


def _quantize_int_matrix(k, config: QuantConfig) -> dict:
    k = jnp.asarray(k, jnp.float32)
    n, m = k.shape
    g = config.group or n
    grouped = k.reshape(n // g, g, m)
    amax = group_absmax(k, config.group)                           # (n/g, out)
    # round-half-even of w·(bound/absmax), as bitsandbytes' int8_vectorwise_quant (after its fp16 cast)
    codes = jnp.round(grouped * (_bound(config) / amax)[:, None, :]).astype(jnp.int8).reshape(n, m)
    return {"codes": pack_int_codes(codes, config), "scale": amax / _bound(config)}


def pack_int_codes(codes: jax.Array, config: QuantConfig) -> jax.Array:
    """int8 codes `(in, out)` as a `QTensor` of `config` stores them: as they are (int8), or two per
    byte for int4 (`code + 8` in a nibble, row-major, the first in the high nibble; -8..7)."""
    if config.kind != "int4":
        return codes
    flat = (codes.astype(jnp.int32) + 8).astype(jnp.uint8).reshape(-1)
    if flat.shape[0] % 2:
        flat = jnp.concatenate([flat, jnp.full((1,), 8, jnp.uint8)])
    return (flat[0::2] << 4) | flat[1::2]


def _dequantize_int_matrix(q: dict, config: QuantConfig, shape: tuple[int, int], tie=None):
    n, m = shape
    codes = q["codes"]
    if config.kind == "int4":
        codes = _lookup_bytes(_INT4_BYTES, codes, n * m, tie)
    g = config.group or n
    grouped = codes.reshape(n // g, g, m).astype(jnp.float32)
    scale = q["scale"] if tie is None else q["scale"] + tie   # (see `_after`)
    return (grouped * scale[:, None, :]).reshape(n, m)


# ----------------------------------------------------------------------------- arrays
def _per_matrix(fn, x, lead: int, unpack: bool = False):
    """`fn` on each trailing 2-D matrix (vmapped over `lead` leading axes); `unpack`: `x` is a
    tuple of arguments."""
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn(*x) if unpack else fn(x)


def check_quantizable(path: str, leaf: Any, config: QuantConfig) -> None:
    """A `SpecError` naming `path` unless `leaf` is a floating-point array `config` can quantise."""
    shape, dtype = tuple(np.shape(leaf)), getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise SpecError(f"{path}: only floating-point leaves are quantised; this one is {dtype} {shape}")
    if len(shape) < 2:
        raise SpecError(f"{path}: shape {shape}: quantisation is for kernels (at least 2-D; a leaf with more "
                        "axes is a stack of its trailing 2-D matrices); leave vectors unquantised")
    if config.group is not None and shape[-2] % config.group:
        raise SpecError(f"{path}: shape {shape}: {config.kind} group {config.group} does not divide the input "
                        f"dimension {shape[-2]} (choose a divisor, or group=None for one scale per output channel)")


def quantize_array(w: Any, config: QuantConfig, path: str = "array") -> QTensor:
    """One leaf as a `QTensor` (see the module docstring for the layout)."""
    check_quantizable(path, w, config)
    shape = tuple(np.shape(w))
    one = _quantize_4bit_matrix if config.kind in ("nf4", "fp4") else _quantize_int_matrix
    parts = _per_matrix(lambda k: one(k, config), jnp.asarray(w), len(shape) - 2)
    codes = parts.pop("codes")
    return QTensor(codes=codes, scales=parts, config=config, shape=shape, dtype=str(jnp.dtype(w.dtype)))


def _lead(q: QTensor) -> int:
    """Leading stack axes the arrays hold now (fewer than `q.shape` has inside `nn.scan`, which
    slices them): 4-bit codes are `(*lead, bytes)`, int8 codes `(*lead, in, out)`."""
    return q.codes.ndim - (1 if q.config.kind in ("nf4", "fp4", "int4") else 2)


def dequantize_array(q: QTensor, dtype: Any = None, *, tie: jax.Array | None = None) -> jax.Array:
    """The leaf back as an array (fp32 arithmetic, then cast to the dtype it had, or `dtype`).
    `tie`: a float32 zero added to the first float operand (see `qmatmul`)."""
    one = _dequantize_4bit_matrix if q.config.kind in ("nf4", "fp4") else _dequantize_int_matrix
    matrix = cast(tuple[int, int], tuple(q.shape[-2:]))  # a quantised leaf is at least 2-D
    w = _per_matrix(lambda codes, scales: one({"codes": codes, **scales}, q.config, matrix, tie),
                    (q.codes, q.scales), _lead(q), unpack=True)
    return w.astype(dtype or q.dtype)


def kernel_operands(q: QTensor):
    """`(codes (m, n/2), absmax (n/block, m), table)` of a 2-D NF4 / FP4 leaf whose blocks lie
    within the input features of one output (`n % block == 0`): the operands of
    `pallas_kernels.fused_qlora_matmul` (double-quantised scales expanded, 1/block of the
    weight's size); None for any other leaf (it runs through `qmatmul`)."""
    if q.config.kind not in ("nf4", "fp4") or q.codes.ndim != 1 or len(q.shape) != 2 or q.shape[0] % _block(q.config):
        return None
    n, m = q.shape
    absmax = _absmax_of(q.scales, q.config).reshape(m, n // _block(q.config)).T
    table = tuple(float(v) for v in (NF4_CODE if q.config.kind == "nf4" else FP4_CODE))
    return q.codes.reshape(m, n // 2), absmax, table


def placeholder(q: QTensor) -> jax.Array:
    """A stand-in array of `q`'s logical shape (zeros) that depends on its codes: what a model
    multiplies where `jpeft.factored` intercepts the op and contracts with `q` itself. Any other
    use of it shows up as a dependence on the codes (and the leaf is then materialised)."""
    shape = (*q.codes.shape[:_lead(q)], *q.shape[-2:])
    tie = (q.codes.reshape(-1)[0] * 0).astype(q.dtype)
    return jnp.broadcast_to(tie, shape)


def dequantized_after(q: QTensor, t: jax.Array, dtype) -> jax.Array:
    """`q` dequantised only once `t` (this layer's input, or its output gradient) exists, as its
    own computation (never merged with another dequantisation of `q`).

    On GPU/TPU an optimisation barrier says exactly this. XLA:CPU drops barriers before common-
    subexpression elimination, which then merges the backward pass's dequantisation with the
    forward's and keeps every layer's looked-up codes alive until its backward; there `0·t` is
    added to the code table (or the int scales) instead (`t` finite: exact), which makes the two
    dequantisations different values."""
    if on_accelerator():
        return dequantize_array(jax.lax.optimization_barrier((q, t))[0], dtype)
    return dequantize_array(q, dtype, tie=jnp.reshape(t, (-1,))[0].astype(jnp.float32) * 0)


@jax.custom_vjp
def qmatmul(x: jax.Array, q: QTensor) -> jax.Array:
    """`x @ dequantize(q)` over the last axis of `x`, in `result_type(x, q.dtype)`. The weight is
    dequantised when the layer runs and again in its backward pass, never kept in between (a
    quantised base is frozen: only `x` gets a gradient)."""
    dt = jnp.result_type(x.dtype, jnp.dtype(q.dtype))
    return x.astype(dt) @ dequantized_after(q, x, dt)


def _qmatmul_fwd(x, q):
    return qmatmul(x, q), (q, jnp.zeros((0,), x.dtype))   # (x's dtype, carried as an empty array)


def _qmatmul_bwd(res, g):
    q, like = res
    dx = (g @ dequantized_after(q, g, g.dtype).T).astype(like.dtype)
    return dx, frozen_zeros(q)


def frozen_zeros(q: QTensor) -> QTensor:
    """The cotangent of a quantised (frozen) leaf in a `custom_vjp`: zeros (float0 for the codes)."""
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact) \
        else jnp.zeros_like(a)  # noqa: E731
    return jax.tree.map(zero, q)


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


# ----------------------------------------------------------------------------- trees
def quantize(params: Any, rules: dict[str, QuantConfig]) -> Any:
    """Every leaf whose path fully matches a regex of `rules` (the first that matches, in order)
    becomes a `QTensor`; other leaves are unchanged. A matched adapter node (after `jpeft.init`)
    gets its frozen base quantised, never its trainable arrays: this is how a base-rewriting init
    is quantised (QPiSSA: `jpeft.init` PiSSA on the full-precision tree, then quantise the
    residual it leaves)."""
    compiled = []
    for pattern, config in rules.items():
        if not isinstance(config, QuantConfig):
            raise SpecError(f"quantize rule {pattern!r}: expected a jpeft.quant config (nf4(), fp4(), int8(), "
                            f"int4()), got {config!r}")
        compiled.append((re.compile(pattern), config))
    used = set()
    leaves = []
    for path, leaf in leaves_with_paths(params, is_leaf=is_leaf_node):
        found = next(((i, c) for i, (rx, c) in enumerate(compiled) if rx.fullmatch(path)), None)
        if found is None:
            leaves.append(leaf)
            continue
        used.add(found[0])
        if isinstance(leaf, Adapter):
            if not leaf.method.quantized_base or leaf.base is None or is_quantized(leaf.base):
                why = ("already quantised" if is_quantized(leaf.base) else
                       f"{leaf.method.name} does not take a quantised base (its trainable arrays are never "
                       "quantised)")
                raise SpecError(f"{path}: an adapter node whose base cannot be quantised: {why}")
            leaves.append(leaf.replace(base=quantize_array(leaf.base, found[1], path)))
            continue
        if is_quantized(leaf):
            raise SpecError(f"{path}: already quantised ({leaf.config})")
        leaves.append(quantize_array(leaf, found[1], path))
    unused = [p for i, (p, _) in enumerate(rules.items()) if i not in used]
    if unused:
        raise SpecError(f"quantize: rule(s) {unused} matched no leaf")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_leaf_node), leaves)


def dequantize(tree: Any, dtype: Any = None, *, bases: bool = True) -> Any:
    """Every `QTensor` of `tree` as a plain array; with `bases` also the quantised base of every
    adapter node."""
    def one(x):
        if is_quantized(x):
            return dequantize_array(x, dtype)
        if bases and isinstance(x, Adapter) and is_quantized(x.base):
            return x.replace(base=dequantize_array(x.base, dtype))
        return x

    return jax.tree.map(one, tree, is_leaf=is_leaf_node)


def stored_bytes(tree: Any) -> int:
    """Bytes of every array of `tree` as stored (packed codes and scales for `QTensor`s)."""
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def logical_size(tree: Any) -> int:
    """Scalars of `tree` counted as the parameters they stand for (a `QTensor` counts its logical
    shape, not its packed bytes)."""
    return int(sum(x.size if is_quantized(x) else np.prod(np.shape(x))
                   for x in jax.tree.leaves(tree, is_leaf=is_quantized)))


__all__ = ["DYN8_CODE", "FP4_CODE", "dynamic_map", "NF4_CODE", "QTensor", "QuantConfig", "check_quantizable",
           "dequantize", "dequantize_array", "dequantized_after", "fp4", "frozen_zeros", "group_absmax", "int4", "int8",
           "is_leaf_node", "is_quantized", "kernel_operands", "logical_size", "nf4", "pack_int_codes", "placeholder",
           "qmatmul", "quantize", "quantize_array", "stored_bytes"]
