"""`launch/`: local runs, a 2-process × 4-device localhost job, and the TPU-pod gcloud commands
(dry run only: no network in tests)."""

import os
import subprocess
import sys

import pytest

from launch import TpuPod, run_local, run_multiprocess, tpu_commands
from launch.multiprocess import process_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_local_run_passes_flags_to_the_module():
    done = run_local("launch.selftest", ["--scale=3"], cwd=ROOT, timeout=120,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout
    assert "selftest ok process=0/1 devices=2/2 psum=3 allgather=[1]" in done.stdout


def test_two_processes_of_four_devices_psum_and_allgather_across_processes():
    results = run_multiprocess("launch.selftest", ["--scale=2"], num_processes=2, devices_per_process=4,
                               cwd=ROOT, timeout=300)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
    # 8 devices in all, device i holds 2·i: the psum is 2·28 on both processes
    assert "selftest ok process=0/2 devices=4/8 psum=56 allgather=[1, 11]" in results[0].output
    assert "selftest ok process=1/2 devices=4/8 psum=56 allgather=[1, 11]" in results[1].output


def test_a_failing_module_fails_every_process_with_its_message():
    results = run_multiprocess("launch.selftest", ["--scale=nope"], num_processes=2, devices_per_process=1,
                               cwd=ROOT, timeout=300)
    assert [r.returncode for r in results] == [1, 1]
    assert all("--scale" in r.output for r in results)


def test_process_env_replaces_the_device_count():
    env = process_env(1, 2, 4, "localhost:1234", base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert (env["JPEFT_DIST"], env["JPEFT_COORDINATOR"], env["JPEFT_NUM_PROCESSES"], env["JPEFT_PROCESS_ID"]) == \
        ("multiprocess", "localhost:1234", "2", "1")


POD = TpuPod(name="jpeft-v4", zone="us-central2-b", accelerator_type="v4-32", project="my-proj")

EXPECTED = [
    "gcloud compute tpus tpu-vm create jpeft-v4 --zone=us-central2-b --project=my-proj "
    "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base",
    "gcloud compute tpus tpu-vm scp --recurse . 'jpeft-v4:~/jpeft' --zone=us-central2-b --project=my-proj --worker=all",
    "gcloud compute tpus tpu-vm ssh jpeft-v4 --zone=us-central2-b --project=my-proj --worker=all "
    "'--command=python3 -m pip install -U '\"'\"'jax[tpu]>=0.10,<0.11'\"'\"' && python3 -m pip install -e ~/jpeft'",
    "gcloud compute tpus tpu-vm ssh jpeft-v4 --zone=us-central2-b --project=my-proj --worker=all "
    "'--command=cd ~/jpeft && JPEFT_DIST=tpu python3 -m launch.worker experiments.finetune --method=hd_pissa "
    "--rank=16'",
]


def test_tpu_commands_exact():
    import shlex

    cmds = tpu_commands(POD, "experiments.finetune", ["--method=hd_pissa", "--rank=16"])
    assert [shlex.join(c) for c in cmds] == EXPECTED
    spot = TpuPod(name="p", zone="z", spot=True)
    assert [shlex.join(c) for c in tpu_commands(spot, "m", steps=["create", "delete"])] == [
        "gcloud compute tpus tpu-vm create p --zone=z --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot",
        "gcloud compute tpus tpu-vm delete p --zone=z --quiet"]
    with pytest.raises(ValueError, match="unknown step"):
        tpu_commands(spot, "m", steps=["boot"])


def test_cli_dry_run_prints_the_commands():
    done = subprocess.run([sys.executable, "-m", "launch", "--mode=tpu", "--tpu_name=jpeft-v4", "--zone=us-central2-b",
                           "--accelerator_type=v4-32", "--project=my-proj", "--dry_run",
                           "--module=experiments.finetune", "--", "--method=hd_pissa", "--rank=16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == EXPECTED
