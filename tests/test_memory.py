"""What a training step keeps alive through the backward pass (XLA `memory_analysis`).

Compared with a plain forward/backward of the same Linen model (frozen weights, gradient w.r.t.
the input):
- `jpeft.apply` (materialised) hands the model `K'`; the model's matmul keeps that operand for its
  backward, so one copy of each adapted weight is live (never a saved `ΔW` besides it for LoRA;
  DoRA's recomputed direction adds a second);
- `jpeft.factored` never builds `K'` for LoRA-style layers: the extra is the `O((in+out)·r)`
  factor activations, and for DoRA its `O(out·r)` norm terms — a small fraction of one copy.
"""

import jax
import pytest

import jpeft
from tests.stack_model import LAYERS, MODEL, PARAMS, WIDTH, X

ADAPTED_BYTES = LAYERS * WIDTH * WIDTH * 4


def temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def plain_temp_bytes():
    return temp_bytes(jax.grad(lambda p, x: MODEL.apply({"params": p}, x), argnums=1), PARAMS, X)


def extra_copies(method, path):
    spec = jpeft.Spec({r"layer_\d/kernel": method})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), PARAMS, spec))
    if path == "materialised":
        loss = lambda t, f, x: MODEL.apply({"params": jpeft.apply(jpeft.combine(t, f), spec)}, x)  # noqa: E731
    else:
        run = jpeft.factored(MODEL.apply, spec)
        loss = lambda t, f, x: run({"params": jpeft.combine(t, f)}, x)  # noqa: E731
    return (temp_bytes(jax.grad(loss), trainable, frozen, X) - plain_temp_bytes()) / ADAPTED_BYTES


@pytest.mark.parametrize("method, low, high", [(jpeft.LoRA(rank=8), 0.75, 1.1), (jpeft.DoRA(rank=8), 0.75, 2.1)])
def test_materialised_path_keeps_the_operand_copy(method, low, high):
    assert low <= extra_copies(method, "materialised") <= high


@pytest.mark.parametrize("method, high", [(jpeft.LoRA(rank=8), 0.05), (jpeft.PiSSA(rank=8), 0.05),
                                          (jpeft.DoRA(rank=8), 0.25)])
def test_factored_path_does_not_double_the_adapted_weights(method, high):
    assert extra_copies(method, "factored") <= high
