"""The engine: `init`, `apply`, `merge`, `split`, `combine`, `count`, `labels`
(docs/design.md sections 1–2).

All are pure functions of pytrees and jit-able (pass the `Spec` as a static argument).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter, is_adapter, map_adapters
from jpeft.errors import AdapterError, SpecError
from jpeft.paths import leaf_key, leaves_with_paths, path_str
from jpeft.quant import dequantize_array, is_leaf_node, is_quantized, logical_size, quantize_array
from jpeft.shared import SHARED, attach_shared
from jpeft.spec import Spec
from jpeft.views import check_leaf, create_node, materialise_node, matrix_slices, missing_view_error


def init(key: jax.Array, params: Any, spec: Spec, *, calib: Any = None) -> Any:
    """Replace every leaf the spec targets by an `Adapter` node; other leaves are unchanged.

    `calib` is a tree shaped like `params` (e.g. gradients of a loss w.r.t. the base weights) for
    data-driven inits such as LoRA-GA; leaves that need none may be `None`.
    """
    pairs = leaves_with_paths(params, is_leaf=is_leaf_node)
    if any(isinstance(leaf, Adapter) for _, leaf in pairs):
        raise SpecError("params already contain adapter nodes; call jpeft.init on the base tree "
                        "(jpeft.merge gives a plain tree back)")
    assignment = spec.resolve([p for p, _ in pairs])
    views = leaf_views(pairs, assignment, spec)
    calib_map = dict(leaves_with_paths(calib)) if calib is not None else {}
    new_leaves, seen = [], []   # `seen`: each leaf as `create` saw it (quantised ones dequantised)
    for path, leaf in pairs:
        method = assignment.get(path)
        if method is None:
            new_leaves.append(leaf)
            seen.append((path, leaf))
            continue
        w = _base_for(method, path, leaf)
        seen.append((path, w))
        check_leaf(method, path, w, views.get(path))
        node = create_node(method, path, leaf_key(key, path), w, _calib_for(method, path, w, calib_map),
                           views.get(path))
        if is_quantized(leaf):  # the base stays quantised
            node = node.replace(base=leaf)
        new_leaves.append(_cast_adapter(node, spec.adapter_dtype))
    _add_shared(key, seen, assignment, new_leaves)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_leaf_node), new_leaves)


def _base_for(method, path: str, leaf):
    """The array `method.create` sees: the leaf, or a quantised leaf dequantised (for the methods
    that accept a quantised base and keep it)."""
    if not is_quantized(leaf):
        return leaf
    if not method.quantized_base:
        raise SpecError(f"{path}: quantised ({leaf.config.kind}) and targeted by {method.name}, which does not "
                        "take a quantised base (those that do: see docs/quant.md); dequantise this leaf or "
                        "choose another method")
    if method.base_quant is not None:
        raise SpecError(f"{path}: {method!r} chooses and quantises the base itself; pass this leaf in full "
                        "precision (not quantised) to jpeft.init")
    if method.rewrites_base:
        raise SpecError(f"{path}: {method!r} rewrites the base at init; on a quantised leaf that would quantise "
                        "the residual of an already quantised weight. Init on the full-precision tree, then "
                        "jpeft.quantize the result (its adapter bases are quantised: QPiSSA)")
    return dequantize_array(leaf)


def leaf_views(pairs, assignment, spec: Spec) -> dict:
    """`{path: View}` for the targeted leaves that are seen through a view (None: plain 2-D).
    A matrix method on a leaf that is not 2-D and has no view is an error naming the path."""
    declared = spec.resolve_views([p for p, _ in pairs])
    out = {}
    for path, leaf in pairs:
        method = assignment.get(path)
        if method is None:
            continue
        view = declared.get(path)
        if not method.adapts_matrix:
            if view is not None:
                raise SpecError(f"{path}: {method.name} trains the whole leaf; the view {view!r} does not apply "
                                f"(narrow the view rule)")
            continue
        if view is None and np.ndim(leaf) != 2:
            raise missing_view_error(path, leaf)
        if view is not None:
            view.check(path, np.shape(leaf), getattr(leaf, "dtype", None))
            if not view.is_plain:
                out[path] = view
    return out


def _add_shared(key, pairs, assignment, new_leaves):
    """Create each method config's shared state once and store it in its first node. A viewed
    leaf is shown to `create_shared` as one slice of its matrix view; per-leaf extras are
    broadcast over its batch axes."""
    for method in dict.fromkeys(assignment.values()):
        members = [i for i, (path, _) in enumerate(pairs) if assignment.get(path) == method]
        shown = [(pairs[i][0], _first_slice(new_leaves[i], pairs[i][1])) for i in members]
        shared = method.create_shared(leaf_key(key, f"shared:{method!r}"), shown)
        if shared is None:
            continue
        train, frozen, *per_leaf = shared
        # Optional third element: one dict per member, merged into that node's `frozen` (per-leaf
        # indices into the shared state, e.g. MSPLoRA's module/group slots).
        for i, extra in zip(members, per_leaf[0] if per_leaf else ()):
            if extra:
                node = new_leaves[i]
                if node.view is not None:
                    lead = node.view.batch_shape(node.base.shape)
                    extra = jax.tree.map(lambda x, lead=lead: jnp.broadcast_to(x, (*lead, *jnp.shape(x))), extra)
                new_leaves[i] = node.replace(frozen={**node.frozen, **extra})
        owner = new_leaves[members[0]]
        new_leaves[members[0]] = owner.replace(train={**owner.train, **({SHARED: train} if train else {})},
                                               frozen={**owner.frozen, **({SHARED: frozen} if frozen else {})})


def _cast_adapter(node: Adapter, dtype: str | None) -> Adapter:
    """The node's floating-point arrays other than its base in `dtype` (the Spec's adapter_dtype)."""
    if dtype is None:
        return node
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return node.replace(train=jax.tree.map(cast, node.train), frozen=jax.tree.map(cast, node.frozen),
                        state=jax.tree.map(cast, node.state))


def _first_slice(node, leaf):
    if not isinstance(node, Adapter) or node.view is None:
        return leaf
    m = node.view.to_matrix(leaf)
    return m.reshape(-1, *m.shape[-2:])[0]


def _calib_for(method, path, leaf, calib_map):
    if not method.needs_calib:
        return None
    g = calib_map.get(path)
    if g is None:
        raise AdapterError(f"{path}: {method!r} needs a calibration "
                           f"gradient; pass jpeft.init(..., calib=grads) with a tree shaped like params")
    if g.shape != leaf.shape:
        raise AdapterError(f"{path}: calibration gradient has shape {tuple(g.shape)}, expected the leaf's "
                           f"shape {tuple(leaf.shape)}")
    return g


def check_fits(params: Any, spec: Spec) -> None:
    """Raise `SpecError` unless the adapter nodes of `params` are exactly what `spec` targets,
    each whole (not one half of a `split`) and with the arrays its method creates on its base:
    every entry present, of the shape (`compact` may shrink components; inside `shard_map` a
    per-device axis shows this device's share) and dtype kind (float / integer) that `init`
    gives. The error names the first mismatching path and entry."""
    pairs = leaves_with_paths(params, is_leaf=is_leaf_node)
    assignment = spec.resolve([p for p, _ in pairs])
    declared = spec.resolve_views([p for p, _ in pairs])
    for path, leaf in pairs:
        method = assignment.get(path)
        if isinstance(leaf, Adapter):
            if method is None:
                raise SpecError(f"{path} holds a {leaf.method.name} adapter but the spec targets no such leaf")
            if method != leaf.method:
                raise SpecError(f"{path} holds {leaf.method!r} but the spec says {method!r}")
            view = declared.get(path)
            if (None if view is None or view.is_plain else view) != leaf.view:
                raise SpecError(f"{path} was adapted through the view {leaf.view!r} but the spec says {view!r}")
            check_node_arrays(path, leaf, spec.adapter_dtype)
        elif method is not None:
            raise SpecError(f"{path} (shape {tuple(np.shape(leaf))}) is targeted by the spec ({method.name}) but is "
                            f"not an adapter node; build the tree with jpeft.init first")


def _is_hole(x) -> bool:
    return x is None


def check_node_arrays(path: str, node: Adapter, adapter_dtype=None) -> None:
    """`node` is whole and its arrays are those its method creates on its base (see `check_fits`)."""
    holes = [f"{part}[{k!r}]" for part in ("train", "frozen", "state")
             for k, v in getattr(node, part).items() if any(_is_hole(x) for x in jax.tree.leaves(v, is_leaf=_is_hole))]
    no_base = node.base is None and node.method.has_base
    if no_base or holes:
        half = "trainable" if no_base else "frozen"
        raise SpecError(f"{path}: the node holds only the {half} half of jpeft.split (missing "
                        f"{'the base' if no_base else ', '.join(holes)}); use jpeft.combine(trainable, frozen)")
    if node.base is None:
        return
    expected = _expected_arrays(node.method, tuple(node.base.shape), jnp.dtype(node.base.dtype), node.view,
                                None if adapter_dtype is None else jnp.dtype(adapter_dtype))
    if expected is None:
        return
    may_shrink = node.method.compacts
    per_device = node.method.per_device_leading
    # A hook may move an entry between the parts (LaMDA freezes `b`): look each up in all three.
    have = {**node.state, **node.frozen, **node.train}
    for part, entries in expected.items():
        for key, (shape, kind) in entries.items():
            if key not in have:
                if part != "train":
                    continue   # buffers / state a hook or `compact` may drop (LaMDA's snapshots)
                raise SpecError(f"{path}: {node.method.name} node has no {part}[{key!r}] (expected shape {shape})")
            got = jax.tree.leaves(have[key])
            if len(got) != 1:
                continue   # a nested entry: its own method checks it
            g_shape, g_kind = tuple(np.shape(got[0])), _kind(got[0].dtype)
            fits = g_shape == shape or (may_shrink and len(g_shape) == len(shape)
                                        and all(a <= b for a, b in zip(g_shape, shape))) \
                or (per_device and len(g_shape) == len(shape) and g_shape[1:] == shape[1:] and g_shape[0] >= 1
                    and shape[0] % g_shape[0] == 0)
            if not fits or g_kind != kind:
                raise SpecError(f"{path}: {part}[{key!r}] has shape {g_shape} and dtype {got[0].dtype}; "
                                f"{node.method!r} on a base of shape {tuple(node.base.shape)} expects shape {shape} "
                                f"({kind}) — is it from another model or another config?")


def _kind(dtype) -> str:
    return "float" if jnp.issubdtype(dtype, jnp.floating) else "integer" if jnp.issubdtype(dtype, jnp.integer) \
        else str(jnp.dtype(dtype))


@functools.lru_cache(maxsize=4096)
def _expected_arrays(method, shape, dtype, view, adapter_dtype):
    """`{part: {key: (shape, kind)}}` of the arrays `init` creates for `method` on a base of this
    shape and dtype (abstractly), without the shared state; None if `create` cannot be traced
    abstractly (then only the structure checks apply)."""
    w = jax.ShapeDtypeStruct(shape, dtype)
    calib = w if method.needs_calib else None

    def make(key, w, calib):
        return _cast_adapter(create_node(method, "", key, w, calib, view), adapter_dtype)

    try:
        node = jax.eval_shape(make, jax.random.PRNGKey(0), w, calib)
    except Exception:  # noqa: BLE001 - data-dependent inits; the structure checks still apply
        return None
    return {part: {k: (tuple(v.shape), _kind(v.dtype)) for k, v in getattr(node, part).items()
                   if k != SHARED and hasattr(v, "shape")}
            for part in ("train", "frozen", "state")}


def _materialise_with_paths(params, spec, materialise, keep_quantized: bool = False):
    """Each adapter node through `materialise(path, node)`; other quantised leaves dequantised
    unless `keep_quantized`."""
    check_fits(params, spec)
    pairs = leaves_with_paths(params, is_leaf=is_leaf_node)
    lent = attach_shared([leaf for _, leaf in pairs])
    leaves = [materialise(path, leaf) if isinstance(leaf, Adapter) else
              dequantize_array(leaf) if is_quantized(leaf) and not keep_quantized else leaf
              for (path, _), leaf in zip(pairs, lent)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_leaf_node), leaves)


_remat_materialise = jax.checkpoint(materialise_node)


def materialise_leaf(path: str, node: Adapter, rng: jax.Array | None = None) -> jax.Array:
    """The effective kernel of the node at `path`, under `jax.checkpoint` (the method's m×n
    temporaries are recomputed in the backward pass), with the leaf's own dropout key drawn from
    `rng`. `apply` and the fallbacks of `jpeft.factored` both materialise through it."""
    return _remat_materialise(node, None if rng is None else leaf_key(rng, path))


def apply(params: Any, spec: Spec, *, rng: jax.Array | None = None, check_finite: bool = False) -> Any:
    """Effective plain parameters for the model (the materialised path, docs/design.md section 2).

    Each adapter becomes its effective weight `K' = f(K, θ)` under `jax.checkpoint`, so the
    method's own m×n temporaries (e.g. `s·a@b`, DoRA's direction) are recomputed in the backward
    pass instead of being saved. `K'` itself is an input of the model's matmul, which saves it; the
    factored path (`jpeft.factored`) avoids even that. `rng` enables adapter dropout.

    `check_finite=True` adds a `jax.experimental.checkify` check per adapter array and per
    effective weight that names the path of the first non-finite one: eager calls raise at once;
    under `jit`, wrap the step in `checkify.checkify(step)` and call `err.throw()`.
    """
    def mat(path, node):
        if check_finite:
            check_finite_tree(node.replace(base=None), f"{path} (adapter)")
        out = materialise_leaf(path, node, rng)
        if check_finite:
            check_finite_tree(out, f"{path} (effective weight)")
        return out

    return _materialise_with_paths(params, spec, mat)


def check_finite_tree(tree: Any, where: str) -> None:
    """`checkify.check` that every floating-point array in `tree` is finite, naming `where` and
    the array's path inside it."""
    from jax.experimental import checkify

    for path, x in leaves_with_paths(tree):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
            name = f"{where}/{path}" if path else where
            checkify.check(jnp.all(jnp.isfinite(x)),
                           "jpeft: non-finite values in " + name.replace("{", "{{").replace("}", "}}"))


