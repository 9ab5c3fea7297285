"""The HF PEFT adapter-file format shared by `hf_export` and `hf_import`: the key layout
`base_model.model.<module>.<tensor>`, the tensor kinds, the torch layout of a kernel, and PEFT's
`target_parameters` layout of an expert stack."""

from __future__ import annotations

import re

import numpy as np

from jpeft.errors import SpecError
from jpeft.interop.modules import ModuleMap
from jpeft.interop.peft_rows import ROWS
from jpeft.quant import dequantize_array, is_quantized
from jpeft.views import View

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEADS = ("classifier", "score")   # PEFT's SEQ_CLS heads (always modules to save)
LORA_KINDS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A",
              "lora_embedding_B")
ADAPTER_KINDS = frozenset(LORA_KINDS) | {k for row in ROWS.values() for k in row.kinds}
BASE_KINDS = ("base_layer.weight", "base_layer.bias", "weight", "bias")
TENSOR_KEY = re.compile(r"(?P<module>.+?)\.(?P<kind>" + "|".join(
    re.escape(k) for k in sorted(ADAPTER_KINDS | set(BASE_KINDS), key=len, reverse=True)) + ")")


def default_slice_path(param_path: str, index: tuple[int, ...]) -> str:
    """The parameter path of one slice of a stacked kernel (a view with batch axes, e.g. an
    `nn.scan` stack): the indices join the first path component, `layers/q/kernel`, `(2,)` →
    `layers_2/q/kernel` (→ torch `layers.2.q`)."""
    head, _, rest = param_path.partition("/")
    return "/".join([head + "".join(f"_{i}" for i in index), rest] if rest else [head])


def to_numpy(x) -> np.ndarray:
    return np.asarray(dequantize_array(x) if is_quantized(x) else x, np.float32)


def torch_layout(x, transposed: bool) -> np.ndarray:
    x = to_numpy(x)
    if transposed and x.ndim != 2:
        raise SpecError(f"a {x.ndim}-D kernel {x.shape} has no torch Linear weight; only 2-D kernels are saved whole")
    return np.ascontiguousarray(x.T if transposed else x)

EXPERTS_VIEW = View(inputs=(1,), outputs=(2,), batch=(0,))


def expert_factors(module_path: str, modules: ModuleMap, e: int, r: int, d1: int, d2: int):
    """PEFT's `target_parameters` layout of a `(E, d1, d2)` expert stack, as
    `(lora_A shape, lora_B shape, (A, B) → (a, b), (a, b) → (A, B))` with jpeft's per-expert
    `a (E, d1, r)`, `b (E, r, d2)`, `ΔK_e = s·a_e@b_e`. PEFT swaps in/out for a 3-D parameter unless
    its module `is_transposed`: then `ΔK_e = s·B_eᵀ...` reads `A (E·r, d1)`, `B (d2, r·E)`; else
    `A (E·r, d2)`, `B (d1, r·E)` with `ΔK_e = s·B_e@A_e`."""
    if module_path in modules.transposed_experts:
        return ((e * r, d1), (d2, r * e),
                lambda A, B: (A.reshape(e, r, d1).transpose(0, 2, 1), B.reshape(d2, r, e).transpose(2, 1, 0)),
                lambda a, b: (a.transpose(0, 2, 1).reshape(e * r, d1), b.transpose(2, 1, 0).reshape(d2, r * e)))
    return ((e * r, d2), (d1, r * e),
            lambda A, B: (B.reshape(d1, r, e).transpose(2, 0, 1), A.reshape(e, r, d2)),
            lambda a, b: (b.reshape(e * r, d2), a.transpose(1, 2, 0).reshape(d1, r * e)))
