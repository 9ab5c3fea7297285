"""Which implementation the factored path's fused operations use (`jpeft.factored(..., impl=)`).

"auto" (the default): the Pallas kernel on GPU/TPU (`pallas_kernels.fused_lora_matmul` for the
LoRA family), XLA elsewhere. "kernel": the Pallas kernel everywhere (Pallas interpret mode on CPU:
for tests). "reference": XLA everywhere (forward mode, `jax.jvp`, needs it: the kernels have a
custom VJP only). The setting is read while the model is traced, so it is fixed per compiled step.
"""

from __future__ import annotations

import contextlib
import threading

IMPLS = ("auto", "kernel", "reference")


class _Impl(threading.local):
    value = "auto"


_IMPL = _Impl()


def kernel_impl() -> str:
    """The implementation in force ("auto", "kernel" or "reference")."""
    return _IMPL.value


@contextlib.contextmanager
def using_impl(impl: str):
    """Run the enclosed trace with `impl` ("auto" | "kernel" | "reference")."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    old, _IMPL.value = _IMPL.value, impl
    try:
        yield
    finally:
        _IMPL.value = old
