"""Family K + A: quantisation-aware low-rank adapters (docs/quant.md). Training sees
the weight on an integer grid, so the merged model is itself quantised: `jpeft.merge(...,
requantize=True)` gives it as a `jpeft.quant.QTensor` (int4 / int8 codes with the learned scales)
whose dequantisation is, bit for bit, the weight the model was trained with.

Both are jpeft's own documented reading of the formulas (docs/quant.md; their papers' details
beyond the abstracts are [UNVERIFIED]): a symmetric grid (zero point 0), one step size per
output channel or per `group` input features of it, `round` with a straight-through gradient, and
the step sizes trained with the gradient autodiff gives through that (LSQ's: clip, then round;
without its gradient-scale factor).

- **L4Q** (`l4q`): `K_q = δ·clip(⌊(K + s·a@b)/δ⌉, −q, q)`, `q = 2^{bits−1} − 1`, `δ` trainable,
  initialised to the round-to-nearest scale `absmax/q`; `K` frozen in full precision.
- **LR-QAT** (`lr_qat`): the low-rank term on the integer grid,
  `K_q = δ·clip(⌊U + s·a@b⌉, −2^{bits−1}, 2^{bits−1} − 1)` with the frozen `U = φ(K/δ₀)`
  (`δ₀` the round-to-nearest scale; `φ` stores `U` in `base_dtype`, by default bfloat16 for 4
  bits and float32 for 8: the paper's downcasting operator read as a cast) and `δ` trainable
  from `δ₀`.

Neither has a factored form: the rounding acts on the merged weight, so `jpeft.factored`
materialises them per layer (under remat, never saved).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.errors import leaf_error
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.quant import QTensor, QuantConfig, group_absmax, int4, int8, pack_int_codes
from jpeft.registry import register

BASE_DTYPES = ("float32", "bfloat16", "float16")


def round_ste(v: jax.Array) -> jax.Array:
    """`round(v)` forward, identity backward (the straight-through estimator)."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def clip_codes(q: jax.Array, lo: int, hi: int) -> jax.Array:
    """`clip(q, lo, hi)` whose gradient is 1 on `[lo, hi]` (ends included) and 0 outside
    (`jnp.clip` would halve it where `q` equals an end). Applied before rounding, as LSQ does."""
    return jnp.where(q > hi, hi, jnp.where(q < lo, lo, q)).astype(q.dtype)


