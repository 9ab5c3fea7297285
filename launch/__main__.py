"""`python -m launch --mode=local|multiprocess|tpu --module=<module> [flags] -- [module args]`.

    python -m launch --module=experiments.finetune -- --method=lora --steps=100
    python -m launch --mode=multiprocess --num_processes=2 --devices_per_process=4 --module=launch.selftest
    python -m launch --mode=multiprocess --num_processes=2 --devices_per_process=2 --mesh=data=2,fsdp=2 \\
        --module=experiments.finetune -- --model=tiny --steps=3
    python -m launch --mode=tpu --tpu_name=jpeft-v4 --zone=us-central2-b --accelerator_type=v4-32 \\
        --project=my-proj --dry_run --module=experiments.finetune -- --method=hd_pissa

`--dry_run` prints the TPU commands (one per line, shell-quoted) instead of running them.
`--mesh` is passed on to the module as its own `--mesh` flag (the device mesh over every
process's devices, see `experiments.scale`); the process settings travel in the environment
(`launch.env`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app, flags

from launch.env import module_args
from launch.local import run_local
from launch.multiprocess import run_multiprocess
from launch.tpu import DEFAULT_STEPS, STEPS, TpuPod, tpu_commands

flags.DEFINE_enum("mode", "local", ["local", "multiprocess", "tpu"], "where to run")
flags.DEFINE_string("module", None, "the experiment module to run (python -m style)", required=True)
flags.DEFINE_integer("num_processes", 2, "multiprocess: number of local processes")
flags.DEFINE_integer("devices_per_process", 4, "multiprocess: simulated CPU devices per process")
flags.DEFINE_float("timeout", 3600.0, "multiprocess: seconds before the processes are stopped")
flags.DEFINE_string("tpu_name", None, "tpu: TPU VM name")
flags.DEFINE_string("zone", None, "tpu: zone, e.g. us-central2-b")
flags.DEFINE_string("accelerator_type", "v4-8", "tpu: accelerator type, e.g. v4-32, v5litepod-16")
flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "tpu: TPU VM software version")
flags.DEFINE_string("project", None, "tpu: GCP project (default: gcloud's configured one)")
flags.DEFINE_bool("spot", False, "tpu: create a spot slice")
flags.DEFINE_string("source", ".", "tpu: local source tree copied to every worker")
flags.DEFINE_string("remote_dir", "~/jpeft", "tpu: destination on every worker")
flags.DEFINE_list("steps", list(DEFAULT_STEPS), f"tpu: which of {list(STEPS)} to do")
flags.DEFINE_bool("dry_run", False, "tpu: print the gcloud commands instead of running them")
flags.DEFINE_string("mesh", None, "the device mesh, passed on to the module as --mesh (e.g. data=-1, data=2,fsdp=2)")
FLAGS = flags.FLAGS


def pod_from_flags() -> TpuPod:
    if not FLAGS.tpu_name or not FLAGS.zone:
        raise app.UsageError("--mode=tpu needs --tpu_name and --zone")
    return TpuPod(name=FLAGS.tpu_name, zone=FLAGS.zone, accelerator_type=FLAGS.accelerator_type,
                  runtime_version=FLAGS.runtime_version, project=FLAGS.project, spot=FLAGS.spot,
                  source=FLAGS.source, remote_dir=FLAGS.remote_dir)


def main(argv):
    try:
        args = module_args(argv[1:], FLAGS.mesh)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if FLAGS.mode == "local":
        return run_local(FLAGS.module, args, capture=False).returncode
    if FLAGS.mode == "multiprocess":
        results = run_multiprocess(FLAGS.module, args, num_processes=FLAGS.num_processes,
                                   devices_per_process=FLAGS.devices_per_process, timeout=FLAGS.timeout)
        for r in results:
            print(f"===== process {r.process_id} (exit {r.returncode}) =====\n{r.output}")
        return max(abs(r.returncode if r.returncode is not None else 1) for r in results)
    commands = tpu_commands(pod_from_flags(), FLAGS.module, args, FLAGS.steps)
    for argv_ in commands:
        print(shlex.join(argv_), flush=True)
        if not FLAGS.dry_run:
            subprocess.run(argv_, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
