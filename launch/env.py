"""The contract between the launchers and `launch.worker` (see there): the environment, and the
module flags a launcher adds (`module_args`: its `--mesh`)."""

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


def module_args(args: list[str], mesh: str | None) -> list[str]:
    """The module's command line: `args`, plus `--mesh=<mesh>` when the launcher is given one."""
    if mesh is None:
        return list(args)
    if any(a == "--mesh" or a.startswith("--mesh=") for a in args):
        raise ValueError("--mesh is given to both the launcher and the module; give it once")
    return [*args, f"--mesh={mesh}"]
