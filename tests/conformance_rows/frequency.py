"""Conformance rows of the frequency-domain family (`jpeft/methods/frequency.py`: LoCA)."""

from jpeft.methods import frequency as fq
from tests.conformance_table import Case

ROWS = [
    Case("loca", "loca", fq.LoCA(n_coeffs=16, loc_until=100)),
    Case("loca_alpha", "loca", fq.LoCA(n_coeffs=64, alpha=2.0)),
]
