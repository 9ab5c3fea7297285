"""Launching experiments (docs/design.md §6, docs/scale.md): run any experiment module

- locally (`run_local`: `python -m <module> <args>`),
- as N local processes joined by `jax.distributed.initialize` on localhost (`run_multiprocess`;
  each process gets its own simulated CPU devices, cross-process collectives go through gloo),
- on a TPU pod slice (`launch.tpu`: the exact `gcloud compute tpus tpu-vm` commands to create the
  slice, copy the code, install it and run the module on every worker with `--worker=all`).

The processes of (b) and (c) start through `python -m launch.worker <module> <args>`, which calls
`jax.distributed.initialize` from the environment before running the module as `__main__`, so an
experiment needs no launch code of its own. Command line: `python -m launch --help`.
"""

from launch.env import initialize_from_env
from launch.local import run_local
from launch.multiprocess import ProcessResult, run_multiprocess
from launch.tpu import TpuPod, tpu_commands

__all__ = ["ProcessResult", "TpuPod", "initialize_from_env", "run_local", "run_multiprocess", "tpu_commands"]
