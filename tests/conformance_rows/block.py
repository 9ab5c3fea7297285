"""Conformance rows of the block-grid family (`jpeft/methods/block.py`: GraLoRA)."""

from jpeft.methods import block as blk
from tests.conformance_table import Case

ROWS = [
    Case("gralora", "gralora", blk.GraLoRA(rank=4, alpha=8.0, k=2)),
    Case("gralora_hybrid", "gralora", blk.GraLoRA(rank=4, alpha=8.0, k=2, hybrid_rank=2)),
    Case("gralora_k4", "gralora", blk.GraLoRA(rank=8, alpha=8.0, k=4)),
]
