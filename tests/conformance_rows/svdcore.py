"""Conformance rows of the SVD-core family (family B, `jpeft/methods/svdcore.py`).

SVFT rows use `rank=16`: the shared rank-too-large test needs an explicit rank, and the factored
tests adapt kernels as narrow as 24. Rows whose method claims no `identity_at_init` are intentionally not the
identity at init; each has an explicit non-identity test in its oracle file. NLoRA's default
`N = W_II⁺` is ill-conditioned on a random toy weight (fp32 factored-vs-dense gradients then differ
by ~1e-3 relative), so the rows use `N = W_II` with the residual base; the pinv default is
checked in float64 in tests/methods/test_nlora.py.
"""

from jpeft.methods import lamda, salt, svft
from jpeft.methods import svdcore as sc
from tests.conformance_table import Case

ROWS = [
    Case("lora_xs", "lora_xs", sc.LoRAXS(rank=4)),  # R ~ N(0, 1e-10): ≈ identity
    Case("lora_xs_randomized", "lora_xs", sc.LoRAXS(rank=4, alpha=8.0, init_std=0.0, svd_niter=4)),
    Case("lora_sb", "lora_sb", sc.LoRASB(rank=4), calib=True),
    Case("svft_plain", "svft", svft.SVFT(rank=16)),
    Case("svft_banded_zero", "svft", svft.SVFT(rank=16, sparsity="banded", off_diag=2, zero_init=True)),
    Case("svft_random", "svft", svft.SVFT(rank=16, sparsity="random", off_diag=1)),
    Case("svft_top_k", "svft", svft.SVFT(rank=16, sparsity="top_k", off_diag=1, zero_init=True)),
    Case("svft_truncated_reference", "svft", svft.SVFT(rank=16, residual=False, topk="reference")),
    Case("svfit", "svfit", sc.SVFit(rank=4)),
    Case("salt", "salt", salt.SALT(rank=4, lora_rank=2)),
    Case("salt_free_lora", "salt", salt.SALT(rank=4, lora_rank=2, tail_projected=False)),
    Case("salt_reference", "salt", salt.SALT(rank=4, lora_rank=2, reference=True)),
    Case("kasa", "kasa", sc.KaSA(rank=4)),
    Case("slora", "slora", sc.SLoRA(rank=4)),
    Case("nlora", "nlora", sc.NLoRA(rank=4, nystrom="reference"), tolerance="close"),
    Case("nlora_reference", "nlora", sc.NLoRA(rank=4, nystrom="reference", residual=False)),
    Case("inttune", "inttune", sc.NLoRA(rank=4, nystrom="reference", train_factors=False), tolerance="close"),
    Case("lamda", "lamda", lamda.LaMDA(rank=4, freeze_steps=4), tolerance="close"),
    Case("lamda_kaiming", "lamda", lamda.LaMDA(rank=4, init="kaiming")),
    Case("lamda_pp", "lamda_pp", lamda.LaMDAPP(rank=4, threshold=0.04), tolerance="close"),
]
