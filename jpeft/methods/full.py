"""Full fine-tuning of a leaf (heads, norms, biases) inside a PEFT spec."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jpeft.errors import leaf_error
from jpeft.methods.base import Method
from jpeft.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Full(Method):
    """Train the whole leaf: `train["w"]` is the leaf itself (any shape, floating dtype)."""

    name = "full"
    paper = "none (full fine-tuning of the leaf)"
    adapts_matrix = False
    has_base = False

    def check(self, path, w):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise leaf_error(path, w.shape, w.dtype, "expected a floating-point array")

    def create(self, key, w, calib=None):
        return self.node(None, train={"w": w})

    def rebuild_base(self, w, node):
        return None  # the leaf itself is trained (and saved)

    def materialise(self, node, rng=None):
        return node.train["w"]

    def matmul(self, node, x, rng=None):
        return x @ node.train["w"] if node.train["w"].ndim == 2 else None
