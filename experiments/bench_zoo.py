"""Every registered method on the reference workload (docs/design.md §8), one row each.

    python -m experiments.bench_zoo [--methods=lora,dora] [--rank=16] [--fit_steps=100]

Columns: trainable parameters (`jpeft.count`) with the method on all seven projections of the
Llama-shaped reference model; XLA FLOPs (`cost_analysis`) and peak bytes (`memory_analysis`:
arguments + temporaries) of one AdamW training step through `jpeft.factored`; and the loss after
`--fit_steps` Adam steps on a planted target `W* = W + low-rank(8) + sparse(1%)` (512×512
regression), relative to the loss at init. Methods the defaults cannot build (e.g. a rank option
they lack) get the error in the row instead of stopping the table.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import jpeft
from experiments.benchlib import TARGET, jit_step, next_token_loss, reference_setup, write_table, xla_figures
from jpeft.registry import method_with_defaults


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_list("methods", [], "registry names (default: all)")
    flags.DEFINE_integer("rank", 16, "rank for methods that have one")
    flags.DEFINE_integer("fit_steps", 100, "Adam steps on the planted regression target")
    flags.DEFINE_string("out_dir", "out/bench_zoo", "where the CSV and markdown tables go")


FLAGS = flags.FLAGS


#: Options the reference shapes need: the MLP width 1376 = 2⁵·43 is not a multiple of the default
#: sub-vector length (VB-LoRA) or block size (SMT), 256.
REFERENCE_SHAPE_OPTIONS = {"vb_lora": {"vector_length": 32}, "smt": {"block": 32}}


def configured(name: str, rank: int, steps: int) -> jpeft.Method:
    """The method's defaults, with `rank` and the schedule length `steps` where it has them."""
    return method_with_defaults(name, {"rank": rank, "total_step": steps}, **REFERENCE_SHAPE_OPTIONS.get(name, {}))


def planted_problem(width: int = 512, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    w = jax.random.normal(ks[0], (width, width)) / width ** 0.5
    low_rank = jax.random.normal(ks[1], (width, 8)) @ jax.random.normal(ks[2], (8, width)) / width
    sparse = jnp.where(jax.random.uniform(ks[3], (width, width)) < 0.01,
                       0.3 * jax.random.normal(ks[4], (width, width)), 0.0)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (1024, width))
    return {"w": w}, x, x @ (w + low_rank + sparse)


def fit_ratio(method: jpeft.Method, steps: int) -> float:
    params, x, y = planted_problem()
    loss = lambda p: jnp.mean(jnp.square(x @ p["w"] - y))  # noqa: E731
    spec = jpeft.Spec({"w": method})
    calib = jax.grad(loss)(params) if method.needs_calib else None
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), params, spec, calib=calib))
    tx = optax.adam(5e-3)

    @jax.jit
    def step(trainable, frozen, opt_state, i):
        value, grads = jax.value_and_grad(lambda t: loss(jpeft.apply(jpeft.combine(t, frozen), spec)))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        p, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen), opt_state,
                                        spec, step=i, key=jax.random.PRNGKey(i), grads=grads)
        return (*jpeft.split(p), opt_state, value)

    opt_state, first = tx.init(trainable), None
    for i in range(1, steps + 1):
        trainable, frozen, opt_state, value = step(trainable, frozen, opt_state, i)
        first = float(value) if first is None else first
    if first is None:
        raise ValueError(f"steps={steps}: fit at least one step")
    return float(loss(jpeft.merge(jpeft.combine(trainable, frozen), spec))) / first


def row(name, model, params, ids, rank, fit_steps):
    method = configured(name, rank, fit_steps)
    spec = jpeft.Spec({TARGET: method})
    calib = (jax.grad(lambda p: next_token_loss(model.apply({"params": p}, ids), ids))(params)
             if method.needs_calib else None)
    tree = jpeft.init(jax.random.PRNGKey(1), params, spec, calib=calib)
    trainable, frozen = jpeft.split(tree)
    run = jpeft.factored(model.apply, spec)
    tx = optax.adamw(1e-4)

    @jit_step
    def step(state):
        """One training step, the method's step hook included (it may rewrite the frozen base)."""
        t, f, opt_state = state
        grads = jax.grad(lambda t: next_token_loss(run({"params": jpeft.combine(t, f)}, ids), ids))(t)
        updates, opt_state = tx.update(grads, opt_state, t)
        p, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(t, updates), f), opt_state, spec,
                                        step=1, key=jax.random.PRNGKey(0), grads=grads)
        return (*jpeft.split(p), opt_state)

    figures = xla_figures(step, (trainable, frozen, tx.init(trainable)))
    return {"method": name, "trainable": jpeft.count(tree).trainable, "gflops": figures["gflops"],
            "peak_mb": figures["peak_mb"], "fit_loss_ratio": fit_ratio(configured(name, 8, fit_steps), fit_steps)}


def main(argv):
    del argv
    model, params, ids = reference_setup(batch=8, seq=128)
    rows = []
    for name in FLAGS.methods or jpeft.methods():
        try:
            rows.append(row(name, model, params, ids, FLAGS.rank, FLAGS.fit_steps))
        except Exception as e:  # noqa: BLE001 - a method the defaults cannot build gets its error in the table
            rows.append({"method": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        print(rows[-1], flush=True)
    cols = ["method", "trainable", "gflops", "peak_mb", "fit_loss_ratio", "error"]
    print(write_table(rows, cols, os.path.join(FLAGS.out_dir, "bench_zoo")))


if __name__ == "__main__":
    define_flags()
    app.run(main)
