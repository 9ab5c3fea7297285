"""The runner across devices and processes: the `--mesh` flag, where every array of a step lives,
each process's share of the data, and which process writes.

- The mesh always has the axes `data`, `fsdp`, `tensor` (in that order, outermost first: `data`
  spans processes, `tensor` stays on the fastest links); `--mesh` sets their sizes by name and
  `-1` takes the devices left over. It covers every process's devices.
- A global batch is split along its first dimension over `data` × `fsdp`; each process reads
  only its own rows of it (`Layout.rows`) and `Layout.put` assembles the global array.
- Frozen weights are sharded by `jpeft.sharding.fsdp_specs` (FSDP over `fsdp`, tensor parallel
  over `tensor`); adapters and optimizer state take the shardings `jpeft.sharding` derives from
  their base weights; HD-PiSSA's frames are split over `data`.
- Logs, plots and exports come from process 0 (`is_writer`); Orbax checkpoints are written by
  every process (each its shards), as Orbax intends.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from absl import app
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.adapter import is_adapter

P = PartitionSpec
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
    """`"data=2,fsdp=2"` -> `{"data": 2, "fsdp": 2}` (sizes ≥ 1, at most one `-1`)."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq or name not in AXES:
            raise app.UsageError(f"{flag}={text!r}: {part.strip()!r} is not <axis>=<size> with an axis of {AXES}")
        if name in sizes:
            raise app.UsageError(f"{flag}={text!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise app.UsageError(f"{flag}={text!r}: the size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise app.UsageError(f"{flag}={text!r}: the size of {name!r} must be ≥ 1 or -1 (the rest), got {size}")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise app.UsageError(f"{flag}={text!r}: at most one axis can take the remaining devices (-1)")
    return sizes


def make_mesh(sizes: dict[str, int], devices=None, flag: str = "--mesh") -> Mesh:
    """The `(data, fsdp, tensor)` mesh over `devices` (default: every process's devices); the
    sizes must multiply to the device count (`-1` takes the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    processes = jax.process_count()
    where = (f"the job has {n} devices ({processes} process{'es' if processes > 1 else ''} × "
             f"{jax.local_device_count()})")
    text = ",".join(f"{k}={v}" for k, v in sizes.items())
    resolved = {axis: sizes.get(axis, 1) for axis in AXES}
    if -1 in sizes.values():
        if n % fixed:
            raise app.UsageError(f"{flag}={text}: the fixed axes need a multiple of {fixed} devices; {where}")
        resolved = {axis: n // fixed if size == -1 else size for axis, size in resolved.items()}
    elif fixed != n:
        raise app.UsageError(f"{flag}={text}: the axes multiply to {fixed} devices; {where}")
    shape = tuple(resolved[axis] for axis in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def describe(mesh: Mesh) -> str:
    return ",".join(f"{axis}={mesh.shape[axis]}" for axis in AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a step's batch lives on `mesh`: split along dimension 0 over `data` × `fsdp`."""

    mesh: Mesh

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def check(self, batch: int, flag: str) -> None:
        if batch < 1 or batch % self.shards:
            raise app.UsageError(f"{flag}={batch}: the batch is split over the mesh's data × fsdp = "
                                 f"{self.shards} devices ({describe(self.mesh)}); use a multiple of {self.shards}")

    def rows(self, batch: int) -> tuple[int, int]:
        """This process's rows `[start, stop)` of a global batch of `batch` rows."""
        index = self.sharding.addressable_devices_indices_map((batch,))
        spans = sorted({(s[0].start or 0, batch if s[0].stop is None else s[0].stop) for s in index.values()})
        start, stop = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != stop - start:
            raise ValueError(f"this process's rows of the batch are not contiguous ({spans}); order the mesh's "
                             "devices by process")
        return start, stop

    def put(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch from this process's rows (`rows(batch)` of each array)."""
        start, stop = self.rows(self.shards)  # this process's share of the rows, at one row per shard
        out = {}
        for name, value in local.items():
            value = np.asarray(value)
            global_rows = len(value) * self.shards // (stop - start)
            out[name] = jax.make_array_from_process_local_data(self.sharding, value,
                                                               (global_rows, *value.shape[1:]))
        return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) as global arrays with `shardings` (a matching tree,
    None holes kept); each device receives only its slice."""
    def one(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def reshard(tree: Any, shardings: Any) -> Any:
    """Global arrays moved to other shardings on the same devices (one jitted identity)."""
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def gather(tree: Any) -> Any:
    """Every array of `tree` whole on the host of every process (all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def host_params(params: Any, base: Any) -> Any:
    """The adapted tree on the host for export: adapter nodes gathered, every other leaf taken
    from the host copy of the `base` weights (they are frozen, so equal), not gathered."""
    return jax.tree.map(lambda p, b: gather(p) if is_adapter(p) else b, params, base, is_leaf=is_adapter)


def is_writer() -> bool:
    """Whether this process writes logs, plots and exports (process 0)."""
    return jax.process_index() == 0
