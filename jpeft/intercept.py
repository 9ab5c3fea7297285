"""The op-level interception behind `jpeft.factored` and `jpeft.infer_views`.

The mechanism is op-level, over public functions only (no custom tracers, no JAX internals):

- The model is handed each adapted kernel's *base* array, and the array is registered (by
  identity) with its adapter node. While the model runs, `jax.lax.dot_general`,
  `jax.numpy.einsum`, `jax.numpy.dot`, `jax.numpy.matmul`, `jax.numpy.take`,
  `jax.numpy.asarray` (Flax's dtype promotion) and `jax.lax.conv_general_dilated` are
  intercepted; an op that receives a registered array computes the method's factored form
  through the kernel's `jpeft.View` instead. That covers Linen `Dense`,
  `DenseGeneral`, `Einsum`, `Embed` (lookup; `attend` is intercepted as a method), NNX `Linear`,
  `LinearGeneral`, `Einsum`, `Embed`, and custom layers that call those functions.
- Linen: the adapter arrays ride in the params tree beside their kernel (`kernel` holds the
  base, `kernel<SUFFIX>` the node without its base), and `nn.intercept_methods` registers each
  module's kernels as the module runs, so every Linen lifted transform (`nn.scan`, `nn.remat`,
  `nn.vmap`, ...) carries both together.
- NNX and plain JAX: the arrays themselves are registered. `jax.lax.scan` (under `nnx.scan` or a
  custom scan over stacked weights) and `jax.checkpoint` (under `nnx.remat`) are intercepted: a
  registered kernel among their inputs takes its node's arrays along, and the inner function
  registers the kernel it receives (per layer, for a scan) with its node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpeft.adapter import Adapter
from jpeft.errors import SpecError
from jpeft.methods.base import Method
from jpeft.quant import is_quantized
from jpeft.views import PLAIN, View, matrix_node, node_axes, slice_keys

#: The params-tree key beside a kernel that carries its adapter node (Linen factored path).
SUFFIX = "~jpeft"


# ============================================================================ the registry
@dataclasses.dataclass
class Kernel:
    path: str
    node: Adapter | None     # None while only inferring views
    full_shape: tuple        # the leaf's shape outside any nn.scan
    rng: Any = None


class _State(threading.local):
    def __init__(self):
        self.kernels: dict[int, tuple[Any, Kernel]] = {}   # id(array) -> (array, kernel)
        self.consumed: set[str] = set()
        self.declined: set[str] = set()
        self.views: dict[str, View] = {}
        self.active = False
        self.inside = False                                 # inside a jpeft op: no interception
        self.infer = False
        self.probing = False                                # the probe pass (see `_probe`)
        self.meta: dict[str, Kernel] = {}                 # Linen: path -> kernel info


STATE = _State()


def lookup_kernel(x) -> Kernel | None:
    if not STATE.active or STATE.inside:
        return None
    hit = STATE.kernels.get(id(x))
    return hit[1] if hit is not None and hit[0] is x else None


def register_kernel(array, kernel: Kernel) -> None:
    STATE.kernels[id(array)] = (array, kernel)


# ============================================================================ the contraction
def _op_view(kernel: Kernel, array) -> View:
    """The kernel's view as this op sees it (leading stack axes sliced away by `nn.scan`)."""
    view = kernel.node.view if kernel.node is not None and kernel.node.view is not None else PLAIN
    return view.drop_leading(view.ndim - array.ndim)


