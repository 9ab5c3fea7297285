"""Family A: additive low-rank adapters `K' = K_base + s·a@b` (LoftQ: docs/quant.md).

Kernel layout: `a ∈ R^{in×r}` is the paper's `Aᵀ`, `b ∈ R^{r×out}` is the paper's `Bᵀ`, so
`ΔK = s·a@b = (s·B A)ᵀ`. The inits differ (LoRA, gaussian, PiSSA, OLoRA, orthogonal, LoRA-GA,
LoftQ);
rsLoRA is the scale `α/√r`; FFA-LoRA freezes `a`; PeriodicLoRA adds a merge-and-restart hook.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jpeft import linalg
from jpeft.adapter import Adapter
from jpeft.errors import leaf_error
from jpeft.execution import kernel_impl
from jpeft.hooks import HookResult
from jpeft.methods.base import Ranked, kaiming_uniform, require
from jpeft.quant import (
    QuantConfig,
    dequantize_array,
    dequantized_after,
    frozen_zeros,
    int8,
    is_quantized,
    kernel_operands,
    nf4,
    qmatmul,
    quantize_array,
)
from jpeft.registry import register, register_alias
from pallas_kernels import fused_lora_matmul, fused_qlora_matmul, on_accelerator, resolve_impl

INITS = ("kaiming", "gaussian", "pissa", "olora", "orthogonal", "lora_ga", "loftq")
RESIDUAL_INITS = ("pissa", "olora", "lora_ga")   # base = K − s·a₀@b₀, rebuilt from the kept factors
LOFTQ_COMPAT = ("paper", "peft")
GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
GA_SCALES = ("stable", "gd", "unit", "weightS")


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """`α/r`, or rsLoRA's `α/√r`."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lowrank_matmul(x, xd, w, a, b, s):
    """`x@w + s·(xd@a)@b`; `xd` is the adapter branch's input (`x`, or its dropped-out copy).

    Per backend (`jpeft.execution`): on GPU/TPU, without dropout, the fused Pallas kernel
    (`pallas_kernels.fused_lora_matmul`; `impl="kernel"` forces it, in interpret mode on CPU); on
    GPU/TPU with `impl="reference"` (or dropout) the plain two-matmul form, which their compilers
    schedule well. On XLA:CPU the form below. A quantised base (QLoRA) takes
    `pallas_kernels.fused_qlora_matmul` where the kernel runs (NF4 / FP4 2-D leaves), else
    `jpeft.quant.qmatmul` (accelerators) or `_cpu_qlowrank_matmul` (XLA:CPU).

    Two choices here are about XLA:CPU, not maths (`experiments/bench_step.py` measures both):

    - When there are at least as many tokens as input features the product is ONE matmul
      `[x, s·xd@a] @ [w; b]`. Written as two matmuls and an add, XLA fuses the cheap add into every
      consumer (SwiGLU's `silu(gate)·up`, forward and backward) and keeps both `[tokens, out]`
      summands alive until the backward instead of their sum (LoRA peak 0.78 → 0.71 of full
      fine-tuning). The `[in+r, out]` weight copy it costs is transient and, under that condition,
      no larger than the buffer it saves; with fewer tokens (decoding, small batches) the
      two-matmul form is kept.
    - The adapter gradients `da = s·xdᵀ(g bᵀ)` and `db = s·(xd a)ᵀ g` contract over tokens. Left to
      itself XLA transposes the big operand (`xd`, or the output gradient `g` with the SwiGLU
      backward fused into a strided copy); `_lowrank_jvp` pins the transposes on the rank-r
      operands instead (LoRA step wall time −15–20% on the reference workload).
    """
    impl = resolve_impl(kernel_impl())
    if is_quantized(w):   # QLoRA: the frozen codes are dequantised inside the product
        operands = kernel_operands(w) if impl == "kernel" and xd is x else None
        if operands is not None:   # GPU/TPU (or forced): the fused Pallas dequantise + matmul + LoRA kernel
            codes, absmax, table = operands
            return fused_qlora_matmul(x, codes, absmax, table, a, b, s, block=w.config.block, impl="kernel")
        if on_accelerator():
            return qmatmul(x, w) + s * ((xd @ a) @ b)
        return _cpu_qlowrank_matmul(x, xd, w, a, b, s)
    if impl == "kernel" and xd is x:
        return fused_lora_matmul(x, w, a, b, s, impl="kernel")
    if on_accelerator():
        return x @ w + s * ((xd @ a) @ b)
    tokens = math.prod(x.shape[:-1])
    flat = lambda t: t.reshape(tokens, t.shape[-1])  # noqa: E731
    y = _lowrank(flat(x), flat(xd), w, a, b, s, tokens >= w.shape[0])
    return y.reshape(*x.shape[:-1], w.shape[1])