def merge(params: Any, spec: Spec, *, requantize: bool = False) -> Any:
    """An ordinary parameter tree with every adapter folded in (export / inference).

    Quantised leaves come back dequantised; with `requantize=True` they stay quantised instead:
    an adapted leaf whose base was quantised is re-quantised from its merged weight with its
    base's own config, a method that trained on a grid (L4Q, LR-QAT) gives its codes and learned
    scales (`Method.merged_quantized`), and an untargeted quantised leaf is kept as it is."""
    if not isinstance(requantize, bool):
        raise SpecError(f"jpeft.merge: requantize must be True or False, got {requantize!r} (to quantise other "
                        "leaves, jpeft.quantize the merged tree)")
    if not requantize:
        return _materialise_with_paths(params, spec, lambda path, node: materialise_node(node, None))

    def merged(path, node):
        if node.method.quantized_merge:
            if node.view is not None:
                raise SpecError(f"{path}: {node.method.name} under the view {node.view}: requantize=True exports a "
                                "plain 2-D leaf only; merge without it, or adapt the leaf without a view")
            return node.method.merged_quantized(node)
        out = materialise_node(node, None)
        return quantize_array(out, node.base.config, path) if is_quantized(node.base) else out
    return _materialise_with_paths(params, spec, merged, keep_quantized=True)


