"""Conformance rows of the adaptive-rank family (`jpeft/methods/adaptive.py`: AdaLoRA, SoRA)."""

from jpeft.methods import adaptive as ad
from tests.conformance_table import Case

ROWS = [
    Case("adalora", "adalora", ad.AdaLoRA(init_r=4, target_r=2, alpha=32.0, total_step=10)),
    Case("sora", "sora", ad.SoRA(rank=4, alpha=8.0)),
    Case("sora_reference_schedule", "sora",
         ad.SoRA(rank=4, alpha=8.0, threshold="reference", lambda_schedule="linear", max_lambda=0.1,
                 lambda_num=3, lambda_every=2)),
]
