"""Shardings of adapted trees, derived from the base weights' shardings (docs/design.md section 6,
"Scale-out"; docs/scale.md).

Given how the base parameters are sharded (FSDP on one mesh axis, tensor parallel on another, ...),
every adapter array gets the sharding its role implies:

- `a`-like factors `(in, r)` follow the base's input axis, `b`-like factors `(r, out)` its output
  axis, the rank axis is replicated; arrays shaped like the base take the base's sharding; vectors
  over `out` (DoRA's magnitude) or `in` follow that axis;
- shared banks (`train["shared"]` / `frozen["shared"]`, `jpeft.shared`) and scalars are replicated;
- a method may state its arrays' roles itself with `Method.sharding_layout(node) -> {part: {key: roles}}`,
  roles being `"in"`, `"out"`, `"stack"` (a leading data-parallel device axis, HD-PiSSA) or None;
- a mesh axis is used at most once per array (the stack axis wins), and a dimension that the mesh
  axis size does not divide is replicated instead;
- a quantised leaf (`jpeft.quant.QTensor`, as a leaf or an adapter's base) has its codes and
  scales replicated (4-bit codes are flat per matrix); the adapters on it still follow the
  spec of its logical shape.

    base = {"layer": {"q": {"kernel": P("fsdp", "tp")}, "o": {"kernel": P("tp", "fsdp")}}}
    shardings = jpeft.sharding.adapter_shardings(params, base, mesh)
    train_sh, frozen_sh = jpeft.sharding.split_shardings(params, base, mesh)
    opt_sh = jpeft.sharding.opt_state_shardings(jax.eval_shape(tx.init, trainable), train_sh, mesh)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jpeft.adapter import Adapter, is_adapter_or_hole
from jpeft.core import split
from jpeft.paths import leaves_with_paths
from jpeft.quant import QTensor, is_quantized
from jpeft.shared import SHARED

P = PartitionSpec
_A_KEYS = ("a", "a0", "lora_a")
_B_KEYS = ("b", "b0", "lora_b")
_OUT_VECTORS = ("m", "magnitude")


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _spec_of(x: Any) -> PartitionSpec:
    if isinstance(x, NamedSharding):
        return x.spec
    return P() if x is None else x


def _mesh_from(base: Any) -> Mesh | AbstractMesh | None:
    if callable(base):
        return None
    for leaf in jax.tree.leaves(base, is_leaf=_is_spec):
        if isinstance(leaf, NamedSharding):
            return leaf.mesh
    return None


def _base_lookup(base: Any) -> Callable[[str, Any], PartitionSpec]:
    """`(path, leaf) -> PartitionSpec` from a tree of shardings/specs or a callable."""
    if callable(base) and not _is_spec(base):
        return lambda path, leaf: _spec_of(base(path, leaf))
    if _is_spec(base):  # one spec for every leaf
        return lambda path, leaf: _spec_of(base)
    table = {path: _spec_of(s) for path, s in leaves_with_paths(base, is_leaf=_is_spec)}

    def lookup(path, leaf):
        if path not in table:
            raise KeyError(f"no base sharding for {path!r}; the base sharding tree must be shaped like the "
                           f"base parameters (known paths: {sorted(table)[:5]}...)")
        return table[path]

    return lookup


def _quantized_specs(q: QTensor) -> QTensor:
    """A `QTensor` of replicated specs, one per array of `q`."""
    return jax.tree.map(lambda _: P(), q)


def _entries(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} has more entries than the array has dimensions ({ndim})")
    return entries + [None] * (ndim - len(entries))


def _axis_names(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_from_roles(roles, shape, base_entries, mesh: Mesh | AbstractMesh, stack_axis) -> PartitionSpec:
    """Mesh axes for an array whose dimensions play `roles` ("in", "out", "stack", "base:<i>")."""
    wanted = []
    for role in roles:
        if role == "in":
            wanted.append(base_entries[0] if base_entries else None)
        elif role == "out":
            wanted.append(base_entries[-1] if base_entries else None)
        elif role == "stack":
            wanted.append(stack_axis)
        elif isinstance(role, str) and role.startswith("base:"):
            i = int(role[5:])
            wanted.append(base_entries[i] if i < len(base_entries) else None)
        else:
            wanted.append(None)
    order = sorted(range(len(roles)), key=lambda i: roles[i] != "stack")  # the stack axis wins
    used: set = set()
    out = [None] * len(roles)
    for i in order:
        names = _axis_names(wanted[i])
        if not names or used & set(names):
            continue
        size = math.prod(mesh.shape[n] for n in names)
        if shape[i] % size:
            continue
        used |= set(names)
        out[i] = wanted[i]
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _default_roles(key: str, shape: tuple, base_shape: tuple | None) -> tuple:
    ndim = len(shape)
    if ndim == 0:
        return ()
    if base_shape is None:  # the node trains the whole leaf (Full): arrays like it follow it
        return tuple(f"base:{i}" for i in range(ndim))
    if tuple(shape) == tuple(base_shape):
        return tuple(f"base:{i}" for i in range(ndim))
    if len(base_shape) != 2:
        return (None,) * ndim
    n, m = base_shape
    if ndim == 2:
        if key in _A_KEYS and shape[0] == n:
            return ("in", None)
        if key in _B_KEYS and shape[1] == m:
            return (None, "out")
        if shape[0] == n:
            return ("in", None)
        if shape[1] == m:
            return (None, "out")
    if ndim == 1:
        if shape[0] == m and (shape[0] != n or key in _OUT_VECTORS):
            return ("out",)
        if shape[0] == n:
            return ("in",)
    return (None,) * ndim


def _group_entry(entries, axes):
    """The mesh axes of a flattened group of base axes: those of its major (first) axis when the
    others are unsharded (the flattened dimension is then split in the same contiguous blocks),
    else None (replicated)."""
    if any(entries[a] is not None for a in axes[1:]):
        return None
    return entries[axes[0]]


def _viewed_partition_specs(node: Adapter, base_spec: PartitionSpec, mesh: Mesh | AbstractMesh,
                            stack_axis) -> Adapter:
    """A viewed node: batch axes keep the base's mesh axes of those axes (a scanned stack stays
    sharded like its base); the per-slice arrays follow the matrix view's in / out groups."""
    view = node.view
    shape = tuple(np.shape(node.base))
    entries = _entries(base_spec, len(shape))
    nb = len(view.batch)
    lead = [entries[b] for b in view.batch]
    lead = [e if shape[b] % math.prod(mesh.shape[n] for n in _axis_names(e)) == 0 else None
            for e, b in zip(lead, view.batch)]
    taken = {n for e in lead for n in _axis_names(e)}
    free = lambda e: None if taken & set(_axis_names(e)) else e  # noqa: E731
    matrix_spec = P(free(_group_entry(entries, view.inputs)), free(_group_entry(entries, view.outputs)))
    abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x)[nb:], getattr(x, "dtype", np.float32))  # noqa: E731

    def part(d):
        return {k: (v if k == SHARED else jax.tree.map(abstract, v)) for k, v in d.items()}

    one = node.replace(base=jax.ShapeDtypeStruct(view.matrix_shape(shape), node.base.dtype), view=None,
                       train=part(node.train), frozen=part(node.frozen), state=part(node.state))
    inner = node_partition_specs(one, matrix_spec, mesh, stack_axis=stack_axis)

    def prepend(d):
        return {k: (v if k == SHARED else jax.tree.map(lambda sp: P(*lead, *tuple(sp)), v,
                                                        is_leaf=lambda x: isinstance(x, PartitionSpec)))
                for k, v in d.items()}

    base = _quantized_specs(node.base) if is_quantized(node.base) else _spec_from_roles(
        tuple(f"base:{i}" for i in range(len(shape))), shape, entries, mesh, None)
    return node.replace(base=base, train=prepend(inner.train), frozen=prepend(inner.frozen),
                        state=prepend(inner.state))


