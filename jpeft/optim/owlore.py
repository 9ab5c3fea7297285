"""OwLore — outlier-weighted layer sampling with GaLore (Li et al., 2024).

Every `interval` steps (K, including step 0) `n_active` (γ) of the model's `L` transformer layers are
drawn without replacement with probabilities `p_l ∝ score_l` (OWL's layer-wise outlier ratio,
precomputed: `outlier_ratio`); only those layers train, with GaLore, until the next draw. Leaves
outside any layer (embeddings, head, final norm) always train (LISA's convention).

Optimizer-state surgery, explicit ("freeze"): a leaf of an inactive layer gets a zero update
and its state is kept as it is — moments, projector and step count — as in the reference, where a
frozen layer has no gradient and the torch optimizer skips it. Its projector refresh therefore
follows its own step count. The draw is `jax.random.choice(..., replace=False, p=p)` (successive
sampling, the law of `numpy.random.choice` used by the reference) from a key folded with the draw
number: no host round trip, and no recompilation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.optim.galore import galore_config
from jpeft.optim.projected import ProjectedState, paths_and_leaves
from jpeft.optim.weight_decay import decay_after_update

#: Default layer rule: the integer after `layers_` / `layers.` / `layers/` / `h_` in the leaf path.
DEFAULT_LAYER_PATTERN = r"(?:^|.*/)(?:layers|h|blocks)[_./](\d+)(?:/.*|$)"


def outlier_ratio(kernels: Sequence[jax.Array], input_norms: Sequence[jax.Array], m: float = 13.0) -> jax.Array:
    """OWL's layer-wise outlier distribution (LOD) for one layer, in kernel layout.

    `kernels[i]` is `(in, out)`; `input_norms[i]` the ℓ2 norm of each input feature over calibration
    tokens `(in,)`. The score of a weight is `|K_ij|·‖X_i‖`; an outlier exceeds `m ×` the mean score of
    its matrix. Returns the fraction of outliers over all the layer's weights.
    **[UNVERIFIED aggregation]**: matrices are pooled by count (the reference ships precomputed ratios).
    """
    outliers: float | jax.Array = 0.0
    total = 0
    for k, x in zip(kernels, input_norms):
        score = jnp.abs(k) * x[:, None]
        outliers = outliers + jnp.sum(score > m * jnp.mean(score))
        total += k.size
    return cast(jax.Array, outliers / total)  # an array: with no kernels, 0.0 / 0 has raised


def layer_probabilities(scores: Sequence[float] | jax.Array) -> np.ndarray:
    """`p_l = score_l / Σ score` (the reference's `prob_mode="owl"`)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or np.any(s < 0) or s.sum() <= 0:
        raise ValueError("layer scores must be a 1-D array of non-negative numbers with a positive sum")
    return s / s.sum()


def sample_layers(key: jax.Array, probs: jax.Array, n_active: int) -> jax.Array:
    """Boolean mask `(L,)` with `n_active` layers drawn without replacement, `P ∝ probs`."""
    idx = jax.random.choice(key, probs.shape[0], (n_active,), replace=False, p=probs)
    return jnp.zeros(probs.shape[0], bool).at[idx].set(True)


class OwLoreState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states' `count` does
    active: jax.Array  # bool[L]: the layers training in the current interval
    galore: ProjectedState


def _layer_fn(layers: str | Callable[[str], int | None]) -> Callable[[str], int | None]:
    if callable(layers):
        return layers

    def fn(path: str) -> int | None:
        match = re.fullmatch(layers, path)
        return int(match.group(1)) if match else None

    return fn


def scale_by_owlore(layer_scores: Sequence[float] | jax.Array, n_active: int = 5, interval: int = 50, *,
                    layers: str | Callable[[str], int | None] = DEFAULT_LAYER_PATTERN, rank: int = 256,
                    update_proj_gap: int = 100, scale: float = 1.0, proj_type: str = "std", seed: int = 0,
                    **galore_kwargs) -> optax.GradientTransformation:
    """OwLore's direction (before the learning rate).

    Args:
      layer_scores: one non-negative score per layer (OWL outlier ratios, `outlier_ratio`);
        sampling probabilities are `score / Σ score`.
      n_active: γ, layers training at a time.
      interval: K, steps between draws.
      layers: regex with one group capturing the layer index (`fullmatch` on the leaf path), or
        `path -> int | None`. Leaves with no layer always train.
      rank, update_proj_gap, scale, proj_type: GaLore settings (reference: 256, 100, 1.0, std);
        other keyword arguments as `scale_by_galore`.
    """
    probs = jnp.asarray(layer_probabilities(layer_scores), jnp.float32)
    n_layers = probs.shape[0]
    if not 1 <= n_active <= n_layers:
        raise ValueError(f"n_active must be in [1, {n_layers}], got {n_active}")
    if int(np.count_nonzero(np.asarray(layer_scores))) < n_active:
        raise ValueError("fewer layers with a positive score than n_active")
    if not (isinstance(interval, int) and interval >= 1):
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    cfg = galore_config(rank, update_proj_gap, scale, proj_type, seed=seed, **galore_kwargs)
    layer_of = _layer_fn(layers)
    base_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x0A11)

    def layer_map(tree) -> dict[str, int]:
        paths, _, _ = paths_and_leaves(tree)
        out = {}
        for p in paths:
            layer = layer_of(p)
            if layer is not None:
                if not 0 <= layer < n_layers:
                    raise ValueError(f"{p}: layer {layer} outside the {n_layers} layers with scores")
                out[p] = layer
        return out

    def init_fn(params):
        if not layer_map(params):
            raise ValueError("no leaf path matched the layer rule; pass `layers=` (regex or callable)")
        return OwLoreState(count=jnp.zeros([], jnp.int32), active=jnp.zeros(n_layers, bool),
                           galore=cfg.init(params))

    def update_fn(updates, state, params=None):
        redraw = state.count % interval == 0
        key = jax.random.fold_in(base_key, state.count // interval)
        active = jnp.where(redraw, sample_layers(key, probs, n_active), state.active)
        gates = {p: active[layer] for p, layer in layer_map(updates).items()}
        out, galore_state = cfg.update(updates, state.galore, params, active=gates)
        return out, OwLoreState(optax.safe_int32_increment(state.count), active, galore_state)

    return optax.GradientTransformation(init_fn, update_fn)


def owlore(learning_rate: optax.ScalarOrSchedule, layer_scores: Sequence[float] | jax.Array, n_active: int = 5,
           interval: int = 50, *, weight_decay: float = 0.0, mask: Any | Callable[[Any], Any] | None = None,
           **kwargs) -> optax.GradientTransformation:
    """OwLore with GaLore-AdamW: `scale_by_owlore`, the learning rate, weight decay after the step.

    Weight decay touches the active layers and the layer-less leaves only: a frozen layer is not
    updated at all, as in the reference."""
    chain = optax.chain(scale_by_owlore(layer_scores, n_active, interval, **kwargs),
                        optax.scale_by_learning_rate(learning_rate),
                        decay_after_update(learning_rate, weight_decay, mask))
    if weight_decay == 0.0:
        return chain
    layer_of = _layer_fn(kwargs.get("layers", DEFAULT_LAYER_PATTERN))

    def update_fn(updates, state, params=None):
        out, new = chain.update(updates, state, params)
        active = new[0].active
        paths, leaves, treedef = paths_and_leaves(out)
        leaves = [x if layer_of(p) is None else jnp.where(active[layer_of(p)], x, jnp.zeros_like(x))
                  for p, x in zip(paths, leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves), new

    return optax.GradientTransformation(chain.init, update_fn)