def _contract(kernel: Kernel, karray, x, k_contract, x_contract, k_batch, x_batch, kernel_first, out_dtype):
    """`dot_general` of `x` with the adapted kernel (the base array `karray` as the op saw it), by
    the method's factored form through the kernel's view; None if the op does not fit the view
    or the method has no factored form (then the caller runs the plain op on the materialised
    weight). Output axes in `dot_general` order: batch, lhs free, rhs free."""
    view = _op_view(kernel, karray)
    node = kernel.node
    if node is None:
        raise RuntimeError(f"jpeft.factored: {kernel.path} has no adapter node (only view inference runs without one)")
    nk = karray.ndim
    k_free = [a for a in range(nk) if a not in k_contract and a not in k_batch]
    if set(k_contract) == set(view.inputs) and set(k_free) | set(k_batch) == set(view.outputs) | set(view.batch) \
            and set(k_batch) <= set(view.batch):
        fn, side_in, side_out = "matmul", view.inputs, view.outputs
    elif set(k_contract) == set(view.outputs) and set(k_batch) <= set(view.batch) \
            and set(k_free) | set(k_batch) == set(view.inputs) | set(view.batch):
        fn, side_in, side_out = "matmul_t", view.outputs, view.inputs
    else:
        return None
    # x: dot-batch axes first (in view.batch order), free axes, then contracted axes (in the
    # order the view flattens them).
    pair = dict(zip(k_contract, x_contract))
    bpair = dict(zip(k_batch, x_batch))
    xb = [bpair[b] for b in view.batch if b in bpair]
    xc = [pair[a] for a in side_in]
    xf = [a for a in range(x.ndim) if a not in xc and a not in xb]
    xt = jnp.transpose(x, (*xb, *xf, *xc)) if (*xb, *xf, *xc) != tuple(range(x.ndim)) else x
    xt = xt.reshape(*xt.shape[:len(xb) + len(xf)], -1)

    method = node.method
    out_shape = tuple(karray.shape[a] for a in side_out)
    quantized = is_quantized(node.base)
    if quantized and (fn != "matmul" or not view.is_plain or not method.quantized_matmul):
        STATE.declined.add(kernel.path)   # a quantised base runs factored as a plain `x @ K` only (for now)
        return None

    def one(n, xs, key):
        y = getattr(method, fn)(n, xs, key)
        return None if y is None else y.reshape(*xs.shape[:-1], *out_shape)

    # Probe for a factored form on one abstract slice before building the vmaps.
    if not method.overrides(fn):
        return None
    f = one
    keys = slice_keys(kernel.rng, view.batch_shape(karray.shape))
    for b in reversed(view.batch):
        x_axis = 0 if b in bpair else None
        f = _vmap_slice(f, x_axis, keys is not None)
    # The backward pass recomputes layout ops (reshape, transpose, casts) from the op's own
    # operands instead of keeping their results. All backends: inside `nn.scan` the kernel the
    # op sees is a slice of the stacked input, and without this each layer's matrix-shaped copy
    # of it (and the CPU form's transposed activations) became a stacked scan residual
    # (bench_views `scan`: peak 453.9 → 407.9 MB, below the hand-written LoRA's 418.7).
    # A quantised base stays quantised here: `lowrank_matmul` contracts with it through
    # `jpeft.quant.qmatmul`, which dequantises in the forward and again in the backward pass.
    base = node.base if quantized and not STATE.probing else compute_base(karray)
    y = jax.checkpoint(lambda n, xs: f(matrix_node(n), xs, keys), policy=_recompute_layout,
                       prevent_cse=False)(node.replace(base=base, view=view), xt)
    if y is None:
        STATE.declined.add(kernel.path)   # the method has no factored form for this config
        return None
    # y axes: view.batch..., x free..., side_out...; reorder to dot_general's output order.
    labels = [("k", b) for b in view.batch] + [("x", a) for a in xf] + [("k", o) for o in side_out]
    x_free = [("x", a) for a in xf]
    k_free_labels = [("k", a) for a in k_free]
    target = [("k", b) for b in k_batch] + (k_free_labels + x_free if kernel_first else x_free + k_free_labels)
    order = [labels.index(t) for t in target]
    if order != list(range(len(order))):
        y = jnp.transpose(y, order)
    STATE.consumed.add(kernel.path)
    return y.astype(out_dtype)


_LAYOUT_OPS = frozenset({"reshape", "transpose", "convert_element_type", "broadcast_in_dim", "squeeze",
                         "expand_dims"})


def _recompute_layout(prim, *_, **__) -> bool:
    """`jax.checkpoint` policy: save every value except the results of layout ops."""
    return prim.name not in _LAYOUT_OPS


def _vmap_slice(f, x_axis, keyed):
    def g(n, xs, key):
        return f(n, xs, key)

    def mapped(n, xs, keys):
        return jax.vmap(g, in_axes=(node_axes(n), x_axis, 0 if keyed else None))(n, xs, keys)

    return mapped


