"""The adapter node that replaces a targeted leaf in a parameter tree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from flax import struct


@struct.dataclass
class Adapter:
    """A targeted leaf after `jpeft.init`.

    base:   the frozen base weight in kernel layout `(in, out)`; possibly rewritten at init
            (PiSSA / LoRA-GA residual). Methods that train the whole leaf keep it in `train`.
    train:  trainable arrays (the optimizer sees these and nothing else).
    frozen: frozen buffers (random bases, indices, masks, singular vectors).
    state:  non-trainable arrays that step hooks rewrite (schedules, EMA scores).
    method: the method config (static: part of the tree structure, hashable under `jit`).
    view:   the `jpeft.View` of an N-D kernel (static), or None for a plain `(in, out)` kernel.
            Viewed nodes keep `base` in the leaf's own shape; their other arrays carry the view's
            batch axes in front (one adapter per slice; `jpeft.views`).
    """

    base: Any
    train: dict[str, Any]
    frozen: dict[str, Any]
    state: dict[str, Any]
    method: Any = struct.field(pytree_node=False)
    view: Any = struct.field(pytree_node=False, default=None)

    if TYPE_CHECKING:  # `flax.struct.dataclass` adds it at runtime
        def replace(self, **updates: Any) -> Adapter: ...


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def is_adapter_or_hole(x: Any) -> bool:
    """Leaf predicate that keeps trees with `None` holes aligned with full trees."""
    return x is None or isinstance(x, Adapter)


def map_adapters(fn, tree: Any) -> Any:
    """Apply `fn(node)` to every adapter node of `tree`; other leaves pass through."""
    return jax.tree.map(lambda x: fn(x) if isinstance(x, Adapter) else x, tree, is_leaf=is_adapter)
