"""QLoRA's memory on the reference workload: fp32 LoRA, NF4 QLoRA, int8 LoRA, full fine-tuning, and
qwix's NF4 LoRA, one table (issue "QLoRA and quantisation-aware adapters").

    python -m experiments.bench_quant [--batch=8] [--seq=128] [--rank=16] [--out_dir=out/bench_quant]

The reference Llama (docs/design.md §8: vocab 4096, hidden 512, MLP 1376, 4 layers, fp32), r=16 on all
seven projections of every layer, AdamW, one donating training step. Per row, from the arrays and
the compiled step (deterministic figures):

- `frozen_mb`: the frozen weights as stored (`jpeft.quant.stored_bytes`: packed codes and scales);
- `opt_mb`: the optimizer state;
- `temp_mb`, `peak_mb` (arguments + temporaries + non-aliased outputs), `gflops`: `memory_analysis`
  and `cost_analysis` of the step.

The projections are quantised (QLoRA's choice); embeddings and norms stay fp32. qwix's row uses its
own `LoraProvider(weight_qtype="nf4", tile_size=32)` (blocks of 32 along the contraction: qwix tiles
only evenly and 64 does not divide the MLP's 1376; fp32 scales, no double
quantisation; docs/quant.md, "Against qwix"), run through its interception of the model's `Dense`s.
"""

from __future__ import annotations

import re

import jax
import numpy as np
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
from jpeft.paths import leaves_with_paths

COLS = ["config", "frozen_mb", "opt_mb", "temp_mb", "peak_mb", "gflops"]
ROWS = ("lora_fp32", "qlora_nf4", "lora_int8", "full", "qwix_qlora_nf4")
QUANT = {"qlora_nf4": jpeft.quant.nf4(), "lora_int8": jpeft.quant.int8()}


def define_flags() -> None:
    define_workload_flags("out/bench_quant")


def _mb(tree) -> float:
    return jpeft.quant.stored_bytes(tree) / 2 ** 20


def jpeft_row(name, model, params, ids, rank, tx):
    """`(step, state)` of one jpeft configuration: full fine-tuning, or LoRA factored over the
    fp32 / quantised projections."""
    if name == "full":
        return train_step(lambda p, _: next_token_loss(model.apply({"params": p}, ids), ids), params, None, tx)
    spec = jpeft.Spec({TARGET: jpeft.LoRA(rank=rank, alpha=2 * rank)})
    base = jpeft.quantize(params, {TARGET: QUANT[name]}) if name in QUANT else params
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), base, spec))
    run = jpeft.factored(model.apply, spec)
    return train_step(lambda t, f: next_token_loss(run({"params": jpeft.combine(t, f)}, ids), ids),
                      trainable, frozen, tx)


def qwix_row(model, ids, rank, tx):
    """qwix's QLoRA on the same model, or None without qwix."""
    try:
        import qwix
    except ImportError:
        return None
    provider = qwix.LoraProvider(module_path=r".*(q|k|v|o|gate|up|down)_proj", rank=rank, alpha=2.0 * rank,
                                 weight_qtype="nf4", tile_size=32)
    lora_model = qwix.apply_lora_to_model(model, provider)
    params = lora_model.init(jax.random.PRNGKey(0), ids)["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    is_lora = [bool(re.search("lora", jax.tree_util.keystr(kp))) for kp, _ in flat]
    trainable = treedef.unflatten([x if t else None for t, (_, x) in zip(is_lora, flat)])
    frozen = treedef.unflatten([None if t else x for t, (_, x) in zip(is_lora, flat)])
    combine = lambda t, f: jax.tree.map(lambda a, b: a if b is None else b, f, t, is_leaf=lambda x: x is None)  # noqa: E731
    return train_step(lambda t, f: next_token_loss(lora_model.apply({"params": combine(t, f)}, ids), ids),
                      trainable, frozen, tx)


def table(batch: int, seq: int, rank: int, rows=ROWS) -> list[dict]:
    model, params, ids = reference_setup(batch, seq)
    tx = optax.adamw(1e-4)
    out = []
    for name in rows:
        made = qwix_row(model, ids, rank, tx) if name.startswith("qwix") else jpeft_row(name, model, params, ids,
                                                                                           rank, tx)
        if made is None:
            continue
        step, state = made
        trainable, frozen, opt_state = state
        frozen_mb = _mb(frozen) if frozen is not None else 0.0
        out.append({"config": name, "frozen_mb": frozen_mb, "opt_mb": _mb(opt_state), **xla_figures(step, state)})
    return out


def layer_kernels_mb() -> float:
    """One decoder layer's targeted kernels in fp32: the most QLoRA's step temporaries may exceed
    fp32 LoRA's (one layer dequantised at a time, never the whole model)."""
    _, params, _ = reference_setup(1, 8)
    sizes = [np.size(x) for p, x in leaves_with_paths(params)
             if re.fullmatch(TARGET, p) and p.startswith("layers_0/")]
    return sum(sizes) * 4 / 2 ** 20


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    rows = table(FLAGS.batch, FLAGS.seq, FLAGS.rank)
    print(write_table(rows, COLS, f"{FLAGS.out_dir}/bench_quant"))
    print(f"one layer's fp32 kernels (the allowance for qlora's temp_mb over lora_fp32's): {layer_kernels_mb():.3f} MB")


if __name__ == "__main__":
    define_flags()
    app.run(main)