# ============================================================================ the intercepted ops
_ORIG: dict[str, Callable] = {}


def _result_dtype(x, k, preferred):
    return preferred if preferred is not None else jnp.result_type(x, k)


def _record_view(kernel: Kernel, karray, k_contract, k_batch):
    """infer_views: the view this op implies (stack axes sliced by nn.scan become batch axes)."""
    lead = len(kernel.full_shape) - karray.ndim
    shift = lambda axes: tuple(sorted(a + lead for a in axes))  # noqa: E731
    free = [a for a in range(karray.ndim) if a not in k_contract and a not in k_batch]
    view = View(inputs=shift(k_contract), outputs=shift(free), batch=tuple(range(lead)) + shift(k_batch))
    old = STATE.views.setdefault(kernel.path, view)
    if old != view:
        raise SpecError(f"{kernel.path}: the model multiplies this kernel as {old!r} in one place and as {view!r} "
                        f"in another; declare its view in the Spec")
    STATE.consumed.add(kernel.path)


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    orig = _ORIG["dot_general"]
    for kernel_first, karr, x in ((False, rhs, lhs), (True, lhs, rhs)):
        kernel = lookup_kernel(karr)
        if kernel is None:
            continue
        (lc, rc), (lb, rb) = dimension_numbers
        kc, xc, kb, xb = (lc, rc, lb, rb) if kernel_first else (rc, lc, rb, lb)
        kc, xc, kb, xb = (tuple(int(a) for a in t) for t in (kc, xc, kb, xb))
        if STATE.infer:
            _record_view(kernel, karr, kc, kb)
            break
        STATE.inside = True
        try:
            y = _contract(kernel, karr, x, kc, xc, kb, xb, kernel_first,
                          _result_dtype(x, karr, preferred_element_type))
        finally:
            STATE.inside = False
        if y is not None:
            return y
        break
    return orig(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kw)


def _einsum(subscripts, *operands, **kw):
    orig = _ORIG["einsum"]
    if (STATE.active and not STATE.inside and isinstance(subscripts, str) and len(operands) == 2
            and "->" in subscripts and any(lookup_kernel(o) is not None for o in operands)):
        ins, out = _expand_ellipsis(subscripts.replace(" ", ""), operands)
        parts = ins.split(",")
        if len(parts) == 2 and all(len(p) == o.ndim for p, o in zip(parts, operands)):
            a, b = parts
            ok = all(c in b or c in out for c in a) and all(c in a or c in out for c in b) and \
                len(set(a)) == len(a) and len(set(b)) == len(b)
            if ok:
                contract = [c for c in a if c in b and c not in out]
                batch = [c for c in a if c in b and c in out]
                dims = (([a.index(c) for c in contract], [b.index(c) for c in contract]),
                        ([a.index(c) for c in batch], [b.index(c) for c in batch]))
                y = _dot_general(operands[0], operands[1], dims,
                                 preferred_element_type=kw.get("preferred_element_type"))
                got = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
                if got != list(out):
                    y = jnp.transpose(y, [got.index(c) for c in out])
                return y
    return orig(subscripts, *operands, **kw)


def _expand_ellipsis(subscripts, operands):
    """`(inputs, output)` of an explicit einsum with `...` spelled out by fresh letters; an
    ellipsis on an adapted kernel is left in place (the caller then runs the plain einsum)."""
    ins, out = subscripts.split("->")
    if "..." not in subscripts:
        return ins, out
    parts = ins.split(",")
    fresh = (c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in subscripts)
    width = max((np.ndim(o) - (len(p) - 3) for p, o in zip(parts, operands) if "..." in p), default=0)
    letters = "".join(next(fresh) for _ in range(width))
    expanded = []
    for p, o in zip(parts, operands):
        if "..." in p:
            if lookup_kernel(o) is not None:
                return ins, out
            n = np.ndim(o) - (len(p) - 3)
            p = p.replace("...", letters[width - n:])
        expanded.append(p)
    return ",".join(expanded), out.replace("...", letters)


