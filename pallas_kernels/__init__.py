"""Pallas kernels for jpeft (docs/design.md §5).

Each kernel has a pure-jnp reference, a Pallas kernel wrapped in `jax.custom_vjp`, and a
dispatcher (`impl="auto"|"kernel"|"reference"`: kernel on GPU/TPU, reference on CPU; a kernel
forced on CPU runs in Pallas interpret mode). Flax kernel layout: K (n, m), y = x @ K.
"""

from pallas_kernels._common import DENSE_DENSITY_THRESHOLD, Blocks, on_accelerator, resolve_impl
from pallas_kernels.lora import fused_lora_matmul
from pallas_kernels.lr_sparse import fused_lr_sparse_matmul
from pallas_kernels.qlora import fused_qlora_matmul, fused_qlora_matmul_reference
from pallas_kernels.reference import (
    fused_lora_matmul_reference,
    fused_lr_sparse_matmul_reference,
    linear_sparse_delta_reference,
    scatter_delta,
)
from pallas_kernels.sparse import linear_sparse_delta

__all__ = [
    "Blocks",
    "DENSE_DENSITY_THRESHOLD",
    "fused_lora_matmul",
    "fused_lora_matmul_reference",
    "fused_lr_sparse_matmul",
    "fused_lr_sparse_matmul_reference",
    "fused_qlora_matmul",
    "fused_qlora_matmul_reference",
    "linear_sparse_delta",
    "linear_sparse_delta_reference",
    "on_accelerator",
    "resolve_impl",
    "scatter_delta",
]