def _grouped(k: jax.Array, group: int | None) -> jax.Array:
    """`(in, out)` as `(in/g, g, out)`."""
    n, m = k.shape
    g = group or n
    return k.reshape(n // g, g, m)


@dataclasses.dataclass(frozen=True)
class _QAT(Ranked):
    """Shared options and init of the two grid-aware adapters (not registered)."""

    identity_at_init = False   # the weight starts on the grid: round-to-nearest of K, not K
    quantized_merge = True

    rank: int = 8
    alpha: float = 8.0
    bits: int = 4
    group: int | None = None

    def validate(self) -> None:
        n = self.name
        super().validate()
        require(self.bits in (4, 8), f"{n}: bits must be 4 or 8 (int4 / int8 codes), got {self.bits!r}")
        require(self.group is None or (isinstance(self.group, int) and self.group >= 1),
                f"{n}: group must be a positive int or None (one step per output channel), got {self.group!r}")

    @property
    def quant_config(self) -> QuantConfig:
        return int4(group=self.group) if self.bits == 4 else int8(group=self.group)

    def check(self, path, w):
        super().check(path, w)
        if self.group is not None and w.shape[0] % self.group:
            raise leaf_error(path, w.shape, w.dtype, f"group {self.group} must divide the input dimension {w.shape[0]}")

    def rtn_step(self, w: jax.Array) -> jax.Array:
        """Round-to-nearest step sizes `(in/g, out)`: `absmax / (2^{bits−1} − 1)` (1 where a
        group is all zeros), as `jpeft.quant`'s int configs."""
        return group_absmax(w, self.group) / (2 ** (self.bits - 1) - 1)

    def lowrank_init(self, key, w):
        n, m = w.shape
        dt = jnp.promote_types(w.dtype, jnp.float32)
        return kaiming_uniform(key, (n, self.rank), n, dt), jnp.zeros((self.rank, m), dt)

    def delta(self, node, rng=None):
        return self.scale * (linalg.upcast(node.train["a"]) @ linalg.upcast(node.train["b"]))

    # ---------------------------------------------------------------- the grid
    def codes(self, node, ste: bool = True) -> jax.Array:
        """The integer codes `(in/g, g, out)` (float, straight-through when `ste`)."""
        raise NotImplementedError

    def materialise(self, node, rng=None):
        """`δ·codes` in the weight's dtype."""
        step = linalg.upcast(node.train["step"])
        return (self.codes(node) * step[:, None, :]).reshape(node.base.shape).astype(self.weight_dtype(node))

    def merged_quantized(self, node) -> QTensor:
        """The merged weight as the `QTensor` it is on the grid: int codes and the learned steps
        (its dequantisation is `materialise` exactly)."""
        codes = self.codes(node, ste=False).reshape(node.base.shape).astype(jnp.int8)
        return QTensor(codes=pack_int_codes(codes, self.quant_config),
                       scales={"scale": linalg.upcast(node.train["step"])}, config=self.quant_config,
                       shape=tuple(node.base.shape), dtype=self.weight_dtype(node))

    def weight_dtype(self, node) -> str:
        """The leaf's dtype: the frozen base's (L4Q keeps `K`)."""
        return str(jnp.dtype(node.base.dtype))


@register
@dataclasses.dataclass(frozen=True)
class L4Q(_QAT):
    """L4Q (K.4.1): fake-quantise the merged weight with learned step sizes `δ`."""

    name = "l4q"
    paper = "L4Q: LoRA-wise Learned Step-size Quantisation, Jeon, Kim and Kim, ACL 2025"

    def create(self, key, w, calib=None):
        a, b = self.lowrank_init(key, w)
        return self.node(w, train={"a": a.astype(w.dtype), "b": b.astype(w.dtype), "step": self.rtn_step(w)})

    def codes(self, node, ste=True):
        bound = 2 ** (self.bits - 1) - 1
        merged = _grouped(linalg.upcast(node.base) + self.delta(node), self.group)
        v = merged / node.train["step"][:, None, :]
        return round_ste(clip_codes(v, -bound, bound)) if ste else jnp.round(jnp.clip(v, -bound, bound))


@register
@dataclasses.dataclass(frozen=True)
class LRQAT(_QAT):
    """LR-QAT (K.4.2): the low-rank term added on the integer grid of a frozen, downcast `K/δ₀`."""

    name = "lr_qat"
    paper = "LR-QAT: Low-Rank Quantisation-Aware Training, Bondarenko, Del Chiaro and Nagel 2024"

    base_dtype: str | None = None

    def validate(self) -> None:
        super().validate()
        require(self.base_dtype is None or self.base_dtype in BASE_DTYPES,
                f"{self.name}: base_dtype must be None or one of {BASE_DTYPES} (how φ stores K/δ₀), "
                f"got {self.base_dtype!r}")
        require(not (self.bits == 8 and self.base_dtype == "bfloat16"),
                f"{self.name}: base_dtype='bfloat16' with bits=8: |K/δ₀| reaches 127, where bfloat16's spacing "
                "(0.5) moves codes off round-to-nearest; use float16 or float32")

    @property
    def phi_dtype(self) -> str:
        """φ's storage: `base_dtype`, or bfloat16 for 4 bits and float32 for 8 (None)."""
        return self.base_dtype or ("bfloat16" if self.bits == 4 else "float32")

    @property
    def rewrites_base(self) -> bool:
        return True

    def create(self, key, w, calib=None):
        a, b = self.lowrank_init(key, w)
        step = self.rtn_step(w)
        return self.node(self.rebuild_base(w, None), train={"a": a.astype(w.dtype), "b": b.astype(w.dtype),
                                                            "step": step}, frozen={})

    def rebuild_base(self, w, node):
        """`U = φ(K/δ₀)`: the weight on its round-to-nearest grid, downcast to `base_dtype`."""
        grid = _grouped(linalg.upcast(w), self.group) / self.rtn_step(w)[:, None, :]
        return grid.reshape(w.shape).astype(self.phi_dtype)

    def weight_dtype(self, node) -> str:
        """The base holds `φ(K/δ₀)`, not `K`: the factors' dtype (created in the leaf's; a Spec's
        `adapter_dtype` changes it)."""
        return str(jnp.dtype(node.train["a"].dtype))

    def codes(self, node, ste=True):
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        v = _grouped(linalg.upcast(node.base) + self.delta(node), self.group)
        return round_ste(clip_codes(v, lo, hi)) if ste else jnp.round(jnp.clip(v, lo, hi))
