"""The environment contract between the launchers and `launch.worker` (see there)."""

from __future__ import annotations

import os

ENV_MODE = "JPEFT_DIST"
ENV_COORDINATOR = "JPEFT_COORDINATOR"
ENV_NUM_PROCESSES = "JPEFT_NUM_PROCESSES"
ENV_PROCESS_ID = "JPEFT_PROCESS_ID"


def initialize_from_env(environ=None) -> str:
    """Call `jax.distributed.initialize` as the environment says; returns the mode."""
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV_MODE, "local")
    if mode == "local":
        return mode
    import jax

    if mode == "multiprocess":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=environ[ENV_COORDINATOR],
                                   num_processes=int(environ[ENV_NUM_PROCESSES]),
                                   process_id=int(environ[ENV_PROCESS_ID]))
    elif mode == "tpu":
        jax.distributed.initialize()
    else:
        raise ValueError(f"{ENV_MODE}={mode!r}: expected 'local', 'multiprocess' or 'tpu'")
    return mode
