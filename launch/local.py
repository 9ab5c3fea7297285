"""Run an experiment module in a fresh local Python process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def run_local(module: str, args: Sequence[str] = (), *, env: dict | None = None, timeout: float | None = None,
              capture: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` with this interpreter; returns the completed process (its
    combined stdout/stderr in `.stdout` when `capture`)."""
    return subprocess.run([sys.executable, "-m", module, *args], env={**os.environ, **(env or {})}, cwd=cwd,
                          timeout=timeout, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
