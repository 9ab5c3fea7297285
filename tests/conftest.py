import os

# Eight simulated CPU devices for the sharding tests; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """float64 for exact linear-algebra oracles."""
    with jax.enable_x64(True):
        yield
