"""Step hooks: pure, jit-able rewrites of adapters and optimizer state after an optimizer step
(family J, schedules and step hooks). Optimizer-state surgery is always explicit: a hook returns the
new moments of its nodes, and a `restarted` flag when optax's step counts must be reset too.

A method's `step_hook(nodes, moments, *, step, keys, grads)` sees every adapter node that uses
that method config (in tree order), for each node the optimizer moments of its trainable leaves
(one `train`-shaped dict per per-parameter state tree in the optax state, e.g. Adam's `mu` and
`nu`), a per-node key, and optionally each node's gradients (`train`-shaped dicts). It returns a
`HookResult` with lists in the same order. Hooks never change shapes (masks instead).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter, is_adapter_or_hole
from jpeft.core import check_finite_tree, check_fits, combine, split
from jpeft.errors import SpecError
from jpeft.paths import leaf_key, leaves_with_paths
from jpeft.shared import attach_shared, detach_shared, owns_shared
from jpeft.views import matrix_node, stack_nodes, unstack_node

PROBE = "probe"  # frozen key of the zero probe that `value_and_hook_grads` differentiates
DENSE = "dense"  # grads key under which a hook finds the dense kernel gradient


class HookResult(NamedTuple):
    nodes: list[Adapter]
    moments: list[list[dict[str, Any]]]
    #: A bool scalar when the hook may restart its nodes' optimizer state (PeriodicLoRA), else None.
    restarted: Any = None


def _flat(tree):
    return jax.tree_util.tree_flatten(tree, is_leaf=is_adapter_or_hole)


def moment_trees(opt_state, trainable):
    """Flatten `opt_state`, stopping at every subtree shaped like `trainable` (per-parameter
    moments). Returns `(leaves, treedef, positions of the moment trees)`."""
    target = jax.tree_util.tree_structure(trainable)
    is_moment = lambda x: x is not None and jax.tree_util.tree_structure(x) == target  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(opt_state, is_leaf=is_moment)
    return leaves, treedef, [i for i, leaf in enumerate(leaves) if is_moment(leaf)]


def _reset_counts(opt_state, flag):
    """Zero every integer `count` field of the optax state where `flag` holds."""

    def visit(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        if name == "count" and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer):
            return jnp.where(flag, jnp.zeros_like(leaf), leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, opt_state)


def _slices(node, moments, grads, key):
    """`(nodes, moments, grads, keys)`, one entry per matrix slice of a node (itself if plain)."""
    if node.view is None:
        return [node], [moments], [grads], [key]
    shape = node.view.batch_shape(node.base.shape)
    n = max(1, int(np.prod(shape)))
    cut = lambda d: unstack_node(node.replace(base=None, train=d, frozen={}, state={}), shape)  # noqa: E731
    per_moment = [[s.train for s in cut(m)] if shape else [m] for m in moments]
    per_grad = [s.train for s in cut(grads)] if grads is not None and shape else [grads] * n
    pieces = unstack_node(matrix_node(node), shape) if shape else [matrix_node(node)]
    keys = list(jax.random.split(key, n)) if shape else [key]
    return pieces, [[pm[i] for pm in per_moment] for i in range(n)], per_grad, keys


def _restack(node, new_nodes, new_moments):
    """Inverse of `_slices` for one node: the hook's slices back into one viewed node."""
    if node.view is None:
        return new_nodes[0], new_moments[0]
    shape = node.view.batch_shape(node.base.shape)
    stacked = stack_nodes(list(new_nodes), shape) if shape else new_nodes[0]
    base = node.view.from_matrix(stacked.base, node.base.shape)
    moments = [stack_nodes([node.replace(base=None, train=ms[k], frozen={}, state={}) for ms in new_moments],
                           shape).train if shape else new_moments[0][k] for k in range(len(new_moments[0]))]
    return stacked.replace(base=base, view=node.view), moments


