"""Benchmark of the optimizer-side methods (`jpeft.optim`).

    python -m experiments.bench_optim                      # all three sections
    python -m experiments.bench_optim --sections=memory    # the state-bytes table only (instant)

1. memory:  optimizer-state bytes from `jax.eval_shape` (nothing allocated) for a LLaMA-7B-shaped
            tree (AdamW, GaLore r=1024, DCT-AdamW r=1024, Natural GaLore r=1024), beside the GaLore
            paper's figures; and LLaMA-1B weights + states beside the paper's Table 2.
2. refresh: projector refresh time at 4096×4096 and 4096×11008 — exact SVD, randomised SVD, DCT
            select (FFT and matmul paths) — as ratios to the exact SVD, measured in one run.
3. step:    steady-state training-step time (forward + backward + update) of each optimizer on the
            reference Llama workload (docs/design.md §8: vocab 4096, hidden 512, MLP 1376, 4 layers,
            batch 8×128, fp32) relative to `optax.adamw` in the same run. Refresh-based optimizers are
            timed twice — never refreshing and refreshing every step — and amortised over their gap:
            `t = t_steady + (t_refresh − t_steady) / gap`.

Wall times are quoted only as ratios inside one run; rounds are interleaved (A B C A B C …) and the
median per configuration is used, to damp drift on a shared machine.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import jpeft
import jpeft.optim as jo
from experiments.benchlib import TARGET, next_token_loss, reference_setup, xla_figures

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_list("sections", ["memory", "refresh", "step"], "which sections to run")
    flags.DEFINE_integer("refresh_rank", 1024, "projection rank for the refresh timings (GaLore 7B: 1024)")
    flags.DEFINE_integer("refresh_reps", 2, "timed repetitions per refresh method")
    flags.DEFINE_integer("model_rank", 128, "projection rank on the reference model (GaLore 60M, hidden 512: 128)")
    flags.DEFINE_integer("gap", 200, "update_proj_gap for the amortised step time (GaLore default)")
    flags.DEFINE_integer("lora_rank", 16, "LoRA rank for the LoRA-Pro row (docs/design.md §8)")
    flags.DEFINE_integer("rounds", 5, "interleaved timing rounds for the step section")
    flags.DEFINE_string("step_only", "", "regex: time only the step rows whose name it matches "
                        "(the optax.adamw baselines always run)")
    flags.DEFINE_integer("steps_per_round", 2, "steps timed per configuration per round")
    flags.DEFINE_integer("batch", 8, "sequences per step")
    flags.DEFINE_integer("seq", 128, "tokens per sequence")
    flags.DEFINE_string("out_dir", "out/bench_optim", "where bench_optim.md is written")


GB, GIB = 1e9, 2 ** 30
#: GaLore's reference projects only the attention and MLP matrices (`target_modules_list = ["attn", "mlp"]`).
PROJECTED = r".*/(self_attn|mlp)/\w+_proj/kernel"


# ----------------------------------------------------------------------------------------- memory
def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, dtype=jnp.float32) -> dict:
    """Abstract parameters of an untied LLaMA in Flax kernel layout `(in, out)`."""
    sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    tree: dict[str, Any] = {"embed": {"embedding": sds(vocab, hidden)}, "norm": {"scale": sds(hidden)},
            "lm_head": {"kernel": sds(hidden, vocab)}}
    for i in range(layers):
        tree[f"layers_{i}"] = {
            "self_attn": {f"{p}_proj": {"kernel": sds(hidden, hidden)} for p in "qkvo"},
            "mlp": {"gate_proj": {"kernel": sds(hidden, intermediate)},
                    "up_proj": {"kernel": sds(hidden, intermediate)},
                    "down_proj": {"kernel": sds(intermediate, hidden)}},
            "input_norm": {"scale": sds(hidden)}, "post_norm": {"scale": sds(hidden)}}
    return tree


def llama7b(dtype=jnp.float32):
    return llama_shapes(4096, 11008, 32, 32000, dtype)  # GaLore configs/llama_7b.json


def llama1b(dtype=jnp.float32):
    return llama_shapes(2048, 5461, 24, 32000, dtype)  # GaLore configs/llama_1b.json


def memory_optimizers(rank: int) -> dict[str, optax.GradientTransformation]:
    return {
        "AdamW (optax.adamw)": optax.adamw(1e-3),
        f"GaLore r={rank}": jo.galore(1e-3, rank=rank, include=PROJECTED),
        f"DCT-AdamW r={rank}": jo.dct_adamw(1e-3, rank=rank, include=PROJECTED),
        f"Natural GaLore r={rank}, s=20": jo.natural_galore(1e-3, rank=rank, include=PROJECTED),
        f"Natural GaLore r={rank}, s=1": jo.natural_galore(1e-3, rank=rank, include=PROJECTED, history=1),
    }


def split_bytes(tx, tree) -> tuple[int, int, int]:
    """(total, projector bytes, Adam-moment bytes) of `tx.init(tree)`."""
    by_path = jo.state_bytes(tx, tree, by_path=True)
    proj = sum(b for p, b in by_path.items() if "/basis/" in p)
    moments = sum(b for p, b in by_path.items() if p.endswith(("/mu", "/nu")) or "/mu/" in p or "/nu/" in p)
    return sum(by_path.values()), proj, moments


#: GaLore paper (Zhao et al. 2024), optimizer states only, LLaMA 7B, 8-bit states (Table 3, as quoted by
#: later work): 8-bit Adam 13G, 8-bit GaLore (r=1024) 4.9G; LLaMA 1B weights + states, BF16 (Table 2):
#: full-rank 7.80G, GaLore (r=512) 4.38G.
PAPER_7B = {"AdamW (optax.adamw)": "13G (8-bit Adam)", "GaLore r=1024": "4.9G (8-bit GaLore)"}
PAPER_1B = {"AdamW (optax.adamw)": "7.80G", "GaLore r=512": "4.38G"}


def memory_section() -> str:
    lines = ["### Optimizer state, LLaMA-7B shapes (6.74B params; attention + MLP projected)", "",
             "| optimizer | fp32 states | bf16 states | bf16: projectors / moments / other | 8-bit-equivalent* "
             "| paper |", "|---|---|---|---|---|---|"]
    for name, tx in memory_optimizers(1024).items():
        f32, _, _ = split_bytes(tx, llama7b(jnp.float32))
        b16, proj, moments = split_bytes(tx, llama7b(jnp.bfloat16))
        eight = b16 - moments / 2
        lines.append(f"| {name} | {f32 / GB:.2f} GB | {b16 / GB:.2f} GB | {proj / GB:.2f} / {moments / GB:.2f} / "
                     f"{(b16 - proj - moments) / GB:.2f} GB | {eight / GB:.2f} GB ({eight / GIB:.2f} GiB) | "
                     f"{PAPER_7B.get(name, '—')} |")
    lines += ["", "*bf16 state with the Adam moments at one byte (the paper's 8-bit Adam / 8-bit GaLore "
              "setting). Natural GaLore's 'other' is its gradient window (s low-rank gradients per matrix).", "",
              "### LLaMA-1B (1.34B params), bf16 weights + states, GaLore r=512", "",
              "| optimizer | weights + states | paper (Table 2) |", "|---|---|---|"]
    tree = llama1b(jnp.bfloat16)
    weights = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(tree))
    for name, tx in {"AdamW (optax.adamw)": optax.adamw(1e-3),
                     "GaLore r=512": jo.galore(1e-3, rank=512, include=PROJECTED)}.items():
        total = weights + jo.state_bytes(tx, tree)
        lines.append(f"| {name} | {total / GB:.2f} GB ({total / GIB:.2f} GiB) | {PAPER_1B[name]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- refresh
def time_call(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def refresh_section(rank: int, reps: int) -> str:
    lines = [f"### Projector refresh (rank {rank}; time relative to the exact SVD of the same matrix)", "",
             "| matrix | exact SVD | randomised SVD (2 power it., +8) | DCT select, FFT | DCT select, matmul |",
             "|---|---|---|---|---|"]
    key = jax.random.PRNGKey(0)
    for m, n in [(4096, 4096), (4096, 11008)]:
        g = jax.random.normal(key, (m, n), jnp.float32)
        side = jo.resolve_side("std", m, n)
        fits = {
            "exact": jax.jit(lambda g, k, side=side: jo.SVDProjector(rank, side).fit(g, k)),
            "randomized": jax.jit(lambda g, k, side=side: jo.SVDProjector(rank, side, method="randomized").fit(g, k)),
            "dct_fft": jax.jit(lambda g, k, side=side: jo.DCTProjector(rank, side, mode="fft").fit_down(g, k)),
            "dct_matmul": jax.jit(lambda g, k, side=side: jo.DCTProjector(rank, side, mode="matmul").fit_down(g, k)),
        }
        t = {name: time_call(f, g, key, reps=reps) for name, f in fits.items()}
        base = t["exact"]
        lines.append(f"| {m}×{n} | 1 | {t['randomized'] / base:.3f} ({base / t['randomized']:.1f}× faster) | "
                     f"{t['dct_fft'] / base:.4f} ({base / t['dct_fft']:.0f}× faster) | "
                     f"{t['dct_matmul'] / base:.3f} ({base / t['dct_matmul']:.1f}× faster) |")
        print(f"  refresh {m}x{n}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- step
def step_configs(model, params, ids, rank, gap, lora_rank):
    """`{name: (step, state, amortise_gap | None, group)}`; `step(state) -> state` is jitted."""

    def make(tx, loss_fn, trainable, frozen):
        @jax.jit
        def step(state):
            trainable, opt_state = state
            grads = jax.grad(loss_fn)(trainable, frozen)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        return step, (trainable, tx.init(trainable))

    full_loss = lambda p, _: next_token_loss(model.apply({"params": p}, ids), ids)  # noqa: E731
    never = 10 ** 9
    common = dict(include=PROJECTED)
    optimizers = {
        "optax.adamw": (lambda g: optax.adamw(1e-4), None),
        f"galore r={rank}": (lambda g: jo.galore(1e-4, rank=rank, update_proj_gap=g, **common), gap),
        f"galore r={rank} randomized": (lambda g: jo.galore(1e-4, rank=rank, update_proj_gap=g, svd="randomized",
                                                            **common), gap),
        f"dct_adamw r={rank} gap=1 (ref. default)": (lambda g: jo.dct_adamw(1e-4, rank=rank, **common), None),
        f"dct_adamw r={rank}": (lambda g: jo.dct_adamw(1e-4, rank=rank, update_proj_gap=g, **common), gap),
        f"natural_galore r={rank} s=20": (lambda g: jo.natural_galore(1e-4, rank=rank, update_proj_gap=g, **common),
                                           gap),
        f"owlore r={rank} 2 of 4 layers": (lambda g: jo.owlore(1e-4, [1.0, 2.0, 3.0, 4.0], n_active=2, rank=rank,
                                                               update_proj_gap=g, **common), gap),
    }
    out = {}
    for name, (build, amortise) in optimizers.items():
        if amortise is None:
            out[name] = (*make(build(None) if name != "optax.adamw" else build(None), full_loss, params, None),
                         None, "full")
        else:
            out[name + " [steady]"] = (*make(build(never), full_loss, params, None), None, "full")
            out[name + " [refresh]"] = (*make(build(1), full_loss, params, None), None, "full")
    spec = jpeft.Spec({TARGET: jpeft.LoRA(rank=lora_rank, alpha=2 * lora_rank)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), params, spec))
    lora_loss = lambda t, f: next_token_loss(  # noqa: E731
        model.apply({"params": jpeft.apply(jpeft.combine(t, f), spec)}, ids), ids)
    out[f"LoRA r={lora_rank} + optax.adamw"] = (*make(optax.adamw(1e-4), lora_loss, trainable, frozen), None, "lora")
    out[f"LoRA r={lora_rank} + lora_pro"] = (*make(jo.lora_pro(1e-4), lora_loss, trainable, frozen), None, "lora")
    return out


def step_section(rank, gap, lora_rank, rounds, per_round, batch, seq, only="") -> str:
    model, params, ids = reference_setup(batch, seq)
    baselines = ("optax.adamw", f"LoRA r={lora_rank} + optax.adamw")
    every = step_configs(model, params, ids, rank, gap, lora_rank)
    configs = {name: c for name, c in every.items() if name in baselines or re.search(only, name)}
    if only and not any(re.search(only, name) for name in every if name not in baselines):
        raise ValueError(f"--step_only={only!r} matches no step row; the rows are {sorted(every)}")
    states = {}
    for name, (step, state, _, _) in configs.items():
        t0 = time.perf_counter()
        states[name] = jax.block_until_ready(step(state))  # compile; first step fits the projectors
        print(f"  compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    gflops = {name: xla_figures(step, state)["gflops"] for name, (step, state, _, _) in configs.items()
              if not name.endswith(" [refresh]")}
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (step, _, _, _) in configs.items():
            t0 = time.perf_counter()
            s = states[name]
            for _ in range(per_round):
                s = step(s)
            jax.block_until_ready(s)
            samples[name].append((time.perf_counter() - t0) / per_round)
            states[name] = s
    med = {name: statistics.median(v) for name, v in samples.items()}
    base = {"full": med[baselines[0]], "lora": med[baselines[1]]}
    base_gflops = {"full": gflops[baselines[0]], "lora": gflops[baselines[1]]}
    lines = [f"### Training step on the reference Llama (batch {batch}×{seq}, fp32), relative to optax.adamw "
             f"on the same trainable tree", "",
             "| optimizer | steady-step FLOPs | steady step | refresh step | amortised (gap " + str(gap) + ") |",
             "|---|---|---|---|---|"]
    done = set()
    for name, (_, _, _, group) in configs.items():
        stem = name.replace(" [steady]", "").replace(" [refresh]", "")
        if stem in done:
            continue
        done.add(stem)
        b = base[group]
        if stem + " [steady]" in med:
            steady, refresh = med[stem + " [steady]"], med[stem + " [refresh]"]
            amortised = steady + (refresh - steady) / gap
            flops = gflops[stem + " [steady]"] / base_gflops[group]
            lines.append(f"| {stem} | {flops:.3f} | {steady / b:.3f} | {refresh / b:.3f} | {amortised / b:.3f} |")
        else:
            flops = gflops[stem] / base_gflops[group]
            lines.append(f"| {stem} | {flops:.3f} | {med[stem] / b:.3f} | — | {med[stem] / b:.3f} |")
    spread = max((max(v) - min(v)) / statistics.median(v) for v in samples.values())
    lines += ["", f"Baseline: optax.adamw full fine-tuning (LoRA rows: optax.adamw on the same LoRA tree). FLOPs "
              f"from `cost_analysis` (a `lax.cond` counts both branches' matmuls). Largest (max−min)/median of the "
              f"step times over rounds: {spread:.2f}."]
    return "\n".join(lines)


def main(argv):
    del argv
    header = f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)"
    print(header + "\n", flush=True)
    sections = [header]
    if "memory" in FLAGS.sections:
        sections.append(memory_section())
        print(sections[-1] + "\n", flush=True)
    if "refresh" in FLAGS.sections:
        sections.append(refresh_section(FLAGS.refresh_rank, FLAGS.refresh_reps))
        print(sections[-1] + "\n", flush=True)
    if "step" in FLAGS.sections:
        sections.append(step_section(FLAGS.model_rank, FLAGS.gap, FLAGS.lora_rank, FLAGS.rounds, FLAGS.steps_per_round,
                                     FLAGS.batch, FLAGS.seq, FLAGS.step_only))
        print(sections[-1] + "\n", flush=True)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "bench_optim.md"), "w") as f:
        f.write("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