def node_partition_specs(node: Adapter, base_spec: PartitionSpec, mesh: Mesh | AbstractMesh, *,
                         stack_axis=None) -> Adapter:
    """The `PartitionSpec`s of one adapter node's arrays (an `Adapter` holding specs)."""
    if node.view is not None and node.base is not None:
        return _viewed_partition_specs(node, base_spec, mesh, stack_axis)
    base_shape = None if node.base is None else tuple(np.shape(node.base))
    ref_ndim = len(base_shape) if base_shape is not None else max(
        (len(np.shape(x)) for x in jax.tree.leaves(node.train)), default=0)
    base_entries = _entries(base_spec, ref_ndim)
    layout = node.method.sharding_layout(node)

    def part(name, d):
        roles_for = layout.get(name, {})

        def one(key, x):
            if key == SHARED:
                return jax.tree.map(lambda _: P(), x)
            if isinstance(x, dict):
                return {k: one(k, v) for k, v in x.items()}
            shape = tuple(np.shape(x))
            roles = roles_for.get(key) or _default_roles(key, shape, base_shape)
            return _spec_from_roles(roles, shape, base_entries, mesh, stack_axis)

        return {k: one(k, v) for k, v in d.items()}

    base = None if base_shape is None else _quantized_specs(node.base) if is_quantized(node.base) else \
        _spec_from_roles(tuple(f"base:{i}" for i in range(len(base_shape))), base_shape, base_entries, mesh, None)
    return node.replace(base=base, train=part("train", node.train), frozen=part("frozen", node.frozen),
                        state=part("state", node.state))


