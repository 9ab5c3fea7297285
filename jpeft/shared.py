"""State shared by every leaf that uses one method config (VB-LoRA's vector bank, RandLoRA's
random bases): stored once, in the first such adapter node (the owner) under the key `"shared"`
of its `train` and/or `frozen` dicts, and lent to the other nodes while they are evaluated.
Checkpoints and parameter counts therefore see it once; gradients from every layer reach it.
"""

from __future__ import annotations

from typing import Any

from jpeft.adapter import Adapter

SHARED = "shared"


def owns_shared(node: Adapter) -> bool:
    return SHARED in node.train or SHARED in node.frozen


def attach_shared(leaves: list[Any]) -> list[Any]:
    """Give every adapter node a reference to its method's shared state (from the owner)."""
    owners: dict[Any, Adapter] = {}
    for leaf in leaves:
        if isinstance(leaf, Adapter) and owns_shared(leaf):
            owners.setdefault(leaf.method, leaf)
    return [_lend(leaf, owners[leaf.method]) if isinstance(leaf, Adapter) and leaf.method in owners
            and leaf is not owners[leaf.method] else leaf for leaf in leaves]


def detach_shared(leaves: list[Any], owners: list[bool]) -> list[Any]:
    """Drop the lent references again (keeping them on the nodes that own the state)."""
    return [leaf.replace(train=_without(leaf.train), frozen=_without(leaf.frozen))
            if isinstance(leaf, Adapter) and not owner else leaf for leaf, owner in zip(leaves, owners)]


def _lend(node: Adapter, owner: Adapter) -> Adapter:
    train = {**node.train, SHARED: owner.train[SHARED]} if SHARED in owner.train else node.train
    frozen = {**node.frozen, SHARED: owner.frozen[SHARED]} if SHARED in owner.frozen else node.frozen
    return node.replace(train=train, frozen=frozen)


def _without(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != SHARED}
