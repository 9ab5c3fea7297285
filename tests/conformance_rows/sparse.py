"""Conformance rows of the sparse families: Family C (`jpeft/methods/sparse.py`: SpIEL, LIFT,
SMT, S2FT, LT-SFT) and Family D (`jpeft/methods/lowrank_sparse.py`: SLTrain).

Every row is the identity at init (values start at 0) except SLTrain's pre-training mode, whose
weight is `s·BA + S` with a random `S` and no base. `block=8` and `group=4` divide every adapted
dimension of the shared toy models (24, 32, 40, 48). SpIEL/SMT/S2FT/LT-SFT have no rank option
(`rankless`).
"""

from jpeft.methods import lowrank_sparse as lrs
from jpeft.methods import s2ft
from jpeft.methods import sparse as sp
from tests.conformance_table import Case

ROWS = [
    Case("spiel", "spiel", sp.SpIEL(density=0.05)),
    Case("spiel_sm3_lora_budget", "spiel", sp.SpIEL(lora_rank=1, selection="sm3", chunk=3)),
    Case("spiel_dense_path", "spiel", sp.SpIEL(density=0.05, path="dense"), factored=False),
    Case("lift", "lift", sp.LIFT(rank=4, lora_rank=2, update_interval=2)),
    Case("smt", "smt", sp.SMT(block=8, n_blocks=3), calib=True),
    Case("s2ft_in", "s2ft", s2ft.S2FT(units=4)),
    Case("s2ft_out_heads", "s2ft", s2ft.S2FT(axis="out", group=4, units=2, selection="weight")),
    Case("lt_sft", "lt_sft", sp.LTSFT(density=0.05), calib=True),
    Case("sltrain", "sltrain", lrs.SLTrain(rank=4, alpha=8, density=0.05)),
    Case("sltrain_pretrain", "sltrain", lrs.SLTrain(rank=4, alpha=8, density=0.05, mode="pretrain")),
]
