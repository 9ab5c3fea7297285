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
from collections.abc import Mapping
from typing import Any, cast

import jax
import numpy as np
import optax
from absl import app
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jpeft
import jpeft.distributed
import jpeft.sharding
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
    if jax.default_backend() == "cpu" and all(resolved[axis] > 1 for axis in AXES):
        # XLA:CPU only: with data, fsdp and tensor all > 1 its SPMD partitioner returns wrong
        # gradients (the loss is right; a plain Flax Llama without jpeft shows it too, see
        # docs/scale.md). Any two of the axes are exact. Accelerators are not refused.
        raise app.UsageError(f"{flag}={text}: on XLA:CPU a mesh with data, fsdp and tensor all > 1 computes wrong "
                             "gradients (an XLA:CPU partitioner bug, docs/scale.md); use at most two of them")
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
        # never None: it is `devices_indices_map` restricted to this process's devices
        index = cast(Mapping[Any, tuple[slice, ...]], self.sharding.addressable_devices_indices_map((batch,)))
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
    from the host copy of the `base` weights (they are frozen, so equal; a quantised leaf's
    full-precision original), not gathered."""
    return jax.tree.map(lambda p, b: gather(p) if is_adapter(p) else b, params, base,
                        is_leaf=jpeft.quant.is_leaf_node)


def state_shardings(params, base, spec: jpeft.Spec, tx: optax.GradientTransformation, mesh) -> tuple:
    """`(trainable, frozen, opt_state)` shardings of a run on `mesh`: the frozen weights by
    `jpeft.sharding.fsdp_specs` (FSDP over `fsdp`, tensor parallel over `tensor`), the adapters and
    their optimizer state derived from them; with HD-PiSSA its frames split over `data`, the rest
    replicated. `params` is the `jpeft.init` tree of the plain `base` weights."""
    if any(m.per_device_leading for _, m in spec.rules):
        shardings = jpeft.distributed.hd_pissa_shardings(params, mesh, axis="data")
    else:
        shardings = jpeft.sharding.adapter_shardings(
            params, jpeft.sharding.fsdp_specs(base, mesh, "fsdp", tensor="tensor"), mesh)
    train_sh, frozen_sh = jpeft.split(shardings)
    return train_sh, frozen_sh, jpeft.sharding.opt_state_shardings(jax.eval_shape(tx.init, jpeft.split(params)[0]),
                                                                   train_sh, mesh)


def make_step(loss_of, spec: jpeft.Spec, tx: optax.GradientTransformation, mesh, layout: Layout,
              shardings: tuple):
    """The training step, one jitted executable with explicit shardings (`state_shardings`) and the
    state donated: `step(trainable, frozen, opt_state, batch, count, key) -> (trainable, frozen,
    opt_state, metrics)`, `loss_of(params, batch)` the loss of an adapted tree on a global batch
    (split over data × fsdp by `layout`). With HD-PiSSA it is `jpeft.distributed.hd_pissa_step`
    over `data` (each device its micro-batch and frames); otherwise one SPMD program whose loss and
    gradient are those of the whole global batch, followed by the methods' `after_step` hooks."""
    train_sh, frozen_sh, opt_sh = shardings
    rep = replicated(mesh)
    if any(m.per_device_leading for _, m in spec.rules):
        hd_step = jpeft.distributed.hd_pissa_step(loss_of, tx, mesh, axis="data", jit=False)

        def step(trainable, frozen, opt_state, batch, count, key):
            params, opt_state, loss = hd_step(jpeft.combine(trainable, frozen), opt_state, batch)
            return (*jpeft.split(params), opt_state, {"loss": loss})
    else:
        def step(trainable, frozen, opt_state, batch, count, key):
            loss, grads = jax.value_and_grad(lambda t: loss_of(jpeft.combine(t, frozen), batch))(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            params, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen),
                                                 opt_state, spec, step=count, key=key, grads=grads)
            return (*jpeft.split(params), opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)})

    return jax.jit(step, in_shardings=(train_sh, frozen_sh, opt_sh, layout.sharding, rep, rep),
                   out_shardings=(train_sh, frozen_sh, opt_sh, rep), donate_argnums=(0, 1, 2))


def process_0_first(fn) -> Any:
    """`fn()` on process 0, then on the others: one process builds what several share (a TFDS
    folder on a shared disk) while the others wait, and reuse it (or build their own on a local
    disk). Every process must call it."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jpeft: process 0 first")
    if jax.process_index() != 0:
        out = fn()
    multihost_utils.sync_global_devices("jpeft: every process done")
    return out


def is_writer() -> bool:
    """Whether this process writes logs, plots and exports (process 0)."""
    return jax.process_index() == 0
