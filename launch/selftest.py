"""A tiny distributed self-check: a `psum` over every device of every process (through
`jax.shard_map`) and a cross-process all-gather. Prints one `selftest ok ...` line per process and
exits non-zero on a wrong result.

    python -m launch --mode=multiprocess --num_processes=2 --devices_per_process=4 --module=launch.selftest
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

flags.DEFINE_float("scale", 1.0, "multiplies every device's value (checks that flags reach the module)")
FLAGS = flags.FLAGS


def check() -> str:
    n_proc, pid = jax.process_count(), jax.process_index()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    total, local = len(devices), jax.local_device_count()
    mesh = Mesh(np.array(devices), ("x",))
    # device i holds scale·i; the psum over all devices is scale·total·(total−1)/2 everywhere
    values = FLAGS.scale * np.arange(pid * local, (pid + 1) * local, dtype=np.float32)
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), values, (total,))
    summed = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "x"), mesh=mesh, in_specs=P("x"), out_specs=P()))(arr)
    got = float(np.asarray(summed.addressable_data(0))[0])
    want = FLAGS.scale * total * (total - 1) / 2
    if got != want:
        raise SystemExit(f"selftest FAILED: psum {got} != {want}")
    gathered = np.asarray(multihost_utils.process_allgather(np.array([pid * 10 + 1], np.int32))).reshape(-1)
    if gathered.tolist() != [p * 10 + 1 for p in range(n_proc)]:
        raise SystemExit(f"selftest FAILED: allgather {gathered.tolist()}")
    return (f"selftest ok process={pid}/{n_proc} devices={local}/{total} psum={got:g} "
            f"allgather={gathered.tolist()}")


def main(argv):
    del argv
    print(check(), flush=True)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
