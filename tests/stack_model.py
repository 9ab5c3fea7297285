"""The toy model the memory tests share: six bias-free `nn.Dense(256)` layers with tanh, 32 tokens,
returning a scalar (so `jax.grad` of it is a whole training backward)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS, WIDTH, TOKENS = 6, 256, 32


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = jnp.tanh(nn.Dense(WIDTH, use_bias=False, name=f"layer_{i}")(x))
        return jnp.sum(jnp.square(x))


MODEL = Stack()
X = jnp.ones((TOKENS, WIDTH))
PARAMS = MODEL.init(jax.random.PRNGKey(0), X)["params"]
