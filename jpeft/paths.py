"""Key paths of pytree leaves as `/`-joined strings (`layers_3/attn/q_proj/kernel`)."""

from __future__ import annotations

import difflib
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """A per-leaf key that depends only on `key` and the leaf's path."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _key_str(key: Any) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: tuple) -> str:
    """Join a JAX key path with `/`; NNX `Variable.value` attributes are dropped."""
    keys = list(keypath)
    while keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys.pop()
    return "/".join(_key_str(k) for k in keys)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """`(path, leaf)` for every leaf of `tree`, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def closest_paths(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    """The real paths that look most like a regex that matched nothing."""
    literal = re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern)
    return difflib.get_close_matches(literal, paths, n=n, cutoff=0.0)
