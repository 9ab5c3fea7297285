"""The main job: fine-tune a pretrained Flax LM with any registered jpeft method on a real task.

    python -m experiments.finetune                                   # SmolLM2-135M, LoRA, arithmetic
    python -m experiments.finetune --model=tiny --task=shakespeare --method=dora --rank=4 --steps=50
    python -m experiments.finetune --model=minilm --task=fortunes --steps=100 --batch=16   # topic classifier
    python -m experiments.finetune --method=pissa --method_options='{"svd_niter": 4}' \\
        --ckpt_dir=runs/ckpt --resume --export_hf=runs/hf_adapter

Prints the trainable-parameter count, the task metric before and after (exact-match accuracy for
arithmetic, perplexity for Shakespeare, test accuracy for the fortunes topic classifier) and, for
the LMs, the Shakespeare perplexity as a forgetting probe, with a progress bar; writes metrics.csv,
TensorBoard events and curves.png to --out_dir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from typing import TYPE_CHECKING, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from tqdm import tqdm

import jpeft
from experiments import scale, tasks
from experiments.runlog import RunLog, quiet_library_logs
from jpeft.checkpoint import CheckpointError, TrainCheckpointer
from jpeft.paths import leaves_with_paths
from jpeft.registry import method_with_defaults
from jpeft.registry import options as options_of

if TYPE_CHECKING:
    from tokenizers import Tokenizer

QUANT_CONFIGS = {"none": None, "nf4": jpeft.quant.nf4(), "int8": jpeft.quant.int8()}   # --quantize

flags.DEFINE_enum("model", "smollm2_135m", ["smollm2_135m", "tiny", "minilm"],
                  "base model (minilm: a mean-pooled BertClassifier on all-MiniLM-L6-v2, for --task=fortunes)")
flags.DEFINE_enum("task", "arithmetic", list(tasks.TASKS), "task")
flags.DEFINE_string("method", "lora", f"registry name, one of {jpeft.methods()}")
flags.DEFINE_integer("rank", None, "the method's `rank` option (default: the method's own; an error for a method "
                     "without one: set its size option with --method_options)")
flags.DEFINE_float("alpha", None, "the method's `alpha` option (default: the method's own; an error for a method "
                   "without one)")
flags.DEFINE_string("method_options", "", "more method options: a JSON object, or the path of a JSON file")
flags.DEFINE_string("target", None, "regex of the adapted leaves (default: TARGETS[--model])")
flags.DEFINE_integer("steps", 100, "optimizer steps")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("max_len", None, "tokens per sequence (default: 48 for smollm2_135m, 128 for tiny's bytes "
                     "and minilm)")
flags.DEFINE_float("learning_rate", 2e-3, "peak learning rate (linear warm-up, cosine decay)")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "galore", "dct_adamw"], "optimizer")
flags.DEFINE_integer("eval_count", 128, "test examples for the task metric")
flags.DEFINE_bool("forgetting", True, "also report Shakespeare perplexity before and after")
flags.DEFINE_string("data_dir", "runs/tfds", "where the TFDS datasets are built")
flags.DEFINE_string("out_dir", "runs/finetune", "metrics, TensorBoard events and the loss plot")
flags.DEFINE_string("ckpt_dir", "", "training checkpoints (empty: none)")
flags.DEFINE_integer("ckpt_every", 50, "steps between checkpoints")
flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --ckpt_dir")
flags.DEFINE_string("export_hf", "", "write the adapter in HuggingFace PEFT format to this folder")
flags.DEFINE_integer("stop_at", 0, "stop after this step (0: --steps); the schedule still spans --steps")
flags.DEFINE_string("mesh", "data=-1", "device mesh over every process's devices: sizes of the axes data, fsdp, "
                    "tensor by name, e.g. data=2,fsdp=2 (-1: the remaining devices). --batch is split over "
                    "data × fsdp (each process reads its own rows), the frozen weights are sharded over fsdp "
                    "(FSDP) and tensor, adapters and optimizer state follow their base weights; "
                    "--method=hd_pissa spreads its frames over data")
flags.DEFINE_enum("quantize", "none", list(QUANT_CONFIGS), "quantise the frozen block kernels (QUANTIZED[--model]) "
                  "before training: nf4 = QLoRA's NF4 with double quantisation, int8 = one scale per output channel; "
                  "the adapters train over the quantised base (docs/quant.md)")
flags.DEFINE_integer("seed", 0, "seed for the adapter init and the data order")
flags.DEFINE_bool("allow_nonfinite", False, "keep training after a non-finite loss or gradient (default: stop "
                  "with an error); an adapter with non-finite values is never exported")
FLAGS = flags.FLAGS

LM_TARGET = r"layers_\d+/(self_attn|mlp)/\w+_proj/kernel"
TARGETS = {"smollm2_135m": LM_TARGET, "tiny": LM_TARGET, "minilm": r"bert/layer_\d+/attention/(query|value)/kernel"}
QUANTIZED = {"smollm2_135m": LM_TARGET, "tiny": LM_TARGET, "minilm": r"bert/layer_\d+/.*/kernel"}  # --quantize
HEAD = r"classifier/(kernel|bias)"  # the classifier's head, trained fully (jpeft.Full) next to the adapters


class ByteTokenizer:
    """UTF-8 bytes as token ids (for the random-weight `tiny` model, vocab ≥ 256)."""

    @dataclasses.dataclass
    class Encoding:
        ids: list

    def encode(self, text: str) -> ByteTokenizer.Encoding:
        return self.Encoding(list(text.encode("utf-8")))


def load_model(name: str, num_labels: int | None = None):
    """`(flax module, params, tokenizer)`; `minilm` needs `num_labels` (its head is freshly initialised)."""
    from jpeft.models.llama import Llama, LlamaConfig

    if name == "minilm":
        from jpeft.models.bert import BertClassifier, init_classifier, load_minilm

        if num_labels is None:
            raise ValueError("load_model('minilm') needs num_labels (its classifier head is freshly initialised)")
        bert_config, encoder, bert_tokenizer = load_minilm()
        model = BertClassifier(bert_config, num_labels, pooling="mean")
        return model, init_classifier(jax.random.PRNGKey(0), model, encoder), bert_tokenizer

    tokenizer: Tokenizer | ByteTokenizer
    if name == "smollm2_135m":
        from jpeft.models.gguf_loader import load_smollm2

        config, params, tokenizer = load_smollm2()
    else:
        config, tokenizer = LlamaConfig.reference(), ByteTokenizer()
        # jitted: one compile instead of dispatching every initialiser op by op
        params = jax.jit(Llama(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return Llama(config), params, tokenizer


def hf_module_map(model):
    """The HF module names of `load_model`'s LM (for `--export_hf`)."""
    from jpeft.models.llama import hf_module_map as llama_map

    return llama_map(model.config)


