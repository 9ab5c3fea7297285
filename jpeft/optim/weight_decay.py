"""Decoupled weight decay applied after the step, in the order of the GaLore reference `AdamW`.

The references update `W ← W − η·U` and then `W ← W − η·λ·W` (on the already-updated weight).
Chained after `optax.scale_by_learning_rate`, this transform turns an update `u = −η·U` into
`u − η·λ·(W + u)`, which reproduces that order exactly. (`optax.add_decayed_weights` before the
learning rate decays the weight before the step: `W ← W − η·(U + λ·W)`; the two differ by `η²λ·U`.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def decay_after_update(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
                       mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """`u ← u − lr·weight_decay·(params + u)` on the leaves selected by `mask` (all by default)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("decay_after_update needs params")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = lambda u, p: u - (lr * weight_decay) * (p + u).astype(u.dtype)  # noqa: E731
        if weight_decay == 0.0:
            new = updates
        elif mask is None:
            new = jax.tree.map(decay, updates, params)
        else:
            m = mask(params) if callable(mask) else mask
            new = jax.tree.map(lambda u, p, k: decay(u, p) if k else u, updates, params, m)
        return new, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
