"""jpeft: parameter-efficient fine-tuning for JAX/Flax as pure pytree transforms.

    spec = jpeft.Spec({r".*/(q_proj|v_proj)/kernel": jpeft.LoRA(rank=8, alpha=16)})
    params = jpeft.init(key, base_params, spec)
    trainable, frozen = jpeft.split(params)
    effective = jpeft.apply(jpeft.combine(trainable, frozen), spec)   # inside the loss

See docs/design.md for the contract and docs/methods.md for the per-method reference (formulas,
papers).
"""

from jpeft import optim as optim  # `import jpeft` makes `jpeft.optim` available, as optax.contrib
from jpeft import quant  # configs nf4 / fp4 / int8 / int4, NF4_CODE, QTensor
from jpeft.adapter import Adapter, is_adapter
from jpeft.compact import compact  # the function; the module stays importable as jpeft.compact
from jpeft.core import ParamCount, apply, check_fits, combine, count, init, labels, merge, penalty, split
from jpeft.errors import AdapterError, OptionError, SpecError
from jpeft.factored import factored, factored_nnx, infer_views
from jpeft.hooks import HookResult, after_step
from jpeft.merging import merge_adapters
from jpeft.methods import DoRA, FFALoRA, Full, LoRA, LoRAGA, Method, PeriodicLoRA, PiSSA
from jpeft.quant import dequantize, quantize
from jpeft.registry import method, methods
from jpeft.spec import Spec
from jpeft.views import View

__all__ = [
    "Adapter", "AdapterError", "DoRA", "FFALoRA", "Full", "HookResult", "LoRA", "LoRAGA", "Method",
    "OptionError", "ParamCount", "PeriodicLoRA", "PiSSA", "Spec", "SpecError", "View", "after_step", "apply",
    "check_fits", "combine", "compact", "count", "dequantize", "factored", "factored_nnx", "infer_views", "init",
    "is_adapter", "labels", "merge", "merge_adapters", "method", "methods", "penalty", "quant", "quantize", "split",
]
