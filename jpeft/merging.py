"""Family M: several LoRA adapters combined into one (`merge_adapters`, HF PEFT's
`add_weighted_adapter`) and the task-vector primitives it is built from (task arithmetic,
magnitude and random pruning, TIES sign election, DARE).

The primitives take a stack `tensors[N, ...]` (or a sequence of N equal-shaped arrays) of task
tensors and `weights[N]`; pruning and election act elementwise on the stack, one tensor at a
time where the operation is per tensor (top-k, Bernoulli masks). They are plain jnp, jit-able.

`merge_adapters` works on jpeft trees (kernel layout, `ΔK = s·a@b`, `a` the paper's `Aᵀ`).
Every elementwise operation and every per-tensor top-k is layout-free, so the factor-space types
give PEFT's factors transposed; the SVD types take the SVD of `ΔK = ΔWᵀ`, which puts the singular
values in `b` exactly as PEFT puts them in `B`. It runs eagerly (like PEFT's, it checks values:
that the trees share one base), each leaf's arithmetic jitted.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter, is_adapter
from jpeft.errors import SpecError
from jpeft.methods.lowrank import LoRA, PeriodicLoRA
from jpeft.paths import leaves_with_paths
from jpeft.spec import Spec

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
SIGN_METHODS = ("total", "frequency")
#: None: the intended result (the new adapter's scale is 1; each `ΔW_i` scaled once).
#: "peft": PEFT 0.21 as released: the new adapter inherits the first adapter's `use_rslora`, so
#: its scale is `√new_rank` instead of 1.  "peft@5d602fd": also the older snapshot's SVD types,
#: which scale each `ΔW_i` twice (`Σ w_i s_i² B_i A_i`).
COMPAT = (None, "peft", "peft@5d602fd")
MERGEABLE = (LoRA, PeriodicLoRA)


# ------------------------------------------------------------------ primitives (PEFT merge_utils)
def _stack(tensors) -> jax.Array:
    return jnp.stack(list(tensors)) if isinstance(tensors, (list, tuple)) else jnp.asarray(tensors)


def _weights(weights, stack: jax.Array) -> jax.Array:
    w = jnp.asarray(weights, stack.dtype)
    if w.shape != stack.shape[:1]:
        raise ValueError(f"weights: expected {stack.shape[0]} weights (one per task tensor), got shape {w.shape}")
    return w.reshape(w.shape + (1,) * (stack.ndim - 1))


def _check_density(density: float, *, random: bool = False) -> float:
    if density is None or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a float in [0, 1] (the kept fraction), got {density!r}")
    if random and density == 0.0:
        raise ValueError("density=0 drops every value and DARE's rescale would divide by 0; expected 0 < density <= 1")
    return float(density)


def task_arithmetic(tensors, weights) -> jax.Array:
    """`Σ_i w_i T_i`."""
    stack = _stack(tensors)
    return jnp.sum(stack * _weights(weights, stack), axis=0)


def magnitude_mask(tensor: jax.Array, density: float) -> jax.Array:
    """Keep the `floor(density·numel)` entries of largest `|T|` (one tensor, flattened)."""
    density = _check_density(density)
    if density >= 1.0:
        return jnp.ones(tensor.shape, bool)
    k = int(density * tensor.size)
    flat = jnp.abs(tensor).reshape(-1)
    keep = jnp.zeros(flat.shape, bool)
    if k:
        keep = keep.at[jax.lax.top_k(flat, k)[1]].set(True)
    return keep.reshape(tensor.shape)


def random_mask(key: jax.Array, shape, density: float) -> jax.Array:
    """`Bernoulli(density)` keep mask (DARE's drop is its complement)."""
    return jax.random.bernoulli(key, _check_density(density, random=True), tuple(shape))


def prune(tensor: jax.Array, density: float, method: str, *, rescale: bool = False,
          mask: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """PEFT's `prune`: `density >= 1` keeps `tensor` as is; `"magnitude"` keeps the top
    `floor(density·numel)` by magnitude; `"random"` keeps a Bernoulli(density) mask (given as
    `mask`, or drawn from `key`) and, with `rescale`, divides the kept values by `density`."""
    if method not in ("magnitude", "random"):
        raise ValueError(f"prune: method must be 'magnitude' or 'random', got {method!r}")
    density = _check_density(density, random=method == "random")
    if density >= 1.0:
        return tensor
    if method == "magnitude":
        return tensor * magnitude_mask(tensor, density)
    if (mask is None) == (key is None):
        raise ValueError("prune(method='random'): pass exactly one of mask= or key=")
    keep = jnp.asarray(mask) if key is None else random_mask(key, tensor.shape, density)
    if keep.shape != tensor.shape:
        raise ValueError(f"prune: mask of shape {keep.shape} for a tensor of shape {tensor.shape}")
    out = tensor * keep.astype(tensor.dtype)
    return out / density if rescale else out


def majority_sign_mask(stack: jax.Array, method: str = "total") -> jax.Array:
    """TIES election on `stack[N, ...]`: the elected sign is `+` where `Σ_i T_i >= 0` ("total") or
    `Σ_i sign(T_i) >= 0` ("frequency"), else `−`; `M_i = sign(T_i) == elected` (zeros never agree)."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    sign = jnp.sign(stack)
    votes = jnp.sum(stack if method == "total" else sign, axis=0)
    return sign == jnp.where(votes >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(stack: jax.Array, mask: jax.Array) -> jax.Array:
    """`Σ_i T_i M_i / max(Σ_i M_i, 1)`."""
    kept = jnp.sum(mask, axis=0).astype(stack.dtype)
    return jnp.sum(stack * mask.astype(stack.dtype), axis=0) / jnp.maximum(kept, 1.0)


def magnitude_prune(tensors, weights, density: float) -> jax.Array:
    """`Σ_i w_i · prune_magnitude(T_i, density)`."""
    stack = _stack(tensors)
    pruned = jnp.stack([prune(t, density, "magnitude") for t in stack])
    return task_arithmetic(pruned, weights)


def ties(tensors, weights, density: float, majority_sign_method: str = "total") -> jax.Array:
    """TIES: magnitude-prune each tensor, elect signs on the unweighted pruned stack, then the
    weighted sum of the agreeing entries divided by their count."""
    stack = _stack(tensors)
    pruned = jnp.stack([prune(t, density, "magnitude") for t in stack])
    return disjoint_merge(pruned * _weights(weights, pruned), majority_sign_mask(pruned, majority_sign_method))


def _dare_pruned(stack, density, masks, key):
    if (masks is None) == (key is None):
        raise ValueError("DARE: pass exactly one of key= (one split per tensor, in order) or masks= (one per tensor)")
    if masks is None:
        masks = [None] * stack.shape[0]
        keys = list(jax.random.split(key, stack.shape[0]))
    else:
        masks = list(masks)
        if len(masks) != stack.shape[0]:
            raise ValueError(f"DARE: {len(masks)} masks for {stack.shape[0]} task tensors")
        keys = [None] * stack.shape[0]
    return jnp.stack([prune(t, density, "random", rescale=True, mask=m, key=k) for t, m, k in zip(stack, masks, keys)])


def dare_linear(tensors, weights, density: float, *, key: jax.Array | None = None, masks=None) -> jax.Array:
    """DARE: `Σ_i w_i · (T_i ⊙ mask_i) / density`, `mask_i ~ Bernoulli(density)`."""
    stack = _stack(tensors)
    return task_arithmetic(_dare_pruned(stack, density, masks, key), weights)


def dare_ties(tensors, weights, density: float, majority_sign_method: str = "total", *,
              key: jax.Array | None = None, masks=None) -> jax.Array:
    """DARE's random prune and rescale, then TIES' election and disjoint merge."""
    stack = _stack(tensors)
    pruned = _dare_pruned(stack, density, masks, key)
    return disjoint_merge(pruned * _weights(weights, pruned), majority_sign_mask(pruned, majority_sign_method))


def _combine(op: str, stack, weights, density, sign_method, key, masks):
    """One task-vector combination by its PEFT name (the part of a type before `_svd`)."""
    if op in ("linear", "svd"):
        return task_arithmetic(stack, weights)
    if op == "magnitude_prune":
        return magnitude_prune(stack, weights, density)
    if op == "ties":
        return ties(stack, weights, density, sign_method)
    if op == "dare_linear":
        return dare_linear(stack, weights, density, key=key, masks=masks)
    return dare_ties(stack, weights, density, sign_method, key=key, masks=masks)


# ------------------------------------------------------------------ merge_adapters
class Merged(NamedTuple):
    """What `merge_adapters` returns: the tree with one LoRA node per adapted leaf, and its Spec."""

    params: Any
    spec: Spec


def merge_adapters(trees: Sequence[Any], spec: Spec | Sequence[Spec], weights: Sequence[float],
                   combination_type: str = "svd", *, svd_rank: int | None = None, svd_clamp: float | None = None,
                   density: float | None = None, majority_sign_method: str | None = None,
                   key: jax.Array | None = None, masks: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
                   compat: str | None = None) -> Merged:
    """One new LoRA adapter from the LoRA adapters of `trees` (one jpeft tree per adapter, all on
    the same frozen base), as HF PEFT's `add_weighted_adapter`. Returns `Merged(params, spec)`:
    the base with a `LoRA(rank=new_rank, alpha=new_rank)` node (scale 1) on every leaf any tree
    adapts. `c_i = w_i·s_i` below (`s_i` the adapter's `α/r` or rsLoRA scale).

    - `"cat"`: `a = [c_1 a_1, …, c_N a_N]`, `b = [b_1; …; b_N]`, exact (`ΔK = Σ_i c_i a_i b_i`); rank `Σ r_i`.
    - factor-space types (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the
      combination applied to the `a` stack with weights `sign(c_i)·√|c_i|` and, independently, to
      the `b` stack with `√|c_i|` (so `linear` has PEFT's cross terms `a_i b_j`); every rank equal.
    - SVD types (`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`): the
      combination of `ΔK_i = s_i a_i b_i` with weights `w_i`, then its rank-`new_rank` truncated
      SVD `U S Vᵀ`: `a = U`, `b = S Vᵀ`; `svd_clamp=q` clamps both to the q-quantile of their
      values; `new_rank = svd_rank` or the largest rank.

    A tree's rank is its largest LoRA rank (PEFT's `max(r, *rank_pattern)`); a leaf adapted with a
    smaller rank is zero-padded. A leaf one tree does not adapt takes the others only. One tree:
    the type is `linear` (as PEFT), and options only other types use are refused.

    `spec`: the Spec each tree was built with (one for all, or one per tree); its views and
    `adapter_dtype` carry over. `density` (kept fraction, required by the pruning types),
    `majority_sign_method` ("total" by default; TIES types only). DARE draws its masks from `key`
    (per leaf, per factor, one split per adapter, in order) or takes `masks={path: {"a": [...],
    "b": [...]}}` (factor types, kernel layout) / `{path: {"delta": [...]}}` (SVD types), one mask
    per adapter present at the leaf. `compat`: see `COMPAT`.

    A new rank above a leaf's `min(in, out)` (`cat` of many adapters, a large `svd_rank`) is exact
    and zero-padded there.

    Refused: methods other than LoRA (PEFT combines DoRA's magnitude and trained biases wrongly),
    trees that differ anywhere outside their LoRA factors (bases, other leaves), weights that do
    not match the trees, options the type does not use.
    """
    trees = list(trees)
    n = len(trees)
    if n == 0:
        raise ValueError("merge_adapters: expected at least one adapter tree")
    specs = [spec] * n if isinstance(spec, Spec) else list(spec)
    if len(specs) != n or not all(isinstance(s, Spec) for s in specs):
        raise ValueError(f"merge_adapters: spec must be one Spec or one per tree ({n}), got {spec!r}")
    weights = _check_weights(weights, n)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"merge_adapters: combination_type must be one of {COMBINATION_TYPES}, "
                         f"got {combination_type!r}")
    if compat not in COMPAT:
        raise ValueError(f"merge_adapters: compat must be one of {COMPAT}, got {compat!r}")
    if n == 1:
        combination_type = "linear"   # as PEFT: one adapter is only ever scaled
    op = combination_type.removesuffix("_svd")
    _check_options(combination_type, op, n, svd_rank=svd_rank, svd_clamp=svd_clamp, density=density,
                   majority_sign_method=majority_sign_method, key=key, masks=masks)
    sign_method = majority_sign_method or "total"

    adapted = [_lora_nodes(tree, s, i) for i, (tree, s) in enumerate(zip(trees, specs))]
    paths = _check_same_base(trees)
    targeted = [p for p in paths if any(p in nodes for nodes in adapted)]
    ranks = [max((node.method.rank for node in nodes.values()), default=0) for nodes in adapted]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        if len(set(ranks)) != 1:
            raise ValueError(f"merge_adapters: combination_type={combination_type!r} needs every adapter at one "
                             f"rank, got ranks {ranks}; use 'cat' or an SVD type")
        new_rank = ranks[0]
    if masks is not None:
        unknown = sorted(set(masks) - set(targeted))
        if unknown:
            raise ValueError(f"merge_adapters: masks given for paths no tree adapts: {unknown}")
    rslora = _inherited_rslora(adapted[0]) if compat is not None else False
    new_method = LoRA(rank=new_rank, alpha=float(new_rank), rslora=rslora)
    leaf_keys = dict(zip(targeted, jax.random.split(key, len(targeted)))) if key is not None else {}

    new_nodes = {}
    for path in targeted:
        present = [(w, nodes[path]) for w, nodes in zip(weights, adapted) if path in nodes]
        base = present[0][1].base
        leaf_masks = (masks or {}).get(path)
        if combination_type == "cat":
            a, b = _cat(present, new_rank)
        elif combination_type in SVD_TYPES:
            a, b = _svd_merge(path, op, present, new_rank, svd_clamp, density, sign_method, leaf_keys.get(path),
                              leaf_masks, double_scale=compat == "peft@5d602fd")
        else:
            a, b = _factor_merge(path, op, present, new_rank, density, sign_method, leaf_keys.get(path), leaf_masks)
        dtype = _factors(present[0][1])[0].dtype
        new_nodes[path] = Adapter(base=base, train={"a": a.astype(dtype), "b": b.astype(dtype)}, frozen={},
                                  state={}, method=new_method, view=present[0][1].view)

    def replace(path, leaf):
        return new_nodes.get(path, leaf.base if is_adapter(leaf) else leaf)

    flat, treedef = jax.tree_util.tree_flatten_with_path(trees[0], is_leaf=is_adapter)
    params = jax.tree_util.tree_unflatten(treedef, [replace(p, leaf) for p, (_, leaf) in zip(paths, flat)])
    rule = "|".join(re.escape(p) for p in targeted)
    return Merged(params, Spec({rule: new_method}, views=specs[0].views, adapter_dtype=specs[0].adapter_dtype))


def _check_weights(weights, n: int) -> list[float]:
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise ValueError(f"merge_adapters: weights must be {n} numbers, got {weights!r}") from e
    if len(values) != n:
        raise ValueError(f"merge_adapters: {len(values)} weights for {n} adapter trees; expected one weight per tree")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"merge_adapters: weights must be finite, got {values}")
    return values


def _check_options(combination_type, op, n, *, svd_rank, svd_clamp, density, majority_sign_method, key, masks):
    pruning = op not in ("linear", "svd", "cat")
    unused = [name for name, value, used in (
        ("svd_rank", svd_rank, combination_type in SVD_TYPES),
        ("svd_clamp", svd_clamp, combination_type in SVD_TYPES),
        ("density", density, pruning),
        ("majority_sign_method", majority_sign_method, op in ("ties", "dare_ties")),
        ("key", key, op.startswith("dare")),
        ("masks", masks, op.startswith("dare")),
    ) if value is not None and not used]
    if unused:
        why = " (one adapter tree: the combination is 'linear', as PEFT's)" if n == 1 else ""
        raise ValueError(f"merge_adapters: combination_type={combination_type!r}{why} does not use {unused}")
    if pruning:
        _check_density(density, random=op.startswith("dare"))
    if op.startswith("dare") and (key is None) == (masks is None):
        raise ValueError(f"merge_adapters: {combination_type!r} drops at random: pass exactly one of key= or masks=")
    if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"merge_adapters: majority_sign_method must be one of {SIGN_METHODS}, "
                         f"got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ValueError(f"merge_adapters: svd_rank must be a positive int, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0.0 <= svd_clamp <= 1.0):
        raise ValueError(f"merge_adapters: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")


def _lora_nodes(tree: Any, spec: Spec, index: int) -> dict[str, Adapter]:
    nodes = {}
    for path, leaf in leaves_with_paths(tree, is_leaf=is_adapter):
        if not is_adapter(leaf):
            continue
        method = leaf.method
        if type(method) not in MERGEABLE:
            raise ValueError(f"merge_adapters: tree {index}: {path} holds a {method.name!r} adapter; only LoRA "
                             f"adapters combine into a LoRA adapter (PEFT's add_weighted_adapter combines the "
                             f"factors only, which is wrong for DoRA's magnitude and for other methods)")
        assigned = spec.matching_rules(path)
        expected = spec.rules[assigned[0]][1] if assigned else None
        if expected != method:
            raise SpecError(f"merge_adapters: tree {index}: {path} holds {method!r}, but its spec assigns "
                            f"{expected!r}; pass the Spec the tree was built with")
        nodes[path] = leaf
    if not nodes:
        raise ValueError(f"merge_adapters: tree {index} holds no LoRA adapter")
    return nodes


def _factors(node: Adapter) -> tuple[jax.Array, jax.Array]:
    """`(a, b)` of a LoRA node (`a` is frozen under `freeze_a`)."""
    return (node.frozen if node.method.freeze_a else node.train)["a"], node.train["b"]


def _check_same_base(trees: list[Any]) -> list[str]:
    """The flattened paths of `trees[0]`; every tree must have its structure and, outside the
    trainable LoRA factors, its values (a PiSSA residual or a trained bias would be lost)."""
    def frozen_part(tree):
        return [(p, leaf.base if is_adapter(leaf) else leaf) for p, leaf in leaves_with_paths(tree, is_leaf=is_adapter)]

    first = frozen_part(trees[0])
    for i, tree in enumerate(trees[1:], 1):
        other = frozen_part(tree)
        if [p for p, _ in other] != [p for p, _ in first]:
            missing = sorted(set(p for p, _ in first) ^ set(p for p, _ in other))[:5]
            raise ValueError(f"merge_adapters: tree {i} has other leaves than tree 0 (e.g. {missing})")
        for (path, x), (_, y) in zip(first, other):
            xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
            if any(isinstance(v, jax.core.Tracer) for v in xs + ys):
                raise ValueError("merge_adapters runs eagerly (it compares the trees' bases): call it outside jit")
            if len(xs) != len(ys) or not all(np.shape(u) == np.shape(v) and bool(jnp.array_equal(u, v))
                                             for u, v in zip(xs, ys)):
                raise ValueError(f"merge_adapters: {path} differs between tree 0 and tree {i}: the adapters must "
                                 f"share one frozen base (a PiSSA/OLoRA residual, a LoftQ base or a trained leaf "
                                 f"outside the LoRA factors cannot be combined)")
    return [p for p, _ in first]


def _inherited_rslora(nodes: dict[str, Adapter]) -> bool:
    flags = {node.method.rslora for node in nodes.values()}
    if len(flags) > 1:
        raise ValueError("merge_adapters(compat=...): the first tree mixes rsLoRA and plain LoRA rules, so there is "
                         "no single use_rslora for the new adapter to inherit as PEFT does")
    return flags.pop()


def _pad_rank(a, b, rank):
    r = a.shape[-1]
    pad_a = [(0, 0)] * (a.ndim - 1) + [(0, rank - r)]
    pad_b = [(0, 0)] * (b.ndim - 2) + [(0, rank - r), (0, 0)]
    return jnp.pad(a, pad_a), jnp.pad(b, pad_b)


def _cat(present, rank):
    scaled = [(w * node.method.scale * _factors(node)[0], _factors(node)[1]) for w, node in present]
    a = jnp.concatenate([x for x, _ in scaled], axis=-1)
    b = jnp.concatenate([y for _, y in scaled], axis=-2)
    return _pad_rank(a, b, rank)


def _leaf_masks(path, leaf_masks, name, count, shape):
    if leaf_masks is None:
        return None
    if name not in leaf_masks:
        raise ValueError(f"merge_adapters: masks[{path!r}] needs a {name!r} entry")
    given = [jnp.asarray(m) for m in leaf_masks[name]]
    if len(given) != count or any(m.shape != shape for m in given):
        raise ValueError(f"merge_adapters: masks[{path!r}][{name!r}]: expected {count} masks of shape {shape} "
                         f"(one per adapter present at the leaf), got shapes {[m.shape for m in given]}")
    return jnp.stack(given)


def _per_slice(op, stack, weights, density, sign_method, key, masks):
    """`_combine` on `stack[N, *batch, x, y]`, one matrix at a time along the batch axes (a
    scanned stack's layers are separate tensors for the top-k and the masks, as PEFT's modules)."""
    n, *batch, x, y = stack.shape
    flat = stack.reshape(n, -1, x, y)
    count = flat.shape[1]
    keys = jax.random.split(key, count) if key is not None else [None] * count
    mask_flat = masks.reshape(n, count, x, y) if masks is not None else None
    out = []
    for j in range(count):
        slice_key = keys[j] if key is not None else None
        slice_masks = list(mask_flat[:, j]) if mask_flat is not None else None
        out.append(_combine(op, flat[:, j], weights, density, sign_method, slice_key, slice_masks))
    return jnp.stack(out).reshape(*batch, x, y)


def _factor_merge(path, op, present, rank, density, sign_method, key, leaf_masks):
    c = [w * node.method.scale for w, node in present]
    wa = jnp.asarray([math.copysign(math.sqrt(abs(ci)), ci if ci != 0 else 1.0) for ci in c], jnp.float32)
    wb = jnp.asarray([math.sqrt(abs(ci)) for ci in c], jnp.float32)
    padded = [_pad_rank(*_factors(node), rank) for _, node in present]
    a_stack = jnp.stack([jnp.asarray(a, jnp.float32) for a, _ in padded])
    b_stack = jnp.stack([jnp.asarray(b, jnp.float32) for _, b in padded])
    ka, kb = jax.random.split(key) if key is not None else (None, None)
    ma = _leaf_masks(path, leaf_masks, "a", len(present), a_stack.shape[1:])
    mb = _leaf_masks(path, leaf_masks, "b", len(present), b_stack.shape[1:])
    return (_per_slice(op, a_stack, wa, density, sign_method, ka, ma),
            _per_slice(op, b_stack, wb, density, sign_method, kb, mb))


@functools.partial(jax.jit, static_argnames=("rank", "clamp"))
def _truncated_svd(delta, rank, clamp):
    """`ΔK ≈ a@b` with `a = U[:, :k]`, `b = S[:k] Vᵀ[:k]` (batched over leading axes)."""
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    a, b = u[..., :rank], s[..., :rank, None] * vh[..., :rank, :]
    if clamp is not None:
        def clip(a, b):
            hi = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), clamp)
            return jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
        lead = a.shape[:-2]
        fa, fb = jax.vmap(clip)(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
        a, b = fa.reshape(*lead, *a.shape[-2:]), fb.reshape(*lead, *b.shape[-2:])
    return a, b


def _svd_merge(path, op, present, rank, clamp, density, sign_method, key, leaf_masks, *, double_scale):
    deltas = []
    for _, node in present:
        a, b = _factors(node)
        deltas.append(node.method.scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)))
    stack = jnp.stack(deltas)
    w = jnp.asarray([wi * (node.method.scale if double_scale else 1.0) for wi, node in present], jnp.float32)
    masks = _leaf_masks(path, leaf_masks, "delta", len(present), stack.shape[1:])
    delta = _per_slice(op, stack, w, density, sign_method, key, masks)
    kept = min(rank, *delta.shape[-2:])   # a rank above min(in, out) keeps every singular value, zero-padded
    return _pad_rank(*_truncated_svd(delta, kept, None if clamp is None else float(clamp)), rank)