def partition_specs(params: Any, base: Any, mesh: Mesh | AbstractMesh | None = None, *, stack_axis=None) -> Any:
    """A tree shaped like `params` (adapter nodes included) of `PartitionSpec`s.

    `base`: the base parameters' shardings — a tree shaped like the *base* parameter tree (before
    `jpeft.init`) of `NamedSharding`s, `PartitionSpec`s or None (replicated); or one spec for all
    leaves; or a callable `(path, leaf) -> spec`. `mesh` is needed unless `base` holds
    `NamedSharding`s. `stack_axis` names the mesh axis of leading device axes (HD-PiSSA).
    """
    mesh = mesh or _mesh_from(base)
    if mesh is None:
        raise ValueError("pass a mesh (the base shardings are PartitionSpecs)")
    lookup = _base_lookup(base)

    def one(path, leaf):
        if leaf is None:
            return None
        if isinstance(leaf, Adapter):
            return node_partition_specs(leaf, lookup(path, leaf), mesh, stack_axis=stack_axis)
        if is_quantized(leaf):
            return _quantized_specs(leaf)
        spec = lookup(path, leaf)
        return _spec_from_roles(tuple(f"base:{i}" for i in range(np.ndim(leaf))), tuple(np.shape(leaf)),
                                _entries(spec, np.ndim(leaf)), mesh, None)

    whole = lambda x: is_adapter_or_hole(x) or is_quantized(x)  # noqa: E731
    pairs = leaves_with_paths(params, is_leaf=whole)
    treedef = jax.tree_util.tree_structure(params, is_leaf=whole)
    return jax.tree_util.tree_unflatten(treedef, [one(p, leaf) for p, leaf in pairs])


def _named(specs: Any, mesh: Mesh | AbstractMesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def adapter_shardings(params: Any, base: Any, mesh: Mesh | AbstractMesh | None = None, *, stack_axis=None) -> Any:
    """`NamedSharding`s for every array of the adapted tree `params` (see `partition_specs`)."""
    mesh = mesh or _mesh_from(base)
    if mesh is None:
        raise ValueError("pass a mesh (the base shardings are PartitionSpecs)")
    return _named(partition_specs(params, base, mesh, stack_axis=stack_axis), mesh)


def split_shardings(params: Any, base: Any, mesh: Mesh | None = None, *, stack_axis=None) -> tuple[Any, Any]:
    """`(trainable, frozen)` shardings, shaped like `jpeft.split(params)`'s two halves."""
    return split(adapter_shardings(params, base, mesh, stack_axis=stack_axis))


def opt_state_shardings(opt_state: Any, trainable_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state of the trainable tree: every per-parameter subtree (Adam's
    `mu`, `nu`, ...) takes the trainable shardings, everything else (step counts) is replicated.
    `opt_state` may be abstract (`jax.eval_shape(tx.init, trainable)`)."""
    target = jax.tree_util.tree_structure(trainable_shardings)
    is_moment = lambda x: (x is not None  # noqa: E731
                           and jax.tree_util.tree_structure(x) == target)  # type: ignore[operator]  # jaxlib: no stubs
    leaves, treedef = jax.tree_util.tree_flatten(opt_state, is_leaf=is_moment)
    replicated = NamedSharding(mesh, P())
    return jax.tree_util.tree_unflatten(treedef, [trainable_shardings if is_moment(x) else replicated
                                                  for x in leaves])


def fsdp_specs(base: Any, mesh: Mesh, axis: str = "fsdp", *, tensor: str | None = None,
               min_size: int = 4096) -> Any:
    """Base shardings for fully sharded data parallelism (FSDP / ZeRO-3), optionally with tensor
    parallelism: a tree shaped like the plain `base` parameters of `PartitionSpec`s. An array of
    at least `min_size` elements has its largest dimension that the size of mesh axis `axis`
    divides split over `axis`, and with `tensor` its largest other dimension that axis divides
    split over `tensor`; smaller arrays (norm scales, biases) and axes of size 1 stay replicated.
    A quantised leaf gets the spec of its logical shape (its adapters follow it; its own codes
    are replicated by `partition_specs`). Pass it as `base` to `partition_specs` / `adapter_shardings` /
    `split_shardings`: the adapters then follow it."""
    for name in (axis, tensor):
        if name is not None and name not in mesh.shape:
            raise ValueError(f"fsdp_specs: the mesh has no axis {name!r}; its axes are {tuple(mesh.shape)}")

    def one(leaf):
        shape = tuple(np.shape(leaf))
        entries: list = [None] * len(shape)
        if math.prod(shape) < min_size:
            return P()
        for name in (axis, tensor):
            if name is None or mesh.shape[name] == 1:
                continue
            free = [i for i in range(len(shape)) if entries[i] is None and shape[i] % mesh.shape[name] == 0]
            if free:
                entries[max(free, key=lambda i: shape[i])] = name
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    return jax.tree.map(one, base, is_leaf=is_quantized)


def replicated(tree: Any, mesh: Mesh) -> Any:
    """A fully replicated `NamedSharding` for every leaf of `tree`."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
