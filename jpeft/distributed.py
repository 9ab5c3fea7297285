"""Distributed training steps (docs/design.md §6, docs/scale.md).

`hd_pissa_step` is HD-PiSSA's step with `jax.shard_map` over a data-parallel mesh axis: device `d`
holds the adapter frames of principal components `[d·r, (d+1)·r)` (slice `d` of every HD-PiSSA
node's stacked `train` arrays), differentiates only its own micro-batch, takes a local optimizer
step with its own optimizer state (never all-reduced), and then every device all-gathers the
updates and folds the same rank-`≤2·K·r` increment into the replicated weight:

    ΔK = s·Σ_d [(a_d + δa_d)(b_d + δb_d) − a_d b_d] = s·(δA·(B + δB) + A·δB)

with `A = [a_1 … a_K]`, `δA`, `B = [b_1; …; b_K]`, `δB` concatenated (two rank-`K·r` GEMMs; kernel
layout, so this is the transpose of the papers' `(out, in)` `ΔW`). One all-gather per step carries every
node's updates. Trainable leaves of other methods in the same tree are plain data-parallel
(gradients averaged over the axis).

`data_parallel_step` is the usual data-parallel step (identical adapters, gradients all-reduced):
the DP-LoRA / DP-PiSSA baseline.

    spec = jpeft.Spec({r".*kernel": jpeft.method("hd_pissa", rank=16, devices=8)})
    params = jpeft.init(key, base_params, spec)
    mesh = jax.make_mesh((8,), ("dp",), axis_types=(jax.sharding.AxisType.Auto,))
    params, opt_state = jpeft.distributed.place(params, tx, mesh)
    step = jpeft.distributed.hd_pissa_step(lambda p, batch: loss(jpeft.apply(p, spec), batch), tx, mesh)
    params, opt_state, loss_value = step(params, opt_state, batch)   # batch split over "dp"
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jpeft import linalg
from jpeft.adapter import Adapter, is_adapter, is_adapter_or_hole
from jpeft.core import combine, split
from jpeft.methods.hd_pissa import HDPiSSA
from jpeft.sharding import opt_state_shardings

P = PartitionSpec
LossFn = Callable[[Any, Any], jax.Array]


def _is_hd(x: Any) -> bool:
    return isinstance(x, Adapter) and isinstance(x.method, HDPiSSA)


def _map_nodes(fn, tree, other=lambda x: x):
    """`fn(node)` on HD-PiSSA nodes, `other(leaf)` on every other non-None leaf / adapter."""
    return jax.tree.map(lambda x: None if x is None else (fn(x) if _is_hd(x) else other(x)), tree,
                        is_leaf=is_adapter_or_hole)


def fold_delta(a, b, da, db, scale: float, *, first_order: bool = False) -> jax.Array:
    """The kernel-layout increment `s·Σ_d [(a_d+δa_d)(b_d+δb_d) − a_d b_d]` of stacked frames
    `a, δa ∈ R^{K×in×r}`, `b, δb ∈ R^{K×r×out}`, as two rank-`K·r` GEMMs over the concatenated
    factors (fp32 at least). `first_order` drops the `δa·δb` term."""
    k, n, r = a.shape
    cat_a = lambda t: jnp.transpose(linalg.upcast(t), (1, 0, 2)).reshape(n, k * r)  # noqa: E731
    cat_b = lambda t: linalg.upcast(t).reshape(k * r, -1)  # noqa: E731
    A, dA, B, dB = cat_a(a), cat_a(da), cat_b(b), cat_b(db)
    right = B if first_order else B + dB
    return scale * (dA @ right + A @ dB)


# --------------------------------------------------------------------------------- placement
def hd_pissa_shardings(params: Any, mesh: Mesh, axis: str = "dp") -> Any:
    """`NamedSharding`s for an adapted tree on a data-parallel mesh: HD-PiSSA frames split over
    `axis` (device `d` holds slice `d`), everything else replicated."""
    from jpeft.sharding import adapter_shardings

    return adapter_shardings(params, P(), mesh, stack_axis=axis)


def place(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, axis: str = "dp"):
    """Put `params` on the mesh and create the optimizer state beside it: `(params, opt_state)`.

    The optimizer state of HD-PiSSA frames is per device (shape `(K, ...)` split over `axis`); the
    rest is replicated."""
    shardings = hd_pissa_shardings(params, mesh, axis)
    params = jax.device_put(params, shardings)
    trainable, _ = split(params)
    train_sh, _ = split(shardings)
    opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, trainable), train_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)
    return params, opt_state


# --------------------------------------------------------------------------------- specs
def _param_specs(params, axis):
    def hd(node):
        return node.replace(base=P(), train={k: P(axis) for k in node.train},
                            frozen={k: P() for k in node.frozen}, state=jax.tree.map(lambda _: P(), node.state))

    def other(x):
        return jax.tree.map(lambda _: P(), x)

    return _map_nodes(hd, params, other)


def _train_specs(trainable, axis):
    """Specs shaped like `jpeft.split`'s trainable half (None holes kept)."""
    return _map_nodes(lambda n: n.replace(train={k: P(axis) for k in n.train}), trainable,
                      lambda x: jax.tree.map(lambda _: P(), x))


