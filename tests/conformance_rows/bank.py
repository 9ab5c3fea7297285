"""Conformance rows for family G (shared bank / random bases): `jpeft/methods/bank.py`."""

from jpeft.methods.bank import BlockLoRA, LoRI, MSPLoRA, RandLoRA, S2LoRA
from jpeft.methods.vb_lora import VBLoRA
from tests.conformance_table import Case

ROWS = [
    # VB-LoRA is intentionally not the identity at init (BA ≠ 0; `identity_at_init = False`): its
    # non-identity is asserted in tests/methods/test_vb_lora.py. vector_length 8 divides every
    # adapted dimension of the conformance / factored toy models (24, 32, 40, 48).
    Case("vb_lora", "vb_lora", VBLoRA(rank=4, num_vectors=16, vector_length=8, topk=2)),
    Case("randlora", "randlora", RandLoRA(rank=4, alpha=32.0)),
    Case("s2_lora", "s2_lora", S2LoRA(rank=4, alpha=8.0)),
    Case("msplora", "msplora", MSPLoRA(rank=4, mid_rank=3, layer_rank=2, alpha=8.0)),
    Case("block_lora", "block_lora", BlockLoRA(rank=4, alpha=8.0, blocks=2)),
    Case("lori", "lori", LoRI(rank=4, alpha=8.0)),
]