def _dot(a, b, *args, **kw):
    orig = _ORIG["dot"]
    if STATE.active and not STATE.inside and not args and set(kw) <= {"precision", "preferred_element_type"} \
            and (lookup_kernel(a) is not None or lookup_kernel(b) is not None) and np.ndim(a) >= 1 and np.ndim(b) >= 1:
        ca = (np.ndim(a) - 1,)
        cb = (max(np.ndim(b) - 2, 0),)
        return _dot_general(a, b, ((ca, cb), ((), ())), preferred_element_type=kw.get("preferred_element_type"))
    return orig(a, b, *args, **kw)


def _matmul(a, b, *args, **kw):
    orig = _ORIG["matmul"]
    if STATE.active and not STATE.inside and not args and set(kw) <= {"precision", "preferred_element_type"} \
            and ((lookup_kernel(b) is not None and np.ndim(b) == 2 and np.ndim(a) >= 1)
                 or (lookup_kernel(a) is not None and np.ndim(a) == 2 and np.ndim(b) == 2)):
        return _dot_general(a, b, (((np.ndim(a) - 1,), (0,)), ((), ())),
                            preferred_element_type=kw.get("preferred_element_type"))
    return orig(a, b, *args, **kw)


def _take(a, indices, axis=None, *args, **kw):
    orig = _ORIG["take"]
    kernel = lookup_kernel(a)
    if kernel is not None and axis == 0 and not args and not kw and a.ndim == 2:
        if STATE.infer:
            STATE.views.setdefault(kernel.path, PLAIN)
            STATE.consumed.add(kernel.path)
        elif kernel.node.view is None or kernel.node.view.is_plain:
            method = kernel.node.method
            if type(method).lookup is Method.lookup or is_quantized(kernel.node.base):
                STATE.declined.add(kernel.path)   # no factored lookup: materialised rows
            else:
                STATE.inside = True
                try:
                    y = method.lookup(kernel.node.replace(base=compute_base(a)), indices, kernel.rng)
                finally:
                    STATE.inside = False
                if y is not None:
                    STATE.consumed.add(kernel.path)
                    return y.astype(a.dtype)
                STATE.declined.add(kernel.path)
    return orig(a, indices, axis, *args, **kw)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, batch_group_count=1, **kw):
    """A convolution with an adapted kernel: the method's `conv` (LoRA: PEFT's low-rank conv, a
    conv to r channels with `a` then a 1×1 map with `b`) when the view's outputs are the kernel's
    output-feature axis and its inputs the rest."""
    orig = _ORIG["conv_general_dilated"]
    call = lambda x, k: orig(x, k, window_strides, padding, lhs_dilation, rhs_dilation,  # noqa: E731
                             dimension_numbers, feature_group_count, batch_group_count, **kw)
    kernel = lookup_kernel(rhs)
    if kernel is None or feature_group_count != 1 or batch_group_count != 1:
        return call(lhs, rhs)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    o_axis, out_feature = dn.rhs_spec[0], dn.out_spec[1]
    if STATE.infer:   # contracted: spatial and input-feature axes; free: output features
        _record_view(kernel, rhs, tuple(a for a in range(rhs.ndim) if a != o_axis), ())
        return call(lhs, rhs)
    view = _op_view(kernel, rhs)
    if view.batch or view.outputs != (o_axis,) or sorted(view.inputs) != [a for a in range(rhs.ndim) if a != o_axis]:
        return call(lhs, rhs)
    method = kernel.node.method
    if type(method).conv is Method.conv or is_quantized(kernel.node.base):
        STATE.declined.add(kernel.path)
        return call(lhs, rhs)
    node = matrix_node(kernel.node.replace(base=compute_base(rhs), view=view))

    def conv_to(x, a_cols):
        """`x` convolved with the kernel whose output features are the columns of `a_cols`
        (`(prod inputs, c)`, rows in the view's input order); output features last."""
        c = a_cols.shape[-1]
        shaped = a_cols.reshape(*(rhs.shape[i] for i in view.inputs), c)
        perm = list(view.inputs) + [o_axis]   # shaped's axes are these kernel axes, in order
        k = jnp.transpose(shaped, np.argsort(perm))
        return jnp.moveaxis(call(x, k.astype(rhs.dtype)), out_feature, -1)

    STATE.inside = True
    try:
        y = method.conv(node, lhs, lambda x: jnp.moveaxis(call(x, compute_base(rhs)), out_feature, -1), conv_to,
                        kernel.rng)
    finally:
        STATE.inside = False
    if y is None:
        STATE.declined.add(kernel.path)
        return call(lhs, rhs)
    STATE.consumed.add(kernel.path)
    return jnp.moveaxis(y, -1, out_feature).astype(jnp.result_type(lhs, rhs))


