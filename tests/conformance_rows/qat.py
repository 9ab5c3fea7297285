"""Conformance rows of the quantisation-aware adapters (`jpeft/methods/qat.py`: L4Q, LR-QAT)."""

from jpeft.methods import qat
from tests.conformance_table import Case

ROWS = [
    Case("l4q", "l4q", qat.L4Q(rank=4, alpha=8.0), factored=False),
    Case("lr_qat", "lr_qat", qat.LRQAT(rank=4, alpha=8.0), factored=False),
]
