"""N local processes joined by `jax.distributed.initialize` on localhost (a multi-host job in
miniature): each process simulates `devices_per_process` CPU devices, process 0 hosts the
coordinator, collectives across processes go through gloo."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

from launch import env as worker


class ProcessResult(NamedTuple):
    process_id: int
    returncode: int
    output: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, coordinator: str,
                base: dict | None = None) -> dict:
    """The environment of process `process_id`."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[worker.ENV_MODE] = "multiprocess"
    env[worker.ENV_COORDINATOR] = coordinator
    env[worker.ENV_NUM_PROCESSES] = str(num_processes)
    env[worker.ENV_PROCESS_ID] = str(process_id)
    return env


def run_multiprocess(module: str, args: Sequence[str] = (), *, num_processes: int = 2, devices_per_process: int = 4,
                     port: int | None = None, timeout: float = 300.0, cwd: str | None = None) -> list[ProcessResult]:
    """Start `num_processes` copies of `python -m launch.worker <module> <args>` and wait for all.

    If one fails (or `timeout` passes) the others are terminated. Returns each process's exit code
    and combined output, in process order."""
    coordinator = f"localhost:{port or free_port()}"
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(num_processes)]  # no pipe to fill up
    procs = [subprocess.Popen([sys.executable, "-m", "launch.worker", module, *args], cwd=cwd, text=True,
                              env=process_env(i, num_processes, devices_per_process, coordinator),
                              stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        results = []
        for i, (p, log) in enumerate(zip(procs, logs)):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.seek(0)
            results.append(ProcessResult(i, p.returncode, log.read()))
            log.close()
    return results
