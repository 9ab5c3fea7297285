"""Conformance rows of the multiplicative / orthogonal family (`jpeft/methods/orthogonal.py`).

ETHER is a reflection, intentionally not the identity at init (`identity_at_init = False`; the explicit
non-identity test is in tests/methods/test_ether.py). `n_blocks=4` divides every adapted
dimension of the shared toy models (24, 32, 40, 48).
"""

from jpeft.methods import orthogonal as orth
from tests.conformance_table import Case

ROWS = [
    Case("ether", "ether", orth.ETHER(n_blocks=4)),
    Case("ether_out", "ether", orth.ETHER(n_blocks=1, side="out")),
    Case("ether_plus", "ether_plus", orth.ETHERPlus(n_blocks=4)),
    Case("ether_plus_hh", "ether_plus", orth.ETHERPlus(n_blocks=4, side="both")),
]
