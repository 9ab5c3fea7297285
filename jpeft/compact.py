"""`jpeft.compact(params, spec)`: slice masked components away at export.

Step hooks never change shapes: adaptive-rank methods (AdaLoRA, SoRA) zero a component instead of
removing it. `compact` drops those components for export or inference. A method opts in by
overriding `Method.compact(node) -> node`; for methods without one, compact is the identity. The
merged weights do not change (`merge(compact(p)) == merge(p)`), only the shapes shrink.

Compaction is eager (the new shapes depend on the values), so call it outside `jit`; a compacted
tree is for export (merge, checkpoint, inference), not for continuing training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import check_fits
from jpeft.spec import Spec
from jpeft.views import matrix_node, stack_nodes, unstack_node


def compact_node(node: Adapter) -> Adapter:
    """One node through its method's `compact`, or unchanged if the method has none.

    A viewed node is compacted slice by slice; where slices keep different numbers of components,
    each is zero-padded to the largest (padded components are zero, so the merge is unchanged)."""
    if not node.method.compacts:
        return node
    fn = node.method.compact
    if node.view is None:
        return fn(node)
    shape = node.view.batch_shape(node.base.shape)
    mnode = matrix_node(node)
    pieces = [fn(p) for p in (unstack_node(mnode, shape) if shape else [mnode])]
    if shape:
        sizes = [jax.tree.map(np.shape, p.replace(base=None)) for p in pieces]
        widest = jax.tree.map(lambda *s: tuple(max(d) for d in zip(*s)), *sizes, is_leaf=lambda x: isinstance(x, tuple))
        pad = lambda x, to: jnp.pad(x, [(0, t - d) for d, t in zip(x.shape, to)])  # noqa: E731
        pieces = [p.replace(**{part: jax.tree.map(pad, getattr(p, part), getattr(widest, part))
                               for part in ("train", "frozen", "state")}) for p in pieces]
        stacked = stack_nodes(pieces, shape)
    else:
        stacked = pieces[0]
    return stacked.replace(base=node.base, view=node.view)


def compact(params: Any, spec: Spec) -> Any:
    """`params` with every adapter node compacted by its method (identity where it has none)."""
    check_fits(params, spec)
    return jax.tree.map(lambda x: compact_node(x) if isinstance(x, Adapter) else x, params, is_leaf=is_adapter)
