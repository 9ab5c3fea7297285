"""Optimizer-side methods as optax transformations (docs/design.md §4, docs/optim.md; family I).

Each method is a `scale_by_x(...)` transformation plus an `x(learning_rate, ...)` alias:

    galore          GaLore (projection side, exact / randomised SVD, moment policy on refresh)
    dct_adamw       DCT-AdamW (fixed DCT-II basis, column selection, matmul or FFT path)
    natural_galore  Natural GaLore (Woodbury-preconditioned low-rank gradients)
    lora_pro        LoRA-Pro (adjusted gradients for jpeft LoRA adapter pairs)
    owlore          OwLore (outlier-weighted layer sampling + GaLore)

`galore`, `dct_adamw`, `natural_galore` and `owlore` are one combinator (`projected.Projected`) with
different projectors (`projector.SVDProjector`, `projector.DCTProjector`) and stages.
`state_bytes(tx, params_or_shapes)` sizes an optimizer state without allocating it.
"""

from jpeft.optim.adam_hf import scale_by_adam_hf
from jpeft.optim.dct_adamw import dct_adamw, scale_by_dct_adamw
from jpeft.optim.galore import galore, scale_by_galore
from jpeft.optim.lora_pro import LoRAProState, lora_pro, lora_pro_adjust, scale_by_lora_pro, solve_sylvester
from jpeft.optim.memory import state_bytes
from jpeft.optim.natural_galore import (
    WoodburyPreconditioner,
    natural_galore,
    scale_by_natural_galore,
    woodbury_natural_gradient,
)
from jpeft.optim.owlore import OwLoreState, outlier_ratio, owlore, sample_layers, scale_by_owlore
from jpeft.optim.projected import LeafState, Projected, ProjectedState
from jpeft.optim.projector import DCTBasis, DCTProjector, MatrixView, SVDBasis, SVDProjector, dct_matrix, resolve_side
from jpeft.optim.weight_decay import decay_after_update

__all__ = [
    "DCTBasis", "DCTProjector", "LeafState", "LoRAProState", "MatrixView", "OwLoreState", "Projected",
    "ProjectedState", "SVDBasis", "SVDProjector", "WoodburyPreconditioner", "dct_adamw", "dct_matrix",
    "decay_after_update", "galore", "lora_pro", "lora_pro_adjust", "natural_galore", "outlier_ratio", "owlore",
    "resolve_side", "sample_layers", "scale_by_adam_hf", "scale_by_dct_adamw", "scale_by_galore",
    "scale_by_lora_pro", "scale_by_natural_galore", "scale_by_owlore", "solve_sylvester", "state_bytes",
    "woodbury_natural_gradient",
]