def method_from_flags(mesh=None) -> jpeft.Method:
    """The method config the flags ask for, validated before anything is loaded. `--rank` /
    `--alpha` set the method's option of that name only when given, and are an error for a method
    without it; `--steps` fills `total_step` (AdaLoRA's schedule) and the mesh's `data` size fills
    `devices` (HD-PiSSA) unless the options set them."""
    if FLAGS.method not in jpeft.methods():
        raise app.UsageError(f"--method={FLAGS.method!r}: unknown; known methods: {', '.join(jpeft.methods())}")
    options = FLAGS.method_options
    if options and os.path.exists(options):
        with open(options) as f:
            options = f.read()
    try:
        extra = json.loads(options) if options else {}
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--method_options: not a JSON object or a JSON file ({e})") from e
    if not isinstance(extra, dict):
        raise app.UsageError(f"--method_options: expected a JSON object, got {extra!r}")
    accepted = options_of(FLAGS.method)
    for flag in ("rank", "alpha"):
        value = getattr(FLAGS, flag)
        if value is None:
            continue
        if flag not in accepted:
            raise app.UsageError(f"--{flag}: method {FLAGS.method!r} has no {flag!r} option; its options are "
                                 f"{sorted(accepted)} (set them with --method_options)")
        if flag in extra and extra[flag] != value:
            raise app.UsageError(f"--{flag}={value} and --method_options {flag}={extra[flag]!r} disagree; set it once")
        extra[flag] = value
    defaults = {"total_step": FLAGS.steps, **({"devices": mesh.shape["data"]} if mesh is not None else {})}
    try:
        method = method_with_defaults(FLAGS.method, defaults, **extra)
    except jpeft.SpecError as e:
        raise app.UsageError(f"--method={FLAGS.method} --method_options: {e}") from e
    if mesh is not None and method.per_device_leading:  # HD-PiSSA: one slice of frames per data device
        if method.devices != mesh.shape["data"]:
            raise app.UsageError(f"--method_options devices={method.devices}: --method={FLAGS.method} spreads its "
                                 f"frames over the mesh's data axis, which has {mesh.shape['data']} devices "
                                 f"(--mesh={scale.describe(mesh)})")
        if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
            raise app.UsageError(f"--mesh={scale.describe(mesh)}: --method={FLAGS.method} runs on the data axis "
                                 "only (fsdp=1, tensor=1)")
    return method


