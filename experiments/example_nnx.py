"""jpeft with a Flax NNX model: `nnx.split` → `jpeft.init` on the state → train → `nnx.merge`.

    python -m experiments.example_nnx --steps=300
"""

from __future__ import annotations

from absl import app, flags
from flax import nnx

import jpeft
from experiments import toy_task


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(toy_task.IN, toy_task.HIDDEN, rngs=rngs)
        self.mid_proj = nnx.Linear(toy_task.HIDDEN, toy_task.HIDDEN, rngs=rngs)
        self.down_proj = nnx.Linear(toy_task.HIDDEN, toy_task.OUT, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(nnx.tanh(self.mid_proj(nnx.tanh(self.up_proj(x)))))


def run(steps: int = 300, log=print):
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    spec = jpeft.Spec({r"(mid|down)_proj/kernel": jpeft.DoRA(rank=8, alpha=16)})
    out = toy_task.pretrain_and_adapt(lambda s, x: nnx.merge(graphdef, s)(x), state, spec, steps, log=log)
    return {**out, "model": nnx.merge(graphdef, out["merged"])}


def main(argv):
    del argv
    run(flags.FLAGS.steps)


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 300, "fine-tuning steps")
    app.run(main)
