"""jpeft with a Flax Linen model: pretrain on teacher A, then LoRA fine-tune on teacher B.

    python -m experiments.example_linen --steps=300
"""

from __future__ import annotations

import flax.linen as nn
import jax
from absl import app, flags

import jpeft
from experiments import toy_task


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(toy_task.HIDDEN, name="up_proj")(x))
        x = nn.tanh(nn.Dense(toy_task.HIDDEN, name="mid_proj")(x))
        return nn.Dense(toy_task.OUT, name="down_proj")(x)


def run(steps: int = 300, spec: jpeft.Spec | None = None, lr: float = 3e-3, log=print):
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), toy_task.batch(jax.random.PRNGKey(0), 1))["params"]
    spec = spec or jpeft.Spec({r".*_proj/kernel": jpeft.LoRA(rank=8, alpha=16)}, exclude=r"up_proj/.*")
    forward = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return toy_task.pretrain_and_adapt(forward, params, spec, steps, lr, log)


def main(argv):
    del argv
    run(flags.FLAGS.steps)


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 300, "fine-tuning steps")
    app.run(main)
