import jax
import pytest


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
    """fp32 tolerances assume full-precision matmuls; GPUs default to TF32 (no-op on CPU)."""
    with jax.default_matmul_precision("float32"):
        yield
