"""The `gcloud` commands that run an experiment module on a TPU pod slice.

    pod = TpuPod(name="jpeft-v4", zone="us-central2-b", accelerator_type="v4-32", project="my-proj")
    for argv in tpu_commands(pod, "experiments.finetune", ["--method=hd_pissa"]):
        print(shlex.join(argv))

Steps, in order: `create` the TPU VM slice, `copy` the source tree to every worker, `setup`
(install JAX for TPU and this package on every worker), `run` the module on every worker through
`launch.worker` (which calls `jax.distributed.initialize()`; it finds the slice by itself), and
optionally `delete`. Every command that touches the workers passes `--worker=all`.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence

STEPS = ("create", "copy", "setup", "run", "delete")
DEFAULT_STEPS = ("create", "copy", "setup", "run")
JAX_TPU_REQUIREMENT = "jax[tpu]>=0.10,<0.11"


@dataclasses.dataclass(frozen=True)
class TpuPod:
    name: str
    zone: str
    accelerator_type: str = "v4-8"
    runtime_version: str = "tpu-ubuntu2204-base"
    project: str | None = None
    spot: bool = False
    source: str = "."                 # local source tree to copy
    remote_dir: str = "~/jpeft"       # where it lands on every worker
    python: str = "python3"


def _common(pod: TpuPod) -> list[str]:
    return [f"--zone={pod.zone}"] + ([f"--project={pod.project}"] if pod.project else [])


def _ssh(pod: TpuPod, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", pod.name, *_common(pod), "--worker=all",
            f"--command={command}"]


def create_command(pod: TpuPod) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", pod.name, *_common(pod),
            f"--accelerator-type={pod.accelerator_type}", f"--version={pod.runtime_version}",
            *(["--spot"] if pod.spot else [])]


def copy_command(pod: TpuPod) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", pod.source, f"{pod.name}:{pod.remote_dir}",
            *_common(pod), "--worker=all"]


def setup_command(pod: TpuPod) -> list[str]:
    return _ssh(pod, f"{pod.python} -m pip install -U {shlex.quote(JAX_TPU_REQUIREMENT)} && "
                     f"{pod.python} -m pip install -e {pod.remote_dir}")


def run_command(pod: TpuPod, module: str, args: Sequence[str] = ()) -> list[str]:
    line = shlex.join([pod.python, "-m", "launch.worker", module, *args])
    return _ssh(pod, f"cd {pod.remote_dir} && JPEFT_DIST=tpu {line}")


def delete_command(pod: TpuPod) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", pod.name, *_common(pod), "--quiet"]


def tpu_commands(pod: TpuPod, module: str, args: Sequence[str] = (),
                 steps: Sequence[str] = DEFAULT_STEPS) -> list[list[str]]:
    """The argv lists of the chosen `steps`, in `STEPS` order."""
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps are {STEPS}")
    build = {"create": lambda: create_command(pod), "copy": lambda: copy_command(pod),
             "setup": lambda: setup_command(pod), "run": lambda: run_command(pod, module, args),
             "delete": lambda: delete_command(pod)}
    return [build[s]() for s in STEPS if s in steps]
