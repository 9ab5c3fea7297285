"""Matrix views of N-D kernels (docs/any_model.md).

A method adapts a matrix. A kernel of any rank is adapted through a `View`: which of its axes form
the matrix's input side, which its output side, and which are independent batch axes (the layer
axis of an `nn.scan` stack, an expert axis, heads when a rule asks for per-head adapters). Each
batch slice gets its own adapter; the adapter node's arrays carry the batch axes in front, in the
order `View.batch` lists them.

    spec = jpeft.Spec({r".*/query/kernel": jpeft.LoRA(rank=8)},
                      views={r".*/query/kernel": jpeft.View(inputs=(0,), outputs=(1, 2))})

A 2-D kernel needs no view (`(in, out)`, Flax's layout). `jpeft.infer_views` finds the views of a
model's kernels by tracing it once.

Per-slice work goes through the helpers here: `create_node` (one `method.create` per slice, so
PiSSA takes one SVD per layer and sparse methods select per slice) and `slice_map` (a method
function `vmap`ped over the batch axes, used for materialise, the factored matmul and
`rebuild_base`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter
from jpeft.errors import SpecError, leaf_error
from jpeft.quant import QTensor, dequantize_array, is_quantized, quantize_array
from jpeft.shared import SHARED


def _axes(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a >= 0 for a in value):
        raise ValueError(f"View.{what} must be a tuple of non-negative axis numbers, got {value!r}")
    return tuple(int(a) for a in value)


@dataclasses.dataclass(frozen=True)
class View:
    """How a kernel of any rank is seen as a (batch of) `(in, out)` matrix.

    inputs:  the axes that flatten, in this order, into the matrix's input dimension.
    outputs: the axes that flatten, in this order, into its output dimension.
    batch:   independent axes; one adapter per slice (in this order, leading in the node).

    Every axis of the kernel is in exactly one group; `inputs` and `outputs` are not empty.
    """

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    batch: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "inputs", _axes(self.inputs, "inputs"))
        object.__setattr__(self, "outputs", _axes(self.outputs, "outputs"))
        object.__setattr__(self, "batch", _axes(self.batch, "batch"))
        if not self.inputs or not self.outputs:
            raise ValueError(f"{self}: inputs and outputs must each name at least one axis")
        every = self.batch + self.inputs + self.outputs
        if len(set(every)) != len(every):
            raise ValueError(f"{self}: an axis is named twice")
        if sorted(every) != list(range(len(every))):
            raise ValueError(f"{self}: the axes must be 0..{len(every) - 1}, each once")

    @property
    def ndim(self) -> int:
        return len(self.batch) + len(self.inputs) + len(self.outputs)

    @property
    def perm(self) -> tuple[int, ...]:
        return self.batch + self.inputs + self.outputs

    @property
    def is_trailing_matrix(self) -> bool:
        """Batch axes first, then one input and one output axis: the matrices are the trailing
        2-D slices, in place (an `nn.scan` stack)."""
        return len(self.inputs) == 1 and len(self.outputs) == 1 and self.perm == tuple(range(self.ndim))

    @property
    def is_plain(self) -> bool:
        """The 2-D `(in, out)` view, i.e. no view at all."""
        return self == PLAIN

    # ------------------------------------------------------------------ shapes
    def check(self, path: str, shape: Sequence[int], dtype: Any = None) -> None:
        if len(shape) != self.ndim:
            raise leaf_error(path, tuple(shape), dtype,
                             f"the view {self} is for a {self.ndim}-D kernel")

    def batch_shape(self, shape) -> tuple[int, ...]:
        return tuple(int(shape[a]) for a in self.batch)

    def matrix_shape(self, shape) -> tuple[int, int]:
        """The `(in, out)` shape of one slice."""
        return (math.prod(int(shape[a]) for a in self.inputs), math.prod(int(shape[a]) for a in self.outputs))

    def to_matrix(self, w: jax.Array) -> jax.Array:
        """`w` as `(*batch, in, out)`: a transpose only where the groups are not in order."""
        moved = w if self.perm == tuple(range(w.ndim)) else jnp.transpose(w, self.perm)
        return moved.reshape(*self.batch_shape(w.shape), *self.matrix_shape(w.shape))

    def from_matrix(self, m: jax.Array, shape) -> jax.Array:
        """Inverse of `to_matrix` for a kernel of shape `shape`."""
        grouped = m.reshape(*(int(shape[a]) for a in self.perm))
        if self.perm == tuple(range(len(shape))):
            return grouped
        return jnp.transpose(grouped, np.argsort(self.perm).tolist())

    def drop_leading(self, k: int) -> View:
        """The view of a slice whose first `k` axes (leading batch axes) were indexed away, as
        `nn.scan` does to a stacked kernel."""
        if k == 0:
            return self
        if self.batch[:k] != tuple(range(k)):
            raise ValueError(f"{self}: a slice drops leading axes 0..{k - 1}, which must be its first batch axes")
        shift = lambda axes: tuple(a - k for a in axes)  # noqa: E731
        return View(inputs=shift(self.inputs), outputs=shift(self.outputs), batch=shift(self.batch[k:]))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, list[int]]:
        return {"inputs": list(self.inputs), "outputs": list(self.outputs), "batch": list(self.batch)}

    @classmethod
    def from_dict(cls, d: dict) -> View:
        return cls(inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]), batch=tuple(d.get("batch", ())))

    def __repr__(self) -> str:
        batch = f", batch={self.batch}" if self.batch else ""
        return f"View(inputs={self.inputs}, outputs={self.outputs}{batch})"


PLAIN = View(inputs=(0,), outputs=(1,))


def missing_view_error(path: str, w: Any):
    shape = tuple(np.shape(w))
    example = View(inputs=(0,), outputs=tuple(range(1, len(shape)))) if len(shape) > 1 else None
    hint = (f"declare one, e.g. jpeft.Spec(rules, views={{{path!r}: jpeft.{example!r}}}) (add batch=(0,) for a "
            f"scanned layer axis), or infer them with jpeft.infer_views(model.apply, variables, *inputs)"
            if example is not None else "a 1-D leaf has no matrix view; use jpeft.Full() for it")
    return leaf_error(path, shape, getattr(w, "dtype", None),
                      f"a {len(shape)}-D kernel needs a View saying which axes are inputs, outputs and "
                      f"batch; {hint}")


# ------------------------------------------------------------------ per-slice helpers
def node_axes(node: Adapter, axis: int | None = 0, base_axis: int | None = 0) -> Adapter:
    """`vmap` axes for a node's arrays: `axis` for every array, except the shared state (lent,
    unbatched)."""
    def part(d):
        return {k: (None if k == SHARED else jax.tree.map(lambda _: axis, v)) for k, v in d.items()}

    return node.replace(base=None if node.base is None else base_axis, train=part(node.train),
                        frozen=part(node.frozen), state=part(node.state))


def matrix_node(node: Adapter) -> Adapter:
    """The node with its base as `(*batch, in, out)` and no view: what `slice_map` maps over."""
    view = node.view
    if is_quantized(node.base):
        if not view.is_plain:
            raise SpecError(f"a quantised base is used as a plain (in, out) kernel only, not through {view!r}")
        return node.replace(view=None)
    base = None if node.base is None else view.to_matrix(node.base)
    return node.replace(base=base, view=None)


def slice_map(fn: Callable, mnode: Adapter, nbatch: int, *args, arg_axes=None):
    """`fn(slice_node, *slice_args)` over every batch slice of a matrix node (`matrix_node`),
    `vmap`ped once per batch axis. `arg_axes[i]` is argument i's batched axis (0, or None for an
    unbatched one; default 0)."""
    f = fn
    axes = tuple(arg_axes) if arg_axes is not None else (0,) * len(args)
    for _ in range(nbatch):
        f = jax.vmap(f, in_axes=(node_axes(mnode), *axes))
    return f(mnode, *args)


# ------------------------------------------------------------------ the per-node operations
def check_leaf(method, path: str, w: jax.Array, view: View | None) -> None:
    """`method.check` on the leaf, or on one slice of its matrix view."""
    if view is None or view.is_plain:
        method.check(path, w)
        return
    view.check(path, w.shape, w.dtype)
    method.check(path, jax.ShapeDtypeStruct(view.matrix_shape(w.shape), w.dtype))


def create_node(method, path: str, key: jax.Array, w: jax.Array, calib, view: View | None) -> Adapter:
    """`method.create` on a leaf through its view: one independent adapter per batch slice."""
    if view is None or view.is_plain:
        method.check(path, w)
        node = method.create(key, w, calib)
        return node.replace(base=_stored_base(method, node.base, path))
    view.check(path, w.shape, w.dtype)
    if method.base_quant is not None and not view.is_trailing_matrix:
        raise SpecError(f"{path}: {method!r} quantises the base it chooses, which is stored as a stack of the "
                        f"leaf's trailing 2-D matrices; the view {view} regroups the axes (use a view whose "
                        "batch axes lead and whose inputs / outputs are the last two axes, in order)")
    batch_shape = view.batch_shape(w.shape)
    m = view.to_matrix(w)
    cm = None if calib is None else view.to_matrix(calib)
    if not batch_shape:
        method.check(path, m)
        node = method.create(key, m, cm)
    else:
        keys = slice_keys(key, batch_shape).reshape(-1, *jnp.shape(key))
        flat_m = m.reshape(-1, *m.shape[-2:])
        flat_c = None if cm is None else cm.reshape(-1, *cm.shape[-2:])
        method.check(path, flat_m[0])
        nodes = [method.create(keys[i], flat_m[i], None if flat_c is None else flat_c[i])
                 for i in range(flat_m.shape[0])]
        node = stack_nodes(nodes, batch_shape)
    base = None if node.base is None else view.from_matrix(node.base, w.shape)
    return node.replace(base=_stored_base(method, base, path), view=view)


def _stored_base(method, base, path: str = "array"):
    """The base as the node keeps it: quantised with `method.base_quant` when it has one."""
    if method.base_quant is None or base is None:
        return base
    return quantize_array(base, method.base_quant, path)


def materialise_node(node: Adapter, rng: jax.Array | None = None) -> jax.Array:
    """The effective kernel of a node, in the leaf's own shape (a quantised base is dequantised
    here, so under `jax.checkpoint` it is recomputed, never saved)."""
    if is_quantized(node.base):
        node = node.replace(base=dequantize_array(node.base))
    if node.view is None:
        return node.method.materialise(node, rng)
    view, shape = node.view, node.base.shape
    mnode = matrix_node(node)
    nb = len(view.batch)
    keys = slice_keys(rng, view.batch_shape(shape))
    out = slice_map(lambda n, k: n.method.materialise(n, k), mnode, nb, keys,
                    arg_axes=(None if keys is None else 0,))
    return view.from_matrix(out, shape)


def rebuild_base(node: Adapter, w: jax.Array) -> jax.Array | QTensor | None:
    """`method.rebuild_base(w, node)` through the node's view (checkpoint restore)."""
    if node.view is None:
        return _stored_base(node.method, node.method.rebuild_base(w, node))
    view = node.view
    mnode = matrix_node(node.replace(base=w))
    out = slice_map(lambda n, ws: n.method.rebuild_base(ws, n), mnode, len(view.batch), view.to_matrix(w))
    return None if out is None else _stored_base(node.method, view.from_matrix(out, w.shape))


