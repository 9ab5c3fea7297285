"""`python -m launch.worker <module> [args...]`: join the distributed job described by the
environment, then run `<module>` as `__main__` with `args` as its command line.

Environment (set by `launch.multiprocess` / `launch.tpu`):
- `JPEFT_DIST=multiprocess`: `JPEFT_COORDINATOR` (host:port), `JPEFT_NUM_PROCESSES`,
  `JPEFT_PROCESS_ID`; CPU collectives go through gloo;
- `JPEFT_DIST=tpu`: `jax.distributed.initialize()` discovers the pod slice by itself;
- unset / `local`: nothing to join.
"""

from __future__ import annotations

import runpy
import sys

from launch.env import initialize_from_env


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m launch.worker <module> [args...]")
    module, args = argv[0], argv[1:]
    initialize_from_env()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
