"""Sparse fine-tuning with O(k) memory: trainable and optimizer bytes, step FLOPs and peak bytes of
LIFT, SpIEL and SLTrain against LoRA with the same trainable count (docs/design.md §8).

    python -m experiments.bench_sparse [--steps=3] [--out_dir=out/bench_sparse]

Workload: the reference Llama of `jpeft.models.llama` (vocab 4096, hidden 512, MLP 1376, 4
layers, 8 heads, batch 8×128, fp32, random init), all seven projections adapted, Adam, next-token
loss through `jpeft.factored`. The sparse methods get LoRA r=16's count: `k = 16·(m+n)` per matrix
(`lora_rank=16`; SLTrain: r=8 plus `8·(m+n)` sparse entries). A second group compares SpIEL at
density 1% with LoRA r=3 (the closest rank: 3·(m+n) per matrix vs 1%·m·n).

Figures per configuration, all from XLA on the compiled step (loss, backward, Adam update):
- trainable / optimizer MiB: the trainable leaves and the Adam state (mu, nu, count);
- GFLOPs: `cost_analysis()`; XLA counts a while-loop body once, so the sparse path's own term
  (gather forward, input and value gradients: `6·T·k` per matrix) is given analytically beside it;
- peak MiB: `memory_analysis()` arguments + temporaries (as `experiments/bench_step.py`); temp MiB;
- hook MiB: temporaries of `jpeft.after_step` compiled on its own (it only acts on reselection /
  refresh steps, so a training loop can call it there: LIFT's refresh is an SVD of every matrix);
- step s: median wall time of `--steps` steps (compare only within one run); on CPU the gather
  path is far slower than a GEMM; the Pallas kernels are meant for accelerators.
Rows `*_accumulate` are SpIEL-rigl's accumulation steps (5 in 20), which need the dense gradient.
"""

from __future__ import annotations

import csv
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import jpeft
from jpeft.hooks import value_and_hook_grads
from jpeft.methods import lowrank_sparse as lrs
from jpeft.methods import sparse as sp
from jpeft.models.llama import Llama, LlamaConfig


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_integer("steps", 3, "timed steps per configuration (0: no timing)")
    flags.DEFINE_integer("batch", 8, "sequences per step")
    flags.DEFINE_integer("seq", 128, "tokens per sequence")
    flags.DEFINE_string("only", "", "comma-separated configuration names to run (default: all)")
    flags.DEFINE_string("out_dir", "out/bench_sparse", "where the CSV and markdown tables go")


FLAGS = flags.FLAGS


TARGET = r"layers_\d+/(self_attn|mlp)/\w+_proj/kernel"
MIB = 2 ** 20


def configs():
    """`{name: (method, with_dense_grads)}`."""
    return {
        "lora_r16": (jpeft.LoRA(rank=16, alpha=32), False),
        "lift": (sp.LIFT(lora_rank=16, rank=128), False),
        "spiel": (sp.SpIEL(lora_rank=16), False),
        "spiel_dense_path": (sp.SpIEL(lora_rank=16, path="dense"), False),
        "spiel_accumulate": (sp.SpIEL(lora_rank=16), True),
        "sltrain": (lrs.SLTrain(rank=8, alpha=16, lora_rank=8), False),
        "lora_r3": (jpeft.LoRA(rank=3, alpha=6), False),
        "spiel_1pct": (sp.SpIEL(density=0.01), False),
        "spiel_1pct_dense_path": (sp.SpIEL(density=0.01, path="dense"), False),
    }


def next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def nbytes(tree):
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def sparse_term_flops(params, tokens):
    """`6·T·k` per sparse-path node (forward + input gradient + value gradient)."""
    total = 0
    for node in jax.tree.leaves(params, is_leaf=jpeft.is_adapter):
        if isinstance(node, jpeft.Adapter) and getattr(node.method, "path", None) == "sparse" and "idx" in node.frozen:
            total += 6 * tokens * node.frozen["idx"].shape[0]
    return total