def _asarray(a, dtype=None, *args, **kw):
    out = _ORIG["asarray"](a, dtype, *args, **kw)
    kernel = lookup_kernel(a)
    if kernel is not None and out is not a:
        register_kernel(out, kernel)   # a dtype promotion of the kernel (Flax's promote_dtype)
    return out


def attend_factored(kernel: Kernel, embedding, query):
    """`query @ E'ᵀ` for an adapted embedding table (Embed.attend)."""
    STATE.inside = True
    try:
        return _contract(kernel, embedding, query, (1,), (query.ndim - 1,), (), (), False,
                         jnp.result_type(query, embedding))
    finally:
        STATE.inside = False


def _nnx_attend(self, query, out_sharding=None):
    kernel = lookup_kernel(self.embedding.get_value())
    if kernel is not None and out_sharding is None:
        if STATE.infer:
            return _ORIG["nnx_attend"](self, query)
        query, embedding = self.promote_dtype((query, self.embedding.get_value()), dtype=self.dtype)
        kernel = lookup_kernel(embedding) or kernel
        y = attend_factored(kernel, embedding, query)
        if y is not None:
            return y
    return _ORIG["nnx_attend"](self, query, out_sharding=out_sharding) if out_sharding is not None \
        else _ORIG["nnx_attend"](self, query)


def _scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    """`lax.scan` over a stack that holds adapted kernels (`nnx.scan`, a custom scan): each
    registered kernel among `xs` takes its node's arrays along as extra `xs` (and a dropout key
    per layer), and the body registers each layer's kernel slice with its node slice. The scanned
    axis must be the first of the view's batch axes left at that depth; otherwise the kernel is
    not registered in the body and gets the materialised weight (with the fallback warning)."""
    orig = _ORIG["scan"]
    riders = {} if xs is None else _riders(jax.tree_util.tree_leaves(xs), scanned=True)
    if not riders:
        return orig(f, init, xs, length, reverse, unroll, **kw)

    def body(carry, both):
        x, payload = both
        _register_riders(jax.tree_util.tree_leaves(x), riders, payload)
        return f(carry, x)

    return orig(body, init, (xs, _payload(riders)), length, reverse, unroll, **kw)


