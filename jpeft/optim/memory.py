"""Optimizer-state size from shapes alone (`jax.eval_shape`: nothing is allocated)."""

from __future__ import annotations

from typing import Any, Literal, overload

import jax
import numpy as np
import optax

from jpeft.paths import leaves_with_paths


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


@overload
def state_bytes(tx: optax.GradientTransformation, params_or_shapes: Any, *,
                by_path: Literal[False] = False) -> int: ...
@overload
def state_bytes(tx: optax.GradientTransformation, params_or_shapes: Any, *,
                by_path: Literal[True]) -> dict[str, int]: ...
@overload
def state_bytes(tx: optax.GradientTransformation, params_or_shapes: Any, *,
                by_path: bool = False) -> int | dict[str, int]: ...
def state_bytes(tx: optax.GradientTransformation, params_or_shapes: Any, *,
                by_path: bool = False) -> int | dict[str, int]:
    """Bytes of `tx.init(params)` for a tree of arrays or `jax.ShapeDtypeStruct`s.

    With `by_path=True`, a `{state path: bytes}` dict instead of the total (e.g. to split projector
    bases from moments: paths contain `basis`, `inner/mu`, `inner/nu`, …).
    """
    state = jax.eval_shape(tx.init, _abstract(params_or_shapes))
    if by_path:
        return {path: _nbytes(x) for path, x in leaves_with_paths(state)}
    return sum(_nbytes(x) for x in jax.tree.leaves(state))