def after_step(params, opt_state, spec=None, *, step, key, grads=None, check_finite: bool = False):
    """Run every method's step hook. Call after `optax.apply_updates`, on the combined tree.

    `step` is the number of optimizer updates applied so far. Each method config's hook runs once
    with all the nodes that use it (so hooks can act globally, e.g. a rank budget over all layers);
    shared state (`jpeft.shared`) is lent to every node and kept from the owner (first) node.
    Returns `(params, opt_state)`. If a hook restarts its adapters' optimizer state, their moments
    are zeroed and the optax step `count` (shared by all parameters) is zeroed too, which requires
    every trainable leaf to belong to an adapter whose hook restarts at the same time.
    `check_finite=True` checks every adapter array after the hooks, as `jpeft.apply` does.
    """
    if spec is not None:
        check_fits(params, spec)
    trainable, _ = split(params)
    paths = [p for p, _ in leaves_with_paths(params, is_leaf=is_adapter_or_hole)]
    nodes, pdef = _flat(params)
    owners = [isinstance(n, Adapter) and owns_shared(n) for n in nodes]
    nodes = attach_shared(nodes)
    train_flat = _flat(trainable)[0]
    grad_flat: list[Any] = _flat(grads)[0] if grads is not None else [None] * len(nodes)
    state_leaves, sdef, positions = moment_trees(opt_state, trainable)
    moment_flats = [_flat(state_leaves[i])[0] for i in positions]

    groups: dict[Any, list[int]] = {}
    for j, node in enumerate(nodes):
        if isinstance(node, Adapter) and node.method.step_hook is not None:
            groups.setdefault(node.method, []).append(j)
    hooked = {j for members in groups.values() for j in members}
    restarts = []
    for method, members in groups.items():
        # Viewed nodes enter the hook as their matrix slices (each an independent adapter).
        slices = [_slices(nodes[j], [m[j].train for m in moment_flats],
                          None if grads is None else grad_flat[j].train, leaf_key(key, paths[j])) for j in members]
        flat = [piece for pieces in slices for piece in zip(*pieces)]
        result = method.step_hook(
            [p[0] for p in flat], [list(p[1]) for p in flat], step=step, keys=[p[3] for p in flat],
            grads=None if grads is None else [p[2] for p in flat])
        at = 0
        for j, pieces in zip(members, slices):
            n = len(pieces[0])
            node, moments = _restack(nodes[j], result.nodes[at:at + n], result.moments[at:at + n])
            at += n
            nodes[j] = node
            for m, new in zip(moment_flats, moments):
                m[j] = m[j].replace(train=new)
        if result.restarted is None:
            hooked -= set(members)
        else:
            restarts.append(result.restarted)
    has_train = [t is not None and bool(jax.tree_util.tree_leaves(t)) for t in train_flat]
    covered = all(j in hooked for j, trains in enumerate(has_train) if trains)

    for i, flat in zip(positions, moment_flats):
        state_leaves[i] = jax.tree_util.tree_unflatten(_flat(state_leaves[i])[1], flat)
    opt_state = jax.tree_util.tree_unflatten(sdef, state_leaves)
    if restarts:
        if not covered:
            raise SpecError(
                "a step hook restarts its adapters' optimizer state, but other trainable leaves share "
                "the optax step count; give the restarting adapters their own optimizer, or make every "
                "trainable leaf restart together (e.g. PeriodicLoRA on all adapted leaves)")
        opt_state = _reset_counts(opt_state, jnp.all(jnp.stack(restarts)))
    out = jax.tree_util.tree_unflatten(pdef, detach_shared(nodes, owners))
    if check_finite:
        for path, node in leaves_with_paths(out, is_leaf=is_adapter_or_hole):
            if isinstance(node, Adapter):
                check_finite_tree(node.replace(base=None), f"{path} (adapter, after the step hooks)")
    return out, opt_state


# ------------------------------------------------------------------ dense kernel gradients
def hook_grads(grads: Any, dense: Any) -> Any:
    """The `grads` tree for `jpeft.after_step` with dense kernel gradients added: every adapter
    node of `grads` (the trainable-tree gradients) whose path has an entry in `dense` (a tree
    shaped like the params, or a `{path: array}` dict, kernel layout `(in, out)`) gets it under
    `train["dense"]`."""
    dense_map = {p: g for p, g in leaves_with_paths(dense) if g is not None}
    pairs = leaves_with_paths(grads, is_leaf=is_adapter_or_hole)
    leaves = [node.replace(train={**node.train, DENSE: dense_map[p]})
              if isinstance(node, Adapter) and p in dense_map else node for p, node in pairs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(grads, is_leaf=is_adapter_or_hole), leaves)


def value_and_hook_grads(loss_fn, trainable: Any, frozen: Any, *args, dense: bool = True, has_aux: bool = False):
    """`(value, grads, hook_grads)` of `loss_fn(params, *args)` (params = the combined tree).

    `grads` are the trainable-tree gradients (for the optimizer); `hook_grads` are the same with
    the dense kernel gradient `∂L/∂K'` under `train["dense"]` of every node whose method
    `needs_dense_grads` (the sparse family; for `jpeft.after_step(..., grads=hook_grads)`),
    taken in the same backward pass through a zero probe added to those nodes (the factored path
    computes `x @ probe`, the materialised path adds it to the kernel; the values do not change).
    With `dense=False`, `hook_grads is grads`.
    """
    if not dense:
        out, g = jax.value_and_grad(lambda t: loss_fn(combine(t, frozen), *args), has_aux=has_aux)(trainable)
        return out, g, g
    pairs = leaves_with_paths(frozen, is_leaf=is_adapter_or_hole)
    probes = {p: jnp.zeros(n.base.shape, n.base.dtype) for p, n in pairs
              if isinstance(n, Adapter) and n.method.needs_dense_grads}

    def with_probes(params, pr):
        flat = leaves_with_paths(params, is_leaf=is_adapter_or_hole)
        leaves = [n.replace(frozen={**n.frozen, PROBE: pr[p]}) if p in pr else n for p, n in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params, is_leaf=is_adapter_or_hole), leaves)

    out, (g, gp) = jax.value_and_grad(lambda t, pr: loss_fn(with_probes(combine(t, frozen), pr), *args),
                                      argnums=(0, 1), has_aux=has_aux)(trainable, probes)
    return out, g, hook_grads(g, gp)
