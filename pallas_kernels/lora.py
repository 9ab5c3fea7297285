"""Fused base + LoRA matmul (family A; docs/design.md §5)."""

from __future__ import annotations

from pallas_kernels._common import check_lowrank
from pallas_kernels._dispatch import dispatch


def fused_lora_matmul(x, K, a, b, s, core=None, gate=None, *, impl: str = "auto", blocks=None):
    """y = x @ K + s·((x @ a) [@ core] [* gate]) @ b in one pass over the output tiles.

    Kernel layout (Flax, y = x @ K): x (..., n), K (n, m) frozen, a = Aᵀ (n, r), b = Bᵀ (r, m).
    The optional r x r `core` multiplies the (tokens, r) panel t = x @ a on the right, t @ core,
    so ΔK = s·a @ core @ diag(gate) @ b; it is the transpose of the paper-layout core
    (`W` is `(out, in)`), which writes (x @ Aᵀ) @ coreᵀ. The optional diagonal `gate` (r,) scales
    the panel's columns after the core (SoRA/KaSA/AdaLoRA). `s`: Python float or traced scalar.

    The kernel computes t = x @ a once per token tile (a projection call), then one fused call per
    (token tile, out tile) adds x @ K and ((t @ core) * s·gate) @ b without leaving the tile.
    Gradients: x, a, b, core, gate, s; K is frozen in every impl (its gradient is zero).
    impl: "auto" (kernel on GPU/TPU, reference on CPU) | "kernel" (interpret mode on CPU) |
    "reference". blocks: `Blocks(tokens, out, inner, chunk)`, powers of two.
    """
    n, m = K.shape
    check_lowrank(n, m, a, b, core, gate)
    return dispatch(x, m=m, n=n, impl=impl, blocks=blocks, K=K, a=a, b=b, core=core, gate=gate,
                    s=s)
