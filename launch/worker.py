"""`python -m launch.worker <module> [args...]`: join the distributed job described by the
environment, then run `<module>` as `__main__` with `args` as its command line.

Environment (set by `launch.multiprocess` / `launch.tpu`):
- `JPEFT_DIST=multiprocess`: `JPEFT_COORDINATOR` (host:port), `JPEFT_NUM_PROCESSES`,
  `JPEFT_PROCESS_ID`; CPU collectives go through gloo;
- `JPEFT_DIST=tpu`: `jax.distributed.initialize()` discovers the pod slice by itself;
- unset / `local`: nothing to join.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys

from launch.env import initialize_from_env


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m launch.worker <module> [args...]")
    module, args = argv[0], argv[1:]
    mode = initialize_from_env()
    sys.argv = [module, *args]
    code: str | int | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
    if mode == "multiprocess":
        hard_exit(code)
    raise SystemExit(code)


def hard_exit(code) -> None:
    """End a localhost multiprocess (XLA:CPU + gloo) worker once its module is done.

    For XLA:CPU with gloo collectives only: after every result is printed and
    `jax.distributed` is shut down, the interpreter's own teardown (C++ destructors of the
    CPU client and its gloo connections) can hang when the peer process has already exited
    (seen about one run in ten on a loaded two-core machine). So the Python exit handlers run
    as usual and the process then exits without that teardown. TPU and GPU jobs exit normally."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main(sys.argv[1:])