def _checkpoint(fun, *ck_args, **ck_kwargs):
    """`jax.checkpoint` (under `nnx.remat`) of a function that receives adapted kernels: they take
    their nodes along as an extra argument, registered again inside."""
    orig = _ORIG["checkpoint"]
    if not STATE.active or STATE.inside or ck_args or ck_kwargs.get("static_argnums"):
        return orig(fun, *ck_args, **ck_kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        riders = _riders(jax.tree_util.tree_leaves((args, kwargs)), scanned=False)
        if not riders:
            return orig(fun, **ck_kwargs)(*args, **kwargs)

        def inner(args, kwargs, payload):
            _register_riders(jax.tree_util.tree_leaves((args, kwargs)), riders, payload)
            return fun(*args, **kwargs)

        return orig(inner, **ck_kwargs)(args, kwargs, _payload(riders))

    return wrapped


def _riders(leaves, *, scanned: bool) -> dict[int, tuple[Kernel, dict]]:
    """The registered kernels among `leaves` (by position) whose node can go along into a scan
    body (sliced along axis 0, which must be the next batch axis of its view) or a checkpointed
    function, each with what it carries in: its node without the base, its dropout key (split per
    layer for a scan). While inferring views there is no node and nothing is carried."""
    if not STATE.active or STATE.inside:
        return {}
    out: dict[int, tuple[Kernel, dict]] = {}
    for i, leaf in enumerate(leaves):
        kernel = lookup_kernel(leaf)
        if kernel is None:
            continue
        if kernel.node is None:
            out[i] = (kernel, {"node": None, "key": None})
            continue
        key = kernel.rng
        if scanned:
            lead = len(kernel.full_shape) - np.ndim(leaf)
            view = kernel.node.view or PLAIN
            if np.ndim(leaf) == 0 or tuple(view.batch[:lead + 1]) != tuple(range(lead + 1)):
                continue
            key = None if key is None else jax.random.split(key, np.shape(leaf)[0])
        out[i] = (kernel, {"node": kernel.node.replace(base=None), "key": key})
    return out


def _payload(riders) -> dict:
    return {str(i): carried for i, (_, carried) in riders.items()}


def _register_riders(leaves, riders, payload: dict) -> None:
    """Inside the scan body / checkpointed function: register each rider's kernel as received."""
    for i, (kernel, _) in riders.items():
        node, key = payload[str(i)]["node"], payload[str(i)]["key"]
        register_kernel(leaves[i], kernel if node is None else
                  dataclasses.replace(kernel, node=node.replace(base=leaves[i]), rng=key))


_PATCHES = (
    (jax.lax, "dot_general", _dot_general),
    (jnp, "einsum", _einsum),
    (jnp, "dot", _dot),
    (jnp, "matmul", _matmul),
    (jnp, "take", _take),
    (jnp, "asarray", _asarray),
    (jax.lax, "conv_general_dilated", _conv_general_dilated),
    (jax.lax, "scan", _scan),
    (jax, "checkpoint", _checkpoint),
)


_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0   # threads inside `intercepting`; the interceptors are installed while > 0


def _install() -> None:
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            for mod, name, fn in _PATCHES:
                _ORIG[name] = getattr(mod, name)
                setattr(mod, name, fn)
            _ORIG["nnx_attend"] = nnx.Embed.attend
            nnx.Embed.attend = _nnx_attend  # type: ignore[method-assign]  # the interceptor, while any thread needs it
        _PATCH_USERS += 1


def _uninstall() -> None:
    global _PATCH_USERS
    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            for mod, name, _ in _PATCHES:
                setattr(mod, name, _ORIG[name])
            nnx.Embed.attend = _ORIG["nnx_attend"]  # type: ignore[method-assign]  # restore the original


@contextlib.contextmanager
def intercepting(kernels: dict[int, tuple[Any, Kernel]], *, infer: bool = False, probing: bool = False):
    """Intercept the ops for the duration of one model call in this thread. Thread-safe: the
    patched functions are shared by all threads (installed while any thread is inside) and pass
    straight to the originals in a thread that is not inside (`STATE` is per thread). Not
    re-entrant: a nested call is an error."""
    if STATE.active:
        raise RuntimeError("jpeft.factored calls cannot be nested")
    _install()
    STATE.kernels, STATE.consumed, STATE.views, STATE.declined = dict(kernels), set(), {}, set()
    STATE.active, STATE.infer, STATE.probing = True, infer, probing
    try:
        yield STATE
    finally:
        STATE.active, STATE.infer, STATE.inside, STATE.probing = False, False, False, False
        STATE.kernels = {}
        _uninstall()


def bind_nnx_ops(model):
    """NNX layers that hold the default op as an attribute (`LinearGeneral.dot_general`,
    `Einsum.einsum_op`) get the interceptor instead (a fresh module per call: nothing leaks)."""
    for _, module in nnx.iter_modules(model):
        for attr, name in (("dot_general", "dot_general"), ("einsum_op", "einsum"),
                           ("conv_general_dilated", "conv_general_dilated")):
            if getattr(module, attr, None) is _ORIG[name]:
                object.__setattr__(module, attr, dict((n, f) for _, n, f in _PATCHES)[name])


def compute_base(karray):
    """The base a factored op computes with: itself, or in the probe pass zeros of its shape, so
    that what still depends on the base afterwards is a use outside the factored ops."""
    return jnp.zeros(karray.shape, karray.dtype) if STATE.probing else karray