def stack_nodes(nodes: list[Adapter], batch_shape: tuple[int, ...]) -> Adapter:
    """One node from per-slice nodes (same structure), arrays stacked into `batch_shape` in front;
    shared state (not batched) is taken from the first."""
    def stack(*xs):
        return jnp.stack(xs).reshape(*batch_shape, *jnp.shape(xs[0]))

    def part(name):
        first = getattr(nodes[0], name)
        return {k: (v if k == SHARED else jax.tree.map(stack, *[getattr(n, name)[k] for n in nodes]))
                for k, v in first.items()}

    base = None if nodes[0].base is None else stack(*[n.base for n in nodes])
    return nodes[0].replace(base=base, train=part("train"), frozen=part("frozen"), state=part("state"))


def unstack_node(node: Adapter, batch_shape: tuple[int, ...]) -> list[Adapter]:
    """Inverse of `stack_nodes` (slices in row-major order); shared state is not batched."""
    n = math.prod(batch_shape)

    def cut(i):
        def part(d):
            return {k: (v if k == SHARED else jax.tree.map(
                lambda x: x.reshape(n, *x.shape[len(batch_shape):])[i], v)) for k, v in d.items()}
        base = None if node.base is None else node.base.reshape(n, *node.base.shape[len(batch_shape):])[i]
        return node.replace(base=base, train=part(node.train), frozen=part(node.frozen), state=part(node.state))

    return [cut(i) for i in range(n)]


def matrix_slices(node: Adapter) -> list[Adapter]:
    """The node as a list of plain 2-D nodes, one per batch slice (itself if it has no view).
    Works on halves of a split tree (holes stay None). For code that reads a node's arrays
    directly, such as loss regularisers."""
    if node.view is None:
        return [node]
    shape = node.view.batch_shape(node.base.shape) if node.base is not None else _lead_shape(node)
    mnode = matrix_node(node) if node.base is not None else node.replace(view=None)
    return unstack_node(mnode, shape) if shape else [mnode]


def _lead_shape(node: Adapter) -> tuple[int, ...]:
    """The batch shape of a node without its base (a trainable half): the leading axes of its
    first non-shared array."""
    k = len(node.view.batch)
    for part in (node.train, node.frozen, node.state):
        for name, v in part.items():
            if name != SHARED:
                leaves = [x for x in jax.tree.leaves(v) if x is not None]
                if leaves:
                    return tuple(leaves[0].shape[:k])
    return ()


def slice_keys(key: jax.Array | None, batch_shape: tuple[int, ...]):
    """One key per slice (row-major), or None."""
    if key is None:
        return None
    n = math.prod(batch_shape)
    return jax.random.split(key, n).reshape(*batch_shape, *jnp.shape(key))