def _state_specs(opt_state, trainable, axis):
    train_specs = _train_specs(trainable, axis)
    target = jax.tree_util.tree_structure(trainable)
    is_moment = lambda x: x is not None and jax.tree_util.tree_structure(x) == target  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(opt_state, is_leaf=is_moment)
    return jax.tree_util.tree_unflatten(treedef, [train_specs if is_moment(x) else P() for x in leaves])


def _batch_specs(batch, axis):
    return jax.tree.map(lambda _: P(axis), batch)


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    return mesh.shape[axis]


# --------------------------------------------------------------------------------- HD-PiSSA
def hd_pissa_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                  axis: str = "dp", jit: bool = True) -> Callable:
    """HD-PiSSA's training step: `step(params, opt_state, batch) -> (params, opt_state, loss)`.

    `loss_fn(params, batch)` is the loss of one device's micro-batch on an adapted tree (e.g.
    `loss(jpeft.apply(params, spec), batch)` or the factored path); inside the step each HD-PiSSA
    node holds only that device's frames. `params` is a `jpeft.init` tree whose HD-PiSSA nodes
    have `devices == mesh.shape[axis]`; `opt_state` is `optimizer.init` of its trainable half
    (`place` does both). Every leaf of `batch` is split over `axis` along its first dimension.
    The returned loss is the mean of the devices' micro-batch losses before the step.

    The optimizer must act leaf by leaf (Adam, SGD, schedules, weight decay, ...): a transform
    that couples leaves (global-norm clipping) would mix the devices' local gradients.
    """
    k = _axis_size(mesh, axis)

    def local(params, opt_state, batch):
        d = lax.axis_index(axis)

        def own_slice(node):  # this device's frames as the reference point of its adapter
            return node.replace(frozen={**node.frozen,
                                        "a0": lax.dynamic_slice_in_dim(node.frozen["a0"], d, 1, axis=0),
                                        "b0": lax.dynamic_slice_in_dim(node.frozen["b0"], d, 1, axis=0)})

        local_params = _map_nodes(own_slice, params)
        trainable, frozen = split(local_params)
        # Data-parallel leaves are replicated: mark them device-varying so their gradient stays
        # local (then averaged explicitly) instead of being summed implicitly by shard_map.
        varying = _map_nodes(lambda n: n, trainable,
                             lambda x: jax.tree.map(lambda t: lax.pcast(t, axis, to="varying"), x))
        value, grads = jax.value_and_grad(lambda t: loss_fn(combine(t, frozen), batch))(varying)
        grads = _map_nodes(lambda n: n, grads, lambda x: jax.tree.map(lambda g: lax.pmean(g, axis), x))
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        stepped = optax.apply_updates(trainable, updates)

        # One all-gather carries every HD-PiSSA node's updates.
        hd_updates = [u for u in jax.tree.leaves(updates, is_leaf=is_adapter) if _is_hd(u)]
        flat = [t.reshape(1, -1) for u in hd_updates for t in (u.train["a"], u.train["b"])]
        flat = [t.astype(jnp.result_type(*flat)) for t in flat]
        gathered = iter([])
        if flat:
            every = lax.all_gather(jnp.concatenate(flat, axis=1), axis, axis=0, tiled=True, to="invarying")
            sizes = np.cumsum([t.shape[1] for t in flat])[:-1]
            gathered = iter(jnp.split(every, sizes, axis=1))

        def fold(node, new_train):
            da = next(gathered).reshape((k,) + node.train["a"].shape[1:])
            db = next(gathered).reshape((k,) + node.train["b"].shape[1:])
            a_all, b_all = node.frozen["a0"], node.frozen["b0"]
            base = (linalg.upcast(node.base)
                    + fold_delta(a_all, b_all, da, db, node.method.scale)).astype(node.base.dtype)
            if node.method.frames == "fixed":
                return node.replace(base=base)
            a0, b0 = (a_all + da).astype(a_all.dtype), (b_all + db).astype(b_all.dtype)
            # This device's adapter is its slice of the new frames (bitwise: the reference point).
            train = {**new_train.train, "a": lax.dynamic_slice_in_dim(a0, d, 1, axis=0),
                     "b": lax.dynamic_slice_in_dim(b0, d, 1, axis=0)}
            return node.replace(base=base, train=train, frozen={**node.frozen, "a0": a0, "b0": b0})

        def merge_back(x, new):
            if x is None:
                return None
            if _is_hd(x):
                return fold(x, new)
            if isinstance(x, Adapter):
                return x.replace(train=new.train)
            return new

        new_params = jax.tree.map(merge_back, params, combine(stepped, frozen), is_leaf=is_adapter_or_hole)
        return new_params, opt_state, lax.pmean(value, axis)

    def step(params, opt_state, batch):
        for node in jax.tree.leaves(params, is_leaf=is_adapter):
            if _is_hd(node) and node.method.devices != k:
                raise ValueError(f"{node.method!r} spreads its frames over {node.method.devices} devices but "
                                 f"mesh axis {axis!r} has {k}")
        trainable, _ = split(params)
        specs = (_param_specs(params, axis), _state_specs(opt_state, trainable, axis), _batch_specs(batch, axis))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(specs[0], specs[1], P()))(
            params, opt_state, batch)

    return jax.jit(step) if jit else step


