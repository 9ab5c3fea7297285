"""Shared pieces of the benchmarks: the reference workload (docs/design.md §8), XLA figures, tables."""

from __future__ import annotations

import csv
import functools
import os

import jax
import optax

from jpeft.models.llama import Llama, LlamaConfig

#: All seven projections of every layer of the Llama reference model.
TARGET = r"layers_\d+/(self_attn|mlp)/\w+_proj/kernel"


def next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


#: `jax.jit` for a training step `step(state) -> state | (state, aux)` that consumes its state, as a
#: training loop does. Donation matters for the byte figures: without it XLA parks temporaries in
#: the step's output buffers, which `arguments + temporaries` does not count (full fine-tuning's
#: peak read 409 MB instead of 481 MB on the reference workload).
jit_step = functools.partial(jax.jit, donate_argnums=0)


def train_step(loss_fn, trainable, frozen, tx):
    """`(step, state)`: a donating AdamW-style step `step(state) -> (state, loss)` over
    `state = (trainable, frozen, opt_state)` with `loss_fn(trainable, frozen)`. The frozen weights
    are an argument of the step (not a closed-over constant, which `memory_analysis` would not
    count), so every row's peak includes them."""
    @jit_step
    def step(state):
        trainable, frozen, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), frozen, opt_state), loss

    return step, (trainable, frozen, tx.init(trainable))


def compile_step(step, state):
    """The compiled executable of a jitted step for `state`'s shapes (`state` may be donated)."""
    return step.lower(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)).compile()


def xla_figures(step, state):
    """FLOPs (`cost_analysis`) and bytes (`memory_analysis`) of a jitted step. `peak_mb` is
    arguments + temporaries + outputs not aliased to a donated argument; `state` may be donated."""
    compiled = compile_step(step, state)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    return {"gflops": cost["flops"] / 1e9, "peak_mb": peak / 2 ** 20, "temp_mb": mem.temp_size_in_bytes / 2 ** 20}


def define_workload_flags(out_dir: str) -> None:
    """The reference workload's absl flags shared by the step benchmarks (batch, seq, rank, out_dir)."""
    from absl import flags

    flags.DEFINE_integer("batch", 8, "sequences per step")
    flags.DEFINE_integer("seq", 128, "tokens per sequence")
    flags.DEFINE_integer("rank", 16, "adapter rank")
    flags.DEFINE_string("out_dir", out_dir, "where the CSV and markdown tables go")


def reference_setup(batch, seq):
    config = LlamaConfig.reference()
    model = Llama(config)
    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, config.vocab_size)
    return model, model.init(jax.random.PRNGKey(0), ids)["params"], ids


def write_table(rows, cols, stem):
    """Write `stem.csv` and `stem.md`; return the markdown."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)