def optimizer(name: str, learning_rate: float, steps: int) -> optax.GradientTransformation:
    warmup = max(steps // 10, 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=0.0)
    import jpeft.optim

    return getattr(jpeft.optim, name)(schedule)


def train() -> dict:
    """One run as the flags describe it; returns the evaluations, final parameters, spec and figures.
    Every process of a multi-process job runs it (see `experiments.scale`)."""
    mesh = scale.make_mesh(scale.parse_mesh(FLAGS.mesh))  # flags first: nothing is loaded before they check out
    layout = scale.Layout(mesh)
    layout.check(FLAGS.batch, "--batch")
    method = method_from_flags(mesh)
    writer = scale.is_writer()
    say = print if writer else (lambda *args: None)
    task = tasks.TASKS[FLAGS.task]
    classifier = FLAGS.model == "minilm"
    if classifier != (task.kind == "classify"):
        raise ValueError(f"--model={FLAGS.model} does not fit --task={FLAGS.task}: minilm is the classifier "
                         f"(classification tasks: {[t for t, v in tasks.TASKS.items() if v.kind == 'classify']}); "
                         "smollm2_135m and tiny are the LMs")
    if classifier and FLAGS.export_hf:
        raise ValueError("--export_hf: HF export covers the LM models (smollm2_135m, tiny): minilm's classifier "
                         "mean-pools (sentence-transformers), transformers' BertForSequenceClassification reads the "
                         "pooler, so its PEFT export would not reproduce the run")
    if FLAGS.quantize != "none" and (not method.quantized_base or method.base_quant is not None):
        why = ("chooses and quantises its own base (loftq_bits)" if method.base_quant is not None else
               "does not take a quantised base (docs/quant.md lists those that do)")
        raise app.UsageError(f"--quantize={FLAGS.quantize} with --method={FLAGS.method}: {method!r} {why}")
    if FLAGS.quantize != "none" and FLAGS.export_hf and method.rewrites_base:
        init = cast(jpeft.LoRA, method).init  # only the LoRA family takes a quantised base (checked above)
        raise app.UsageError(f"--export_hf with --quantize={FLAGS.quantize} and init={init!r}: the exported "
                             "adapter would assume the full-precision residual base, which this run quantised")
    rules = {FLAGS.target or TARGETS[FLAGS.model]: method}
    if classifier:
        rules[HEAD] = jpeft.Full()
    spec = jpeft.Spec(rules)
    if FLAGS.export_hf:
        from jpeft.interop.hf import check_exportable

        try:
            check_exportable(spec)
        except jpeft.SpecError as e:
            raise app.UsageError(f"--export_hf with --method={FLAGS.method}: {e}") from e
    ckpt = TrainCheckpointer(FLAGS.ckpt_dir) if FLAGS.ckpt_dir else None
    try:
        return _train(mesh, layout, spec, task, classifier, ckpt, writer, say)
    finally:
        if ckpt:
            ckpt.close()


def quantized(params):
    """`params` (adapted, from the full-precision base) with the --quantize leaves quantised: the
    adapter bases there (QLoRA; a PiSSA-style residual: QPiSSA) and the untargeted kernels."""
    config = QUANT_CONFIGS[FLAGS.quantize]
    return params if config is None else jpeft.quantize(params, {QUANTIZED[FLAGS.model]: config})


def _train(mesh, layout, spec, task, classifier, ckpt, writer, say) -> dict:
    resume = ckpt.latest_step() if ckpt and FLAGS.resume else None
    if resume is not None:
        try:
            ckpt.check_spec(spec, resume)  # before the model loads
        except CheckpointError as e:
            raise app.UsageError(f"--resume --ckpt_dir={FLAGS.ckpt_dir}: {e}") from e
    max_len = FLAGS.max_len or {"smollm2_135m": 48, "tiny": 128, "minilm": 128}[FLAGS.model]
    from experiments.data import source

    probe = FLAGS.forgetting and task.name != "shakespeare" and not classifier  # the probe is an LM's
    builders = [task.builder] + ([tasks.TASKS["shakespeare"].builder] if probe else [])
    info = scale.process_0_first(lambda: [source.prepared(b, FLAGS.data_dir).info for b in builders])[0]
    num_labels = info.features["label"].num_classes if classifier else None
    model, base, tokenizer = load_model(FLAGS.model, num_labels)
    train_ds = tasks.batches(task, tokenizer, FLAGS.data_dir, "train", FLAGS.batch, max_len, FLAGS.seed,
                             rows=layout.rows(FLAGS.batch))  # this process's rows of every batch
    calib = None
    if any(m.needs_calib for _, m in spec.rules):  # e.g. LoRA-GA: the base model's gradient on one batch
        # (the whole first batch, on every process: it is one batch, once)
        full = tasks.batches(task, tokenizer, FLAGS.data_dir, "train", FLAGS.batch, max_len, FLAGS.seed)[0]
        first = {k: jnp.asarray(v) for k, v in full.items()}
        calib = jax.grad(lambda p: tasks.loss(task, model.apply({"params": p}, *tasks.model_inputs(task, first)),
                                              first))(base)
    params = quantized(jpeft.init(jax.random.PRNGKey(FLAGS.seed), base, spec, calib=calib))
    quant_note = "" if FLAGS.quantize == "none" else (
        f" over a {FLAGS.quantize} base ({jpeft.quant.stored_bytes(jpeft.split(params)[1]) / 2 ** 20:.1f} MB frozen)")
    say(f"{FLAGS.model} + {spec.rules[0][1]!r}{quant_note}\nparameters: {jpeft.count(params)}\n"
        f"mesh: {scale.describe(mesh)} over {jax.process_count()} process{'es' if jax.process_count() > 1 else ''}")

    tx = optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.steps)
    train_sh, frozen_sh, opt_sh = shardings = scale.state_shardings(params, base, spec, tx, mesh)
    trainable, frozen = scale.put(jpeft.split(params), (train_sh, frozen_sh))
    del params
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    rep = scale.replicated(mesh)
    start, rng, data_it = 0, np.asarray(jax.random.PRNGKey(FLAGS.seed)), iter(train_ds)
    if resume is not None:  # restored replicated on this mesh, then moved to the training shardings
        state = ckpt.restore(base, opt_state, step=resume, spec=spec, sharding=rep)
        trainable, frozen = scale.put(jpeft.split(quantized(state["params"])), (train_sh, frozen_sh))
        opt_state = scale.reshard(state["opt_state"], opt_sh)
        start, rng = state["step"], np.asarray(state["rng"])
        data_it.set_state(state["data_state"])
        say(f"resumed from step {start}")

    run = jpeft.factored(model.apply, spec)

    step = scale.make_step(lambda params, batch: tasks.loss(task, run({"params": params},
                                                                      *tasks.model_inputs(task, batch)), batch),
                           spec, tx, mesh, layout, shardings)
    scalar = lambda x: scale.put(np.asarray(x), rep)  # noqa: E731  (the same on every process)
    compiled = step.lower(trainable, frozen, opt_state, layout.put(train_ds[0]), scalar(np.int32(1)),
                          scalar(rng)).compile()
    memory = compiled.memory_analysis()
    peak_mb = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2 ** 20

    logits = lambda p, *inputs: run({"params": p}, *inputs)  # noqa: E731  (one function: one compile per task)

    def evaluate(trainable, frozen, which):
        params = jpeft.combine(trainable, frozen)
        scores = tasks.evaluate(task, logits, params, tokenizer, FLAGS.data_dir, FLAGS.eval_count, 16, max_len, layout)
        out = {task.metric: scores["metric"], **({} if task.metric == "loss" else {"test_loss": scores["loss"]})}
        if probe:
            lm = tasks.TASKS["shakespeare"]
            out["shakespeare_perplexity"] = tasks.evaluate(lm, logits, params, tokenizer, FLAGS.data_dir, 32, 16, 128,
                                                           layout)["metric"]
        say(f"{which}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    log = RunLog(FLAGS.out_dir, enabled=writer)
    stop, seconds = FLAGS.stop_at or FLAGS.steps, []
    try:
        before = evaluate(trainable, frozen, "before")
        log.log(start, **{f"eval_{k}": v for k, v in before.items()})
        bar = tqdm(range(start, stop), desc="fine-tuning", initial=start, total=stop, disable=not writer)
        for i in bar:
            rng, key = np.asarray(jax.random.split(rng))
            batch = layout.put(next(data_it))
            t0 = time.perf_counter()
            trainable, frozen, opt_state, metrics = compiled(trainable, frozen, opt_state, batch,
                                                             scalar(np.int32(i + 1)), scalar(key))
            metrics = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            seconds.append(time.perf_counter() - t0)
            log.log(i + 1, **metrics)
            if not all(math.isfinite(v) for v in metrics.values()):
                named = ", ".join(f"{k} ({metrics[k]})" for k in ("loss", "grad_norm") if k in metrics)
                message = (f"step {i + 1}: non-finite {named}" +
                           f"; check the data, the base weights and --learning_rate={FLAGS.learning_rate}")
                if not FLAGS.allow_nonfinite:
                    raise FloatingPointError(f"{message}. Stopped (--allow_nonfinite continues); nothing exported")
                say(f"warning: {message}; continuing (--allow_nonfinite)")
            if ckpt and ((i + 1) % FLAGS.ckpt_every == 0 or i + 1 == stop):  # every process saves its shards
                ckpt.save(i + 1, params=jpeft.combine(trainable, frozen), spec=spec, opt_state=opt_state, rng=rng,
                          data_state=data_it.get_state())
        after = evaluate(trainable, frozen, "after")
        log.log(stop, **{f"eval_{k}": v for k, v in after.items()})
    finally:
        log.close()
    if FLAGS.export_hf:
        host = scale.host_params(jpeft.combine(trainable, frozen), base)  # every process takes part
        bad = [p for p, x in leaves_with_paths(jpeft.split(host)[0]) if not np.all(np.isfinite(x))]
        if bad:
            raise FloatingPointError(f"--export_hf: the adapters have non-finite values ({bad[:3]}); not exported")
        if writer:
            from jpeft.interop.hf import export_peft

            export_peft(FLAGS.export_hf, host, spec, overwrite=True, modules=hf_module_map(model),
                        task_type="CAUSAL_LM")
    return {"before": before, "after": after, "params": jpeft.combine(trainable, frozen), "spec": spec,
            "trainable": jpeft.count(jpeft.combine(trainable, frozen)).trainable, "peak_mb": peak_mb,
            "step_s": statistics.median(seconds[1:] or seconds or [float("nan")])}


def main(argv):
    del argv
    quiet_library_logs()
    train()  # app.run exits with main's return value: return nothing


if __name__ == "__main__":
    app.run(main)
