"""HD-PiSSA vs data-parallel LoRA / PiSSA on simulated devices (docs/design.md §8).

    python -m experiments.bench_hd_pissa --dim=256 --layers=4 --rank=8 --steps=20

A stack of `layers` dense `dim×dim` layers (tanh between them) regresses a teacher; every kernel
is adapted. Per method it reports the per-step wall time (median over interleaved rounds, so the
ratio of two methods is measured in the same run), the bytes each device sends into collectives
per step (operands of all-reduce / all-gather / reduce-scatter in the compiled HLO), what a ring
implementation of those collectives sends per device, the collective count, and the step's FLOPs from
`cost_analysis()`. On simulated CPU devices the
collectives are memory copies: the byte counts, not the times, say what a real interconnect pays.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import jpeft  # noqa: E402
from jpeft import distributed  # noqa: E402
from jpeft.methods.hd_pissa import HDPiSSA  # noqa: E402


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_integer("dim", 256, "width of every layer")
    flags.DEFINE_integer("layers", 4, "number of adapted dense layers")
    flags.DEFINE_integer("rank", 8, "per-device rank r (HD-PiSSA) = adapter rank (LoRA / PiSSA)")
    flags.DEFINE_integer("batch_per_device", 16, "micro-batch rows per device")
    flags.DEFINE_integer("steps", 20, "timed steps per round")
    flags.DEFINE_integer("rounds", 5, "interleaved timing rounds")
    flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate")
    flags.DEFINE_string("out_dir", "out/bench_hd_pissa", "where bench_hd_pissa.md is written")


FLAGS = flags.FLAGS


def base_params(dim, layers):
    keys = jax.random.split(jax.random.PRNGKey(0), layers)
    return {f"layer_{i}": {"kernel": jax.random.normal(k, (dim, dim)) / dim ** 0.5} for i, k in enumerate(keys)}


def forward(p, x):
    for i in range(len(p)):
        x = jnp.tanh(x @ p[f"layer_{i}"]["kernel"])
    return x


def setup(name, method, stepper, mesh, tx, batch):
    spec = jpeft.Spec({r"layer_\d+/kernel": method})
    params = jpeft.init(jax.random.PRNGKey(1), base_params(FLAGS.dim, FLAGS.layers), spec)
    teacher = jax.tree.map(lambda w: w + 0.05 * jnp.sign(w), base_params(FLAGS.dim, FLAGS.layers))

    def loss(p, x):
        return jnp.mean(jnp.square(forward(jpeft.apply(p, spec), x) - forward(teacher, x)))

    if stepper is distributed.hd_pissa_step:
        params, opt_state = distributed.place(params, tx, mesh)
    else:
        opt_state = tx.init(jpeft.split(params)[0])
    step = stepper(loss, tx, mesh)
    compiled = step.lower(params, opt_state, batch).compile()
    comm = distributed.collective_bytes(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"name": name, "step": step, "state": [params, opt_state], "comm": comm,
            "flops": float(cost.get("flops", float("nan"))), "times": [], "trainable": jpeft.count(params).trainable}


def ring_bytes(comm, k):
    """Bytes one device sends with ring algorithms: all-reduce 2(k−1)/k·B, all-gather (k−1)·B of
    its operand, reduce-scatter (k−1)/k·B."""
    return (2 * (k - 1) / k * comm["all-reduce"] + (k - 1) * comm["all-gather"]
            + (k - 1) / k * comm["reduce-scatter"])


def run_round(entry, batch, steps):
    params, opt_state = entry["state"]
    params, opt_state, value = entry["step"](params, opt_state, batch)   # not timed: sync point
    jax.block_until_ready(value)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, value = entry["step"](params, opt_state, batch)
    jax.block_until_ready((params, value))
    entry["times"].append((time.perf_counter() - start) / steps)
    entry["state"] = [params, opt_state]
    entry["loss"] = float(value)


def main(argv):
    del argv
    k = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("dp",))
    tx = optax.adam(FLAGS.learning_rate)
    batch = jax.random.normal(jax.random.PRNGKey(2), (k * FLAGS.batch_per_device, FLAGS.dim))
    r = FLAGS.rank
    entries = [
        setup("hd_pissa", HDPiSSA(rank=r, alpha=r, devices=k), distributed.hd_pissa_step, mesh, tx, batch),
        setup("dp_lora", jpeft.LoRA(rank=r, alpha=r), distributed.data_parallel_step, mesh, tx, batch),
        setup("dp_pissa", jpeft.PiSSA(rank=r, alpha=r), distributed.data_parallel_step, mesh, tx, batch),
    ]
    for _ in range(FLAGS.rounds):
        for entry in entries:
            run_round(entry, batch, FLAGS.steps)
    ref = statistics.median(entries[1]["times"])
    lines = [f"{k} simulated devices, {FLAGS.layers} layers {FLAGS.dim}x{FLAGS.dim}, rank {r}, "
             f"batch {FLAGS.batch_per_device}/device, {FLAGS.rounds}x{FLAGS.steps} steps, fp32",
             "| method | trainable/device | ms/step | vs dp_lora | collective operand B/step/device | collectives "
             "| all-reduce B | all-gather B | ring B sent/device | GFLOP/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        t = statistics.median(e["times"])
        per_device = e["trainable"] // k if e["name"] == "hd_pissa" else e["trainable"]
        c = e["comm"]
        lines.append(f"| {e['name']} | {per_device:,} | {1e3 * t:.2f} | {t / ref:.2f}x | {c['total']:,} | {c['count']} "
                     f"| {c['all-reduce']:,} | {c['all-gather']:,} | {ring_bytes(c, k):,.0f} "
                     f"| {e['flops'] / 1e9:.3f} |")
    print("\n".join(lines))
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "bench_hd_pissa.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
