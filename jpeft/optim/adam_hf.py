"""Adam with the ε placement of HuggingFace's / GaLore's / Natural GaLore's reference `AdamW`.

The references step by `lr · √(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε)`: ε is added to the *uncorrected*
`√v`. `optax.scale_by_adam` computes `m̂/(√v̂ + ε)`, i.e. `√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε·√(1−β2ᵗ))`
(DCT-AdamW's and LoRA-Pro's form). The two differ only through ε; this transform exists so that
`jpeft.optim.galore` reproduces `galore_torch.GaLoreAdamW` to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scale_by_adam_hf(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                     correct_bias: bool = True) -> optax.GradientTransformation:
    """Adam direction `c_t · m/(√v + ε)` with `c_t = √(1−β2ᵗ)/(1−β1ᵗ)` (1 without bias correction).

    The state is `optax.ScaleByAdamState(count, mu, nu)`, so tools that read Adam moments by name
    (e.g. the `moment_policy="rotate"` of the projected optimizers) treat it like optax's Adam.
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_int32_increment(state.count)
        if correct_bias:
            t = count.astype(jnp.float32)
            factor = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        else:
            factor = jnp.ones([], jnp.float32)
        out = jax.tree.map(lambda m, v: (factor * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
