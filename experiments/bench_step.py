"""Training-step cost on the reference workload (docs/design.md §8): XLA FLOPs, bytes, wall time.

    python -m experiments.bench_step [--steps=10] [--hf=true] [--views=true] [--out_dir=out/bench_step]

Rows: full fine-tuning, LoRA materialised (`jpeft.apply`), LoRA factored (`jpeft.factored`),
a hand-written factored LoRA (`x@W + s·(x@A)@B` in the model itself: the floor), PiSSA and DoRA
(factored) — r=16 on all seven projections of a Llama-shaped model (vocab 4096, hidden 512, MLP
1376, 4 layers, 8 heads, batch 8×128, fp32), AdamW. FLOPs come from `cost_analysis`, bytes from
`memory_analysis` (arguments + temporaries of a step that donates its state, as a training loop
does; see `benchlib.jit_step`), wall time is the median step. When torch and peft are
installed the same configurations run in HF PEFT in the same process, interleaved with the JAX
steps, and each row gets the ratio jpeft / HF PEFT. With `--views` (default) the two Flax-layer
variants of the same workload follow (`experiments/bench_views.py`: attention as `DenseGeneral`
3-D kernels, and the decoder as one `nn.scan` stack, beside a hand-written LoRA and qwix's).
"""

from __future__ import annotations

import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import jpeft
from experiments.benchlib import (
    TARGET,
    define_workload_flags,
    next_token_loss,
    reference_setup,
    train_step,
    write_table,
    xla_figures,
)
from jpeft.models.llama import LlamaConfig


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_integer("steps", 10, "timed steps per configuration")
    define_workload_flags("out/bench_step")
    flags.DEFINE_bool("hf", True, "also time HF PEFT (torch) when it is installed")
    flags.DEFINE_bool("views", True, "also the DenseGeneral / nn.scan variants (experiments/bench_views.py)")


FLAGS = flags.FLAGS


def hand_lora_apply(model, rank, alpha):
    """The floor: the model with `x@W + s·(x@A)@B` written into every targeted Dense (A, B in
    their own collection), no jpeft machinery."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dense) or context.method_name != "__call__" or "_proj" not in module.name:
            return next_fun(*args, **kwargs)
        x = args[0]
        a = module.variable("lora", "a", lambda: jnp.zeros((x.shape[-1], rank))).value
        b = module.variable("lora", "b", lambda: jnp.zeros((rank, module.features))).value
        return x @ module.get_variable("params", "kernel") + (alpha / rank) * ((x @ a) @ b)

    def apply(variables, ids):
        with nn.intercept_methods(intercept):
            return model.apply(variables, ids)

    def init(params, ids):
        with nn.intercept_methods(intercept):
            lora = model.apply({"params": params}, ids, mutable=["lora"])[1]["lora"]
        return jax.tree.map(lambda z: z + 0.01, lora)

    return apply, init


def jax_configs(model, params, ids, rank):
    """`{name: (train_step, state)}`; `train_step(state) -> (state, loss)` is jitted."""
    tx = optax.adamw(1e-4)

    def make(loss_fn, trainable, frozen):
        return train_step(loss_fn, trainable, frozen, tx)

    out = {"full": make(lambda p, _: next_token_loss(model.apply({"params": p}, ids), ids), params, None)}
    for name, method, path in [("lora_materialised", jpeft.LoRA(rank=rank, alpha=2 * rank), "materialised"),
                               ("lora_factored", jpeft.LoRA(rank=rank, alpha=2 * rank), "factored"),
                               ("pissa_factored", jpeft.PiSSA(rank=rank, alpha=2 * rank), "factored"),
                               ("dora_factored", jpeft.DoRA(rank=rank, alpha=2 * rank), "factored")]:
        spec = jpeft.Spec({TARGET: method})
        trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), params, spec))
        if path == "materialised":
            loss = lambda t, f, spec=spec: next_token_loss(  # noqa: E731
                model.apply({"params": jpeft.apply(jpeft.combine(t, f), spec)}, ids), ids)
        else:
            run = jpeft.factored(model.apply, spec)
            loss = lambda t, f, run=run: next_token_loss(run({"params": jpeft.combine(t, f)}, ids), ids)  # noqa: E731
        out[name] = make(loss, trainable, frozen)
    hand_apply, hand_init = hand_lora_apply(model, rank, 2 * rank)
    out["lora_hand"] = make(lambda lora, p: next_token_loss(hand_apply({"params": p, "lora": lora}, ids), ids),
                            hand_init(params, ids), params)
    return out


def hf_configs(config: LlamaConfig, rank, batch, seq):
    """`{name: step()}` for HF PEFT on the same model shape (torch CPU), or {} without torch."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, rms_norm_eps=config.rms_eps)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def make(lora):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(hf_config)
        if lora is not None:
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                               **lora))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            return float(loss)

        return step

    return {"full": make(None), "lora_factored": make({}), "pissa_factored": make({"init_lora_weights": "pissa"}),
            "dora_factored": make({"use_dora": True})}


def measure(jax_rows, hf_rows, steps):
    """Median step seconds per configuration, JAX and torch steps interleaved."""
    # Steps donate their state and rows share the frozen weights: each row runs on its own copy.
    states = {name: jax.tree.map(jnp.copy, state) for name, (_, state) in jax_rows.items()}
    for name, (step, _) in jax_rows.items():  # compile and warm up
        states[name] = jax.block_until_ready(step(states[name]))[0]
    for fn in hf_rows.values():
        fn()
    times = {("jax", n): [] for n in jax_rows} | {("hf", n): [] for n in hf_rows}
    for _ in range(steps):
        for name, (step, _) in jax_rows.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(step(states[name]))[0]
            times[("jax", name)].append(time.perf_counter() - t0)
            if name in hf_rows:
                t0 = time.perf_counter()
                hf_rows[name]()
                times[("hf", name)].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def table(model, params, ids, rank, steps, with_hf):
    config = model.config
    rows = jax_configs(model, params, ids, rank)
    hf_rows = hf_configs(config, rank, *ids.shape) if with_hf else {}
    timed = measure(rows, hf_rows, steps)
    out = []
    for name, (step, state) in rows.items():
        row = {"config": name, **xla_figures(step, state), "step_s": timed[("jax", name)]}
        if ("hf", name) in timed:
            row["hf_step_s"] = timed[("hf", name)]
            row["jpeft_over_hf"] = row["step_s"] / row["hf_step_s"]
        out.append(row)
    full = next(r for r in out if r["config"] == "full")
    for row in out:
        row["flops_vs_full"] = row["gflops"] / full["gflops"]
        row["peak_vs_full"] = row["peak_mb"] / full["peak_mb"]
    return out


def main(argv):
    del argv
    model, params, ids = reference_setup(FLAGS.batch, FLAGS.seq)
    rows = table(model, params, ids, FLAGS.rank, FLAGS.steps, FLAGS.hf)
    cols = ["config", "gflops", "flops_vs_full", "peak_mb", "peak_vs_full", "temp_mb", "step_s", "hf_step_s",
            "jpeft_over_hf"]
    print(write_table(rows, cols, os.path.join(FLAGS.out_dir, "bench_step")))
    if FLAGS.views:
        from experiments import bench_views
        rows = bench_views.table(FLAGS.batch, FLAGS.seq, FLAGS.rank, with_qwix=True)
        print(write_table(rows, bench_views.COLUMNS, os.path.join(FLAGS.out_dir, "bench_views")))


if __name__ == "__main__":
    define_flags()
    app.run(main)