def xla(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, cost["flops"], mem.argument_size_in_bytes + mem.temp_size_in_bytes, mem.temp_size_in_bytes


def build(model, params, ids, method, with_dense):
    spec = jpeft.Spec({TARGET: method})
    adapted = jpeft.init(jax.random.PRNGKey(1), params, spec)
    trainable, frozen = jpeft.split(adapted)
    run = jpeft.factored(model.apply, spec)
    tx = optax.adam(1e-4)
    opt_state = tx.init(trainable)
    loss_fn = lambda p, ids: next_token_loss(run({"params": p}, ids), ids)  # noqa: E731

    def step(trainable, frozen, opt_state, ids):
        if with_dense:
            loss, grads, hook_grads = value_and_hook_grads(loss_fn, trainable, frozen, ids)
        else:
            loss, grads = jax.value_and_grad(lambda t: loss_fn(jpeft.combine(t, frozen), ids))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if with_dense:  # accumulation steps run the hook in the step (it reads the dense gradient)
            p, opt_state = jpeft.after_step(jpeft.combine(trainable, frozen), opt_state, spec,
                                            step=opt_state[0].count, key=jax.random.PRNGKey(0), grads=hook_grads)
            trainable, frozen = jpeft.split(p)
        return trainable, frozen, opt_state, loss

    def hook(trainable, frozen, opt_state):
        return jpeft.after_step(jpeft.combine(trainable, frozen), opt_state, spec, step=opt_state[0].count,
                                key=jax.random.PRNGKey(0), grads=trainable)

    return adapted, (trainable, frozen, opt_state), step, hook


def measure(name, model, params, ids, method, with_dense, steps):
    adapted, state, step, hook = build(model, params, ids, method, with_dense)
    trainable, frozen, opt_state = state
    compiled, flops, peak, temp = xla(step, trainable, frozen, opt_state, ids)
    has_hook = any(isinstance(n, jpeft.Adapter) and n.method.step_hook is not None
                   for n in jax.tree.leaves(adapted, is_leaf=jpeft.is_adapter))
    hook_temp = xla(hook, trainable, frozen, opt_state)[3] if has_hook and not with_dense else 0
    tokens = ids.shape[0] * ids.shape[1]
    row = {"config": name, "method": method.name, "path": getattr(method, "path", "factored"),
           "trainable": jpeft.count(adapted).trainable, "trainable_mib": nbytes(trainable) / MIB,
           "optimizer_mib": nbytes(opt_state) / MIB, "xla_gflops": flops / 1e9,
           "sparse_term_gflops": sparse_term_flops(adapted, tokens) / 1e9,
           "peak_mib": peak / MIB, "temp_mib": temp / MIB, "hook_temp_mib": hook_temp / MIB}
    if steps:
        args = (trainable, frozen, opt_state, ids)
        out = jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*out[:3], ids))
            times.append(time.perf_counter() - t0)
        row["step_s"] = statistics.median(times)
    return row


COLUMNS = ["config", "method", "path", "trainable", "trainable_mib", "optimizer_mib", "xla_gflops",
           "sparse_term_gflops", "peak_mib", "temp_mib", "hook_temp_mib", "step_s", "temp_vs_lora"]


def write(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_sparse.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "bench_sparse.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv):
    del argv
    config = LlamaConfig.reference()
    model = Llama(config)
    ids = jax.random.randint(jax.random.PRNGKey(0), (FLAGS.batch, FLAGS.seq), 0, config.vocab_size)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    wanted = [s for s in FLAGS.only.split(",") if s]
    unknown = sorted(set(wanted) - set(configs()))
    if unknown:
        raise app.UsageError(f"--only: no configuration named {unknown}; the configurations are {sorted(configs())}")
    rows = []
    for name, (method, with_dense) in configs().items():
        if wanted and name not in wanted:
            continue
        rows.append(measure(name, model, params, ids, method, with_dense, FLAGS.steps))
        print(f"{name}: done", flush=True)
    lora = {r["config"]: r for r in rows}
    for r in rows:
        ref = lora.get("lora_r3" if "1pct" in r["config"] or r["config"] == "lora_r3" else "lora_r16")
        if ref is not None:
            r["temp_vs_lora"] = r["temp_mib"] / ref["temp_mib"]
    print(write(rows, FLAGS.out_dir))


if __name__ == "__main__":
    define_flags()
    app.run(main)
