"""`jpeft.compact(params, spec)`: slice masked components away at export (METHODS.md §1.3 J).

Step hooks never change shapes: adaptive-rank methods (AdaLoRA, SoRA) zero a component instead of
removing it. `compact` drops those components for export or inference. A method opts in with an
optional `compact(node) -> node` method; for methods without it, compact is the identity. The
merged weights do not change (`merge(compact(p)) == merge(p)`), only the shapes shrink.

Compaction is eager (the new shapes depend on the values), so call it outside `jit`; a compacted
tree is for export (merge, checkpoint, inference), not for continuing training.
"""

from __future__ import annotations

from typing import Any

import jax

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import check_fits
from jpeft.spec import Spec


def compact_node(node: Adapter) -> Adapter:
    """One node through its method's `compact`, or unchanged if the method has none."""
    fn = getattr(node.method, "compact", None)
    return node if fn is None else fn(node)


def compact(params: Any, spec: Spec) -> Any:
    """`params` with every adapter node compacted by its method (identity where it has none)."""
    check_fits(params, spec)
    return jax.tree.map(lambda x: compact_node(x) if isinstance(x, Adapter) else x, params, is_leaf=is_adapter)