def _cpu_qlowrank_matmul(x, xd, q, a, b, s):
    """QLoRA on XLA:CPU: `x@deq(q) + s·(xd@a)@b` in the one-matmul form of the fp32 path (the
    first bullet above; without it the SwiGLU summands of every layer stay alive: +45 MB of
    temporaries on the reference workload, `experiments/bench_quant.py`), the weight dequantised
    in the forward and again in the backward (`jpeft.quant.qmatmul`'s rule), never saved."""
    tokens = math.prod(x.shape[:-1])
    flat = lambda t: t.reshape(tokens, t.shape[-1])  # noqa: E731
    y = _qlowrank(flat(x), flat(xd), q, a, b, s, tokens >= q.shape[-2])
    return y.reshape(*x.shape[:-1], q.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _qlowrank(x, xd, q, a, b, s, stacked):
    return _qlowrank_fwd(x, xd, q, a, b, s, stacked)[0]


def _qlowrank_fwd(x, xd, q, a, b, s, stacked):
    xa = xd @ a
    dt = jnp.result_type(x.dtype, jnp.dtype(q.dtype))
    y = _lowrank_primal(x, xa, dequantized_after(q, x, dt), b, s, stacked)
    return y, (xd, xa, q, a, b, jnp.zeros((0,), x.dtype))   # (x's dtype, carried as an empty array)


def _qlowrank_bwd(s, stacked, res, g):
    xd, xa, q, a, b, like = res
    gb = g @ b.T.astype(g.dtype)
    dx = (g @ dequantized_after(q, g, g.dtype).T).astype(like.dtype)
    dxd = (s * (gb @ a.T.astype(g.dtype))).astype(xd.dtype)
    da = (s * (xd.T.astype(g.dtype) @ gb)).astype(a.dtype)
    db = (s * (xa.T.astype(g.dtype) @ g)).astype(b.dtype)
    return dx, dxd, frozen_zeros(q), da, db


_qlowrank.defvjp(_qlowrank_fwd, _qlowrank_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _lowrank(x, xd, w, a, b, s, stacked):
    return _lowrank_primal(x, xd @ a, w, b, s, stacked)


def _lowrank_primal(x, xa, w, b, s, stacked):
    """`x@w + s·xa@b`: as `[x, s·xa] @ [w; b]` in the common dtype when `stacked`."""
    if not stacked:
        return x @ w + s * (xa @ b)
    dt = jnp.result_type(x, xa, w, b)
    lhs = jnp.concatenate([x.astype(dt), s * xa.astype(dt)], axis=-1)
    return lhs @ jnp.concatenate([w.astype(dt), b.astype(dt)], axis=0)


@_lowrank.defjvp
def _lowrank_jvp(s, stacked, primals, tangents):
    """The tangent of the two-matmul form (2-D `x`, `xd`). Its transpose saves `x`, `xd`, `xd@a`
    (no `[tokens, in+r]` concatenation) and computes no `[in+r, out]` gradient. The two
    `optimization_barrier`s (linear: the transpose of a barrier is a barrier) fix which operand of
    the token contraction is transposed: `(xd a)ᵀ` `[r, tokens]` for `db`, and `(g bᵀ)ᵀ` for
    `da`, whose tangent is written `(daᵀ xdᵀ)ᵀ` so that its cotangent passes through the barrier
    as `[r, tokens]`."""
    x, xd, w, a, b = primals
    dx, dxd, dw, da, db = tangents
    xa = xd @ a
    xa_t = lax.optimization_barrier(xa.T)
    xd_da = lax.optimization_barrier(da.T @ xd.T).T
    tangent = dx @ w + x @ dw + s * ((dxd @ a + xd_da) @ b + xa_t.T @ db)
    return _lowrank_primal(x, xa, w, b, s, stacked), tangent


def dropout_mask(rng: jax.Array, shape, rate: float, dtype) -> jax.Array:
    """Inverted-dropout multiplier: 0 with probability `rate`, `1/(1-rate)` otherwise."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
    return keep.astype(dtype) / (1.0 - rate)


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Ranked):
    """LoRA (Hu et al. 2021) and its inits. `K' = K_base + s·a@b`.

    init:       "kaiming" (a ~ U(±1/√in), b = 0; PEFT default), "gaussian" (a ~ N(0, 1/r²)),
                "pissa" (principal SVD part, residual base), "olora" (QR; PEFT `olora`),
                "orthogonal" (PEFT `orthogonal`; rank even), "lora_ga" (needs `calib`),
                "loftq" (docs/quant.md: the base becomes a quantised `Q` chosen with
                the factors so that `Q + s·a@b ≈ K`; `jpeft.init` returns it as a `QTensor`).
    loftq_bits: 4 (NF4, blocks of 64, no double quantisation, as PEFT) or 8 (`jpeft.quant.int8()`
                per output channel; PEFT casts the weight to fp16 first, jpeft does not).
    loftq_iter: alternations of quantise / rank-r SVD of the residual (PEFT's `loftq_iter`).
    loftq_compat: "paper" (`s·a@b` is the rank-r part of the residual) or "peft" (PEFT assigns
                the factors without dividing by the scale: `a@b` is that part, the effective init
                `Q + s·E_r`; the same when alpha == rank).
    svd_niter:  None for an exact SVD (PiSSA / LoRA-GA); k for a randomised SVD with k power
                iterations (PEFT `pissa_niter_k`; the LoRA-GA reference uses 4).
    dropout:    adapter-branch dropout. The factored path drops inputs of the adapter branch per
                token (PEFT); the materialised path drops input rows of `a`, one mask per step
                (only when an `rng` is given to `jpeft.apply`).
    freeze_a:   keep `a` frozen at its init (FFA-LoRA).
    """

    name = "lora"
    paper = "LoRA: Low-Rank Adaptation of Large Language Models, Hu et al., ICLR 2022 (rsLoRA: Kalajdzievski 2023)"
    quantized_base = True    # QLoRA / QPiSSA (and DoRA: QDoRA)
    quantized_matmul = True  # `lowrank_matmul` takes a quantised base

    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    svd_niter: int | None = None
    freeze_a: bool = False
    ga_direction: str = "ArB2r"
    ga_scale: str = "stable"
    ga_gamma: float = 16.0
    loftq_bits: int = 4
    loftq_iter: int = 1
    loftq_compat: str = "paper"

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.dropout < 1.0, f"{self.name}: dropout must be in [0, 1), got {self.dropout!r}")
        require(self.init in INITS, f"{self.name}: init must be one of {INITS}, got {self.init!r}")
        require(self.init != "orthogonal" or self.rank % 2 == 0,
                f"{self.name}: init='orthogonal' needs an even rank, got {self.rank}")
        require(self.svd_niter is None or self.svd_niter >= 0, f"{self.name}: svd_niter must be None or >= 0")
        require(self.ga_direction in GA_DIRECTIONS, f"{self.name}: ga_direction must be one of {GA_DIRECTIONS}")
        require(self.ga_scale in GA_SCALES, f"{self.name}: ga_scale must be one of {GA_SCALES}")
        require(self.loftq_bits in (4, 8), f"{self.name}: loftq_bits must be 4 or 8, got {self.loftq_bits!r}")
        require(isinstance(self.loftq_iter, int) and self.loftq_iter >= 1,
                f"{self.name}: loftq_iter must be an int >= 1, got {self.loftq_iter!r}")
        require(self.loftq_compat in LOFTQ_COMPAT,
                f"{self.name}: loftq_compat must be one of {LOFTQ_COMPAT}, got {self.loftq_compat!r}")
        if self.init != "loftq":
            changed = [f for f, d in (("loftq_bits", 4), ("loftq_iter", 1), ("loftq_compat", "paper"))
                       if getattr(self, f) != d]
            require(not changed, f"{self.name}: {changed} apply to init='loftq' only (init={self.init!r})")
        require(self.init != "loftq" or self.svd_niter is None,
                f"{self.name}: init='loftq' takes exact SVDs (as PEFT); svd_niter={self.svd_niter!r} would be ignored")

    @property
    def needs_calib(self) -> bool:  # type: ignore[override]
        return self.init == "lora_ga"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.init != "loftq"   # LoftQ: `Q + E_r ≈ K`, the quantisation error less its rank-r part

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.rslora)

    def check(self, path, w):
        super().check(path, w)
        if self.init == "lora_ga" and 2 * self.rank > min(w.shape):
            raise leaf_error(path, w.shape, w.dtype,
                             f"init='lora_ga' needs 2*rank = {2 * self.rank} <= min(in, out) = {min(w.shape)}")

    # ------------------------------------------------------------------ init
    @property
    def rewrites_base(self) -> bool:
        """Inits that move the principal / gradient part into the adapter (`K_res = K − s·a₀@b₀`)."""
        return self.init in (*RESIDUAL_INITS, "loftq")

    @property
    def base_quant(self) -> QuantConfig | None:
        if self.init != "loftq":
            return None
        return nf4(block=64, double_quant=False) if self.loftq_bits == 4 else int8()

    def create(self, key, w, calib=None):
        base, a, b = self.factors(key, w, calib)
        a, b = a.astype(w.dtype), b.astype(w.dtype)
        node = self.lowrank_node(base, a, b)
        if self.init in RESIDUAL_INITS:  # keep the init factors: the base is `rebuild_base(K)` from them
            node = node.replace(frozen={**node.frozen, "a0": a, "b0": b})
        return node

    def lowrank_node(self, base, a, b) -> Adapter:
        if self.freeze_a:
            return self.node(base, train={"b": b}, frozen={"a": a})
        return self.node(base, train={"a": a, "b": b})

    def rebuild_base(self, w, node):
        if self.init == "loftq":   # deterministic: the same alternation on the original weight
            return self.loftq_factors(w)[0]
        if "a0" not in node.frozen:
            return w
        return residual_base(w, node.frozen["a0"], node.frozen["b0"], self.scale)

    def factors(self, key, w, calib=None):
        """`(K_base, a, b)` in kernel layout for this config's `init`."""
        n, m = w.shape
        r, s = self.rank, self.scale
        dt = jnp.promote_types(w.dtype, jnp.float32)
        if self.init == "kaiming":
            return w, kaiming_uniform(key, (n, r), n, dt), jnp.zeros((r, m), dt)
        if self.init == "gaussian":
            return w, jax.random.normal(key, (n, r), dt) / r, jnp.zeros((r, m), dt)
        if self.init == "orthogonal":
            a, b = orthogonal_factors(key, n, m, r, dt)
            return w, a, b
        if self.init == "pissa":
            a, b = pissa_factors(key, w, r, s, self.svd_niter)
        elif self.init == "olora":
            a, b = olora_factors(w, r)
        elif self.init == "loftq":
            return self.loftq_factors(w)
        else:
            a, b = self.lora_ga_factors(key, w, calib)
        return residual_base(w, a, b, s), a, b

    def loftq_factors(self, w):
        """LoftQ (K.3, PEFT `loftq_init`): `R ← K`; T times `Q ← deq(quant(R))`, the rank-r SVD
        `E_r` of `K − Q`, `R ← K − E_r`. Returns `(Q, a, b)` with `s·a@b = E_r` ("paper") or
        `a@b = E_r` ("peft"); kernel layout, so the SVD of `Kᵀ − Qᵀ` is the transpose of this one."""
        config = self.base_quant
        wf = linalg.upcast(w)
        residual = wf
        for t in range(self.loftq_iter):
            q = dequantize_array(quantize_array(residual, config), jnp.float32)
            u, sig, vh = linalg.leading_svd(None, wf - q, self.rank, None)
            if t + 1 < self.loftq_iter:
                residual = wf - (u * sig) @ vh
        root = jnp.sqrt(sig if self.loftq_compat == "peft" else sig / self.scale)
        return q.astype(w.dtype), u * root, root[:, None] * vh

    def lora_ga_factors(self, key, w, grad):
        """LoRA-GA (official repo): factors from the SVD of the gradient."""
        r, s = self.rank, self.scale
        n, m = w.shape
        svd_key, split_key = jax.random.split(key)
        # Paper layout G_p = gradᵀ (out, in); its SVD is the transpose of the kernel-layout one.
        u_k, _, vh_k = linalg.leading_svd(svd_key, grad, 2 * r, self.svd_niter)
        v_p, u_p = u_k, vh_k.T  # right singular vectors of G_p (in) / left (out)
        a_idx, b_idx = ga_split(self.ga_direction, r, split_key)
        a = v_p[:, a_idx]            # = A₀ᵀ, (in, r)
        b = u_p[:, b_idx].T          # = B₀ᵀ, (r, out)
        factor = self.ga_factor(w, m, s)
        return a * factor, b * factor

    def ga_factor(self, w, m, s):
        if self.ga_scale == "stable":
            return m ** 0.25 / math.sqrt(self.ga_gamma)
        if self.ga_scale == "gd":
            return 1.0 / s
        if self.ga_scale == "unit":
            return 1.0
        sigma = jnp.linalg.svd(linalg.upcast(w), compute_uv=False)[: self.rank]
        return jnp.mean(jnp.sqrt(sigma / s))

    # ------------------------------------------------------------------ forward
    def lowrank_factors(self, node: Adapter, rng=None):
        a = node.train["a"] if "a" in node.train else node.frozen["a"]
        b = node.train["b"]
        if rng is not None and self.dropout > 0:
            a = a * dropout_mask(rng, (a.shape[0], 1), self.dropout, a.dtype)
        return a, b

    def delta(self, node: Adapter, rng=None) -> jax.Array:
        a, b = self.lowrank_factors(node, rng)
        return self.scale * (linalg.upcast(a) @ linalg.upcast(b))

    def matmul(self, node, x, rng=None):
        # Computed in the layer's dtype (`x` and the base as the layer promotes them): fp32
        # adapters on a bf16 layer are cast at use; their gradients stay fp32.
        dt = jnp.result_type(x, jnp.dtype(node.base.dtype))   # (a quantised base: the dtype it stands for)
        a = (node.train["a"] if "a" in node.train else node.frozen["a"]).astype(dt)
        b = node.train["b"].astype(dt)
        xd = x if rng is None or self.dropout == 0 else x * dropout_mask(rng, x.shape, self.dropout, x.dtype)
        return lowrank_matmul(x, xd, node.base, a, b, self.scale)

    def matmul_t(self, node, x, rng=None):
        a = node.train["a"] if "a" in node.train else node.frozen["a"]
        b = node.train["b"]
        xd = x if rng is None or self.dropout == 0 else x * dropout_mask(rng, x.shape, self.dropout, x.dtype)
        return x @ node.base.T + self.scale * ((xd @ b.T) @ a.T)

    def conv(self, node, x, conv_base, conv_to, rng=None):
        """PEFT's low-rank conv: `conv(x, K) + s·(conv(x, a) @ b)` (`a` as a conv to r channels,
        `b` a 1×1 map); dropout on the adapter branch's input."""
        a = node.train["a"] if "a" in node.train else node.frozen["a"]
        b = node.train["b"]
        xd = x if rng is None or self.dropout == 0 else x * dropout_mask(rng, x.shape, self.dropout, x.dtype)
        return conv_base(x) + self.scale * (conv_to(xd, a) @ b.astype(x.dtype))

    def lookup(self, node, indices, rng=None):
        """Embedding rows `K[i] + s·a[i]@b` (PEFT's embedding LoRA, dropout-free as PEFT's is)."""
        a = node.train["a"] if "a" in node.train else node.frozen["a"]
        b = node.train["b"]
        return jnp.take(node.base, indices, axis=0) + self.scale * (jnp.take(a, indices, axis=0) @ b)


def residual_base(w, a, b, s):
    """`K − s·a@b` computed in fp32 from the factors as stored (PiSSA, LoRA-GA)."""
    a_up = linalg.upcast(a.astype(w.dtype))
    b_up = linalg.upcast(b.astype(w.dtype))
    return (linalg.upcast(w) - s * (a_up @ b_up)).astype(w.dtype)


def pissa_factors(key, w, r, s, niter):
    """PiSSA (PEFT convention): `s·a@b` is the best rank-r part of `K`."""
    u, sig, vh = linalg.leading_svd(key, w, r, niter)
    root = jnp.sqrt(sig / s)
    return u * root, root[:, None] * vh


def olora_factors(w, r):
    """OLoRA (PEFT `olora_init`): `W = QR` in paper layout, `B = Q_r`, `A = R_r`."""
    q, rr = jnp.linalg.qr(linalg.upcast(w.T))
    return rr[:r].T, q[:, :r].T


def orthogonal_factors(key, n, m, r, dtype):
    """PEFT `orthogonal` init: `a`, `b` built from disjoint rows of one random orthogonal r×r
    matrix, so `a@b = 0` while both factors are non-zero."""
    kq, ka, kb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (r, r), dtype))
    a = jax.random.normal(ka, (n, r // 2), dtype) @ q[0::2]
    b = q[1::2].T @ jax.random.normal(kb, (r // 2, m), dtype)
    return a, b


def ga_split(direction, r, key):
    """Which of the first 2r singular vectors go to A and to B (LoRA-GA `direction`)."""
    idx = jnp.arange(2 * r)
    if direction == "ArB2r":
        return idx[:r], idx[r:]
    if direction == "A2rBr":
        return idx[r:], idx[:r]
    if direction == "ArBr":
        return idx[1::2], idx[0::2]
    perm = jax.random.permutation(key, 2 * r)
    return perm[:r], perm[r:]


@register
@dataclasses.dataclass(frozen=True)
class PeriodicLoRA(LoRA):
    """PeriodicLoRA: LoRA whose adapter is unloaded into the base every `period`
    optimizer steps: `K ← K + μ·s·a@b`, `b ← (1−μ)·b`; with `μ = 1` the adapter restarts from a
    fresh init (`a` re-drawn, `b = 0`). The adapter's optimizer moments are zeroed at each unload.
    """

    name = "periodic_lora"
    paper = "PeriodicLoRA, Meng et al. 2024"
    quantized_base = False  # its hook folds the adapter into the base: a quantised base is not re-quantised yet
    checkpoint_base = True  # the unload hook folds the adapter into the base

    period: int = 100
    unload_fraction: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(self.period >= 1, f"{self.name}: period must be >= 1, got {self.period}")
        require(0.0 < self.unload_fraction <= 1.0, f"{self.name}: unload_fraction must be in (0, 1]")
        require(self.init in ("kaiming", "gaussian"),
                f"{self.name}: the restart re-draws the adapter, so init must be 'kaiming' or 'gaussian'")

    def step_hook(self, nodes, moments, *, step, keys, grads=None):
        """`step` counts the optimizer updates applied so far; unload when it is a multiple of
        `period`."""
        due = jnp.logical_and(step > 0, step % self.period == 0)
        new_nodes = [lax.cond(due, lambda n=n, k=k: self.unload(n, k), lambda n=n: n) for n, k in zip(nodes, keys)]
        zero = lambda t: jnp.where(due, jnp.zeros_like(t), t)  # noqa: E731
        new_moments = [[jax.tree.map(zero, mom) for mom in node_moments] for node_moments in moments]
        return HookResult(new_nodes, new_moments, restarted=due)

    def unload(self, node, key):
        mu = self.unload_fraction
        base = (node.base + mu * self.delta(node)).astype(node.base.dtype)
        if mu < 1.0:
            return node.replace(base=base, train={**node.train, "b": (1.0 - mu) * node.train["b"]})
        _, a, b = self.factors(key, node.base)
        dtype = node.base.dtype
        return self.lowrank_node(base, a.astype(dtype), b.astype(dtype)).replace(state=node.state)


def PiSSA(**cfg) -> LoRA:
    """PiSSA = `LoRA(init="pissa")`."""
    return LoRA(**{**cfg, "init": "pissa"})


def LoRAGA(**cfg) -> LoRA:
    """LoRA-GA = `LoRA(init="lora_ga")`; pass the gradient tree as `jpeft.init(..., calib=)`."""
    return LoRA(**{**cfg, "init": "lora_ga"})


def FFALoRA(**cfg) -> LoRA:
    """FFA-LoRA = `LoRA(freeze_a=True)`."""
    return LoRA(**{**cfg, "freeze_a": True})


register_alias("pissa", "lora", init="pissa",
               paper="PiSSA: Principal Singular Values and Singular Vectors Adaptation, Meng et al. 2024")
register_alias("lora_ga", "lora", init="lora_ga",
               paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation, Wang, Yu and Li 2024")
register_alias("ffa_lora", "lora", freeze_a=True,
               paper="FFA-LoRA: Federated Freeze-A LoRA, Sun et al., ICLR 2024")
