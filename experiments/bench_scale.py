"""What the runner's step costs each device as the mesh grows (issue: scale-out for real).

    python -m experiments.bench_scale            # 8 simulated CPU devices, the reference Llama

Every row compiles the runner's own training step (`experiments.finetune.make_step` with the
shardings of `state_shardings`) for one mesh over the first N simulated devices, with a fixed
global batch, and reads deterministic figures from the compiled executable:

- `gflops/dev`: `cost_analysis()` FLOPs of the partitioned (per-device) program;
- collective bytes: operands of every all-reduce / all-gather / reduce-scatter in the compiled
  HLO, per device (`jpeft.distributed.collective_bytes`), beside the trainable gradient bytes;
- `frozen_mb/dev`: the frozen weights one device holds (shard shapes of their shardings), and
  `args_mb/dev` from `memory_analysis()`.

On simulated CPU devices the collectives are memory copies: the byte counts, not the times, say
what a real interconnect pays.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import jpeft  # noqa: E402
from experiments import scale, tasks  # noqa: E402
from experiments.benchlib import TARGET, write_table  # noqa: E402
from jpeft.distributed import collective_bytes  # noqa: E402
from jpeft.models.llama import Llama, LlamaConfig  # noqa: E402


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_integer("batch", 16, "global batch (sequences per step)")
    flags.DEFINE_integer("seq", 64, "tokens per sequence")
    flags.DEFINE_integer("rank", 16, "LoRA rank; HD-PiSSA uses rank/devices per device (the same total rank)")
    flags.DEFINE_string("out_dir", "out/bench_scale", "where bench_scale.md / .csv are written")


FLAGS = flags.FLAGS
LM = tasks.TASKS["shakespeare"]  # plain next-token loss on {"ids", "mask"}


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _device_bytes(tree, shardings) -> int:
    return sum(math.prod(s.shard_shape(np.shape(x))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def figures(model, base, method: jpeft.Method, mesh, batch: int, seq: int, target: str = TARGET) -> dict:
    """The compiled runner step's per-device figures for `method` on `target` over `mesh`."""
    spec = jpeft.Spec({target: method})
    params = jpeft.init(jax.random.PRNGKey(0), base, spec)
    tx = optax.adamw(1e-3)
    shardings = scale.state_shardings(params, base, spec, tx, mesh)
    train_sh, frozen_sh, opt_sh = shardings
    trainable, frozen = jpeft.split(params)
    layout = scale.Layout(mesh)
    run = jpeft.factored(model.apply, spec)
    step = scale.make_step(lambda p, b: tasks.loss(LM, run({"params": p}, b["ids"]), b), spec, tx, mesh, layout,
                           shardings)
    rows = {"ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=layout.sharding),
            "mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=layout.sharding)}
    rep = scale.replicated(mesh)
    compiled = step.lower(_abstract(trainable, train_sh), _abstract(frozen, frozen_sh),
                          _abstract(jax.eval_shape(tx.init, trainable), opt_sh), rows,
                          jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                          jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    comm = collective_bytes(compiled.as_text())
    memory = compiled.memory_analysis()
    return {"mesh": scale.describe(mesh), "method": method.name, "gflops/dev": cost["flops"] / 1e9,
            "all_reduce_mb": comm["all-reduce"] / 2 ** 20, "all_gather_mb": comm["all-gather"] / 2 ** 20,
            "reduce_scatter_mb": comm["reduce-scatter"] / 2 ** 20, "collectives": comm["count"],
            "grad_mb": _bytes(trainable) / 2 ** 20, "frozen_mb/dev": _device_bytes(frozen, frozen_sh) / 2 ** 20,
            "args_mb/dev": memory.argument_size_in_bytes / 2 ** 20}


def table(batch: int = 16, seq: int = 64, rank: int = 16, config: LlamaConfig | None = None,
          sizes: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """The rows of every section (see the module docstring); `section` names each. `config`:
    the model (default: the reference Llama); `sizes`: the `data` (and `fsdp`) sizes measured."""
    config = config or LlamaConfig.reference()
    model = Llama(config)
    base = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    devices = jax.devices()
    mesh = lambda n, **sizes: scale.make_mesh(sizes, devices[:n])  # noqa: E731
    lora = jpeft.LoRA(rank=rank)
    rows = []
    one = None
    for n in sizes:
        if n > len(devices):
            break
        row = {"section": "data parallel LoRA", **figures(model, base, lora, mesh(n, data=n), batch, seq)}
        one = one or row["gflops/dev"]
        rows.append({**row, "flops×N/flops(1)": row["gflops/dev"] * n / one,
                     "all_reduce/grad": row["all_reduce_mb"] / row["grad_mb"]})
    n = min(max(sizes), len(devices))
    full = figures(model, base, jpeft.Full(), mesh(n, data=n), batch, seq, target=".*")
    rows.append({"section": "full fine-tuning", **full, "all_reduce/grad": full["all_reduce_mb"] / full["grad_mb"]})
    hd = figures(model, base, jpeft.method("hd_pissa", rank=rank // n, devices=n), mesh(n, data=n), batch, seq)
    rows.append({"section": f"HD-PiSSA r={rank // n}×{n} vs LoRA r={rank}", **hd})
    fsdp_one = None
    for k in sizes:
        if k > n:
            break
        row = figures(model, base, lora, mesh(n, data=n // k, fsdp=k), batch, seq)
        fsdp_one = fsdp_one or row["frozen_mb/dev"]
        rows.append({"section": "FSDP LoRA", **row, "frozen/(frozen(1)/N)": row["frozen_mb/dev"] * k / fsdp_one})
    return rows


COLUMNS = ["section", "mesh", "method", "gflops/dev", "flops×N/flops(1)", "all_reduce_mb", "all_gather_mb",
           "reduce_scatter_mb", "collectives", "grad_mb", "all_reduce/grad", "frozen_mb/dev", "frozen/(frozen(1)/N)",
           "args_mb/dev"]


def main(argv):
    del argv
    rows = table(FLAGS.batch, FLAGS.seq, FLAGS.rank)
    print(write_table(rows, COLUMNS, os.path.join(FLAGS.out_dir, "bench_scale")))


if __name__ == "__main__":
    define_flags()
    app.run(main)