# --------------------------------------------------------------------------------- baseline
def data_parallel_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       axis: str = "dp", jit: bool = True) -> Callable:
    """Plain data parallelism: replicated parameters and optimizer state, each device's gradient
    of its micro-batch all-reduced (mean) over `axis`, the same step everywhere.
    `step(params, opt_state, batch) -> (params, opt_state, loss)`."""
    _axis_size(mesh, axis)

    def local(params, opt_state, batch):
        trainable, frozen = split(params)
        varying = jax.tree.map(lambda t: lax.pcast(t, axis, to="varying"), trainable)
        value, grads = jax.value_and_grad(lambda t: loss_fn(combine(t, frozen), batch))(varying)
        grads = jax.tree.map(lambda g: lax.pmean(g, axis), grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return combine(optax.apply_updates(trainable, updates), frozen), opt_state, lax.pmean(value, axis)

    def step(params, opt_state, batch):
        rep = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
        specs = (rep(params), rep(opt_state), _batch_specs(batch, axis))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(specs[0], specs[1], P()))(
            params, opt_state, batch)

    return jax.jit(step) if jit else step


# --------------------------------------------------------------------------------- measuring
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<type>.+?)\s+"
                    r"(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)")
_SHAPE = re.compile(r"\b(?P<dtype>pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter")


def _shape_bytes(text: str) -> int:
    total = 0
    for m in _SHAPE.finditer(text):
        dims = [int(d) for d in m.group("dims").split(",") if d]
        total += _BYTES[m.group("dtype")] * math.prod(dims)
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device of the operands of every all-reduce / all-gather / reduce-scatter in an
    HLO module's text (`jax.jit(f).lower(...).compile().as_text()`), per op kind, plus `"total"`
    and `"count"` (number of collective ops). Async pairs count once, at their `-start`."""
    types, calls = {}, []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        types[m.group("name")] = m.group("type")
        op = m.group("op")
        for kind in COLLECTIVES:
            if op in (kind, kind + "-start"):
                calls.append((kind, m.group("args")))
    out = {kind: 0 for kind in COLLECTIVES}
    for kind, args in calls:
        args = re.sub(r"/\*.*?\*/", "", args)  # drop `/*index=5*/` annotations
        inline = _shape_bytes(args)  # some HLO printers put operand types inline
        out[kind] += inline or sum(_shape_bytes(types.get(a.strip().lstrip("%"), "")) for a in args.split(","))
    out["count"] = len(calls)
    out["total"] = sum(out[kind] for kind in COLLECTIVES)
    return out


__all__ = ["collective_bytes", "data_parallel_step", "fold_delta", "hd_pissa_shardings", "hd_pissa_step", "place"]