def _holes(d: dict) -> dict:
    return jax.tree.map(lambda _: None, d)


def split(params: Any) -> tuple[Any, Any]:
    """`(trainable, frozen)`: two trees shaped like `params` with `None` in each other's holes."""
    def trainable_part(x):
        if not isinstance(x, Adapter):
            return None
        return x.replace(base=None, frozen=_holes(x.frozen), state=_holes(x.state))

    trainable = jax.tree.map(trainable_part, params, is_leaf=is_leaf_node)  # a quantised leaf is frozen
    frozen = map_adapters(lambda n: n.replace(train=_holes(n.train)), params)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`. Halves of different trees are a `SpecError` naming the first path
    where they differ."""
    try:
        return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_hole)
    except (ValueError, TypeError) as e:
        raise SpecError(f"jpeft.combine: the trainable and frozen halves are not halves of one tree: "
                        f"{_first_difference(trainable, frozen)}") from e


def _first_difference(a: Any, b: Any) -> str:
    stop = lambda x: x is None or isinstance(x, Adapter)  # noqa: E731
    fa = jax.tree_util.tree_flatten_with_path(a, is_leaf=stop)[0]
    fb = jax.tree_util.tree_flatten_with_path(b, is_leaf=stop)[0]
    pa, pb = [path_str(kp) for kp, _ in fa], [path_str(kp) for kp, _ in fb]
    for (p, x), (q, y) in zip(zip(pa, (v for _, v in fa)), zip(pb, (v for _, v in fb))):
        if p != q:
            return f"one has {p!r} where the other has {q!r}"
        if isinstance(x, Adapter) and isinstance(y, Adapter):
            if x.method != y.method:
                return f"{p}: {x.method!r} vs {y.method!r}"
            if x.view != y.view:
                return f"{p}: view {x.view!r} vs {y.view!r}"
            for part in ("train", "frozen", "state"):
                if sorted(getattr(x, part)) != sorted(getattr(y, part)):
                    return f"{p}: {part} entries {sorted(getattr(x, part))} vs {sorted(getattr(y, part))}"
        elif isinstance(x, Adapter) != isinstance(y, Adapter) and x is not None and y is not None:
            return f"{p}: an adapter node in one, a plain leaf in the other"
    if len(pa) != len(pb):
        extra = (pa if len(pa) > len(pb) else pb)[min(len(pa), len(pb))]
        return f"{extra!r} is in one half only ({len(pa)} vs {len(pb)} leaves)"
    return "their tree structures differ"


def labels(params: Any) -> Any:
    """A tree shaped like `params` with `"train"` / `"freeze"` leaves, for `optax.multi_transform`."""
    trainable, frozen = split(params)
    return jax.tree.map(lambda t, f: "freeze" if t is None else "train", trainable, frozen, is_leaf=_is_hole)


class ParamCount(NamedTuple):
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} / total {self.total:,} "
                f"({100.0 * self.trainable / max(self.total, 1):.3f}%)")


def count(params: Any) -> ParamCount:
    """Numbers of trainable and frozen scalars (works on abstract `jax.eval_shape` trees too); a
    quantised leaf counts the parameters it stands for (`jpeft.quant.stored_bytes`: its bytes)."""
    trainable, frozen = split(params)
    return ParamCount(logical_size(trainable), logical_size(frozen))


def penalty(params: Any) -> jax.Array:
    """The loss regularisers of every method config in `params` (a combined tree or the trainable
    half of `jpeft.split`), summed: each config's `Method.penalty` over its nodes, a viewed node
    as its matrix slices. Add it to the training loss; 0 when no config has one (AdaLoRA's
    orthogonality term, KaSA's and SALT's regularisers, SoRA's gate L1 and LT-SFT's L1 pull with
    their weights set)."""
    groups: dict[Any, list[Adapter]] = {}
    for node in jax.tree.leaves(params, is_leaf=is_adapter):
        if isinstance(node, Adapter):
            groups.setdefault(node.method, []).extend(matrix_slices(node))
    terms = [t for t in (method.penalty(nodes) for method, nodes in groups.items()) if t is not None]
    return sum(terms[1:], terms[0]) if terms else jnp.zeros((), jnp.float32)
