"""The main job: fine-tune a pretrained Flax LM with any registered jpeft method on a real task.

    python -m experiments.finetune                                   # SmolLM2-135M, LoRA, arithmetic
    python -m experiments.finetune --model=tiny --task=shakespeare --method=dora --rank=4 --steps=50
    python -m experiments.finetune --model=minilm --task=fortunes --steps=100 --batch=16   # topic classifier
    python -m experiments.finetune --method=pissa --method_options='{"svd_niter": 4}' \\
        --ckpt_dir=runs/ckpt --resume --export_hf=runs/hf_adapter

Prints the trainable-parameter count, the task metric before and after (exact-match accuracy for
arithmetic, perplexity for Shakespeare, test accuracy for the fortunes topic classifier) and, for
the LMs, the Shakespeare perplexity as a forgetting probe, with a progress bar; writes metrics.csv, TensorBoard events and curves.png to --out_dir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from tqdm import tqdm

import jpeft
from experiments import tasks
from experiments.runlog import RunLog
from jpeft.checkpoint import TrainCheckpointer
from jpeft.paths import leaves_with_paths
from jpeft.registry import method_with_defaults
from jpeft.registry import options as options_of

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
flags.DEFINE_integer("seed", 0, "seed for the adapter init and the data order")
flags.DEFINE_bool("allow_nonfinite", False, "keep training after a non-finite loss or gradient (default: stop "
                  "with an error); an adapter with non-finite values is never exported")
FLAGS = flags.FLAGS

LM_TARGET = r"layers_\d+/(self_attn|mlp)/\w+_proj/kernel"
TARGETS = {"smollm2_135m": LM_TARGET, "tiny": LM_TARGET, "minilm": r"bert/layer_\d+/attention/(query|value)/kernel"}
HEAD = r"classifier/(kernel|bias)"  # the classifier's head, trained fully (jpeft.Full) next to the adapters


class ByteTokenizer:
    """UTF-8 bytes as token ids (for the random-weight `tiny` model, vocab ≥ 256)."""

    @dataclasses.dataclass
    class Encoding:
        ids: list

    def encode(self, text: str) -> "ByteTokenizer.Encoding":
        return self.Encoding(list(text.encode("utf-8")))


def load_model(name: str, num_labels: int | None = None):
    """`(flax module, params, tokenizer)`; `minilm` needs `num_labels` (its head is freshly initialised)."""
    from jpeft.models.llama import Llama, LlamaConfig

    if name == "minilm":
        from jpeft.models.bert import BertClassifier, init_classifier, load_minilm

        config, encoder, tokenizer = load_minilm()
        model = BertClassifier(config, num_labels, pooling="mean")
        return model, init_classifier(jax.random.PRNGKey(0), model, encoder), tokenizer

    if name == "smollm2_135m":
        from jpeft.models.gguf_loader import load_smollm2

        config, params, tokenizer = load_smollm2()
    else:
        config, tokenizer = LlamaConfig.reference(), ByteTokenizer()
        params = Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return Llama(config), params, tokenizer


def method_from_flags() -> jpeft.Method:
    """The method config the flags ask for, validated before anything is loaded. `--rank` /
    `--alpha` set the method's option of that name only when given, and are an error for a method
    without it; `--steps` fills `total_step` (AdaLoRA's schedule) unless the options set it."""
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
    try:
        return method_with_defaults(FLAGS.method, {"total_step": FLAGS.steps}, **extra)
    except jpeft.SpecError as e:
        raise app.UsageError(f"--method={FLAGS.method} --method_options: {e}") from e


def optimizer(name: str, learning_rate: float, steps: int) -> optax.GradientTransformation:
    warmup = max(steps // 10, 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=0.0)
    import jpeft.optim

    return getattr(jpeft.optim, name)(schedule)


def train() -> dict:
    """One run as the flags describe it; returns the evaluations, final parameters, spec and figures."""
    method = method_from_flags()   # before any model or data is loaded
    task = tasks.TASKS[FLAGS.task]
    classifier = FLAGS.model == "minilm"
    if classifier != (task.kind == "classify"):
        raise ValueError(f"--model={FLAGS.model} does not fit --task={FLAGS.task}: minilm is the classifier "
                         f"(classification tasks: {[t for t, v in tasks.TASKS.items() if v.kind == 'classify']}); "
                         "smollm2_135m and tiny are the LMs")
    if classifier and FLAGS.export_hf:
        raise ValueError("--export_hf: HF export covers the LM models (smollm2_135m, tiny), not minilm's "
                         "adapters + fully trained head")
    max_len = FLAGS.max_len or {"smollm2_135m": 48, "tiny": 128, "minilm": 128}[FLAGS.model]
    num_labels = None
    if classifier:
        from experiments.data import source

        num_labels = source.prepared(task.builder, FLAGS.data_dir).info.features["label"].num_classes
    model, base, tokenizer = load_model(FLAGS.model, num_labels)
    rules = {FLAGS.target or TARGETS[FLAGS.model]: method}
    if classifier:
        rules[HEAD] = jpeft.Full()
    spec = jpeft.Spec(rules)
    train_ds = tasks.batches(task, tokenizer, FLAGS.data_dir, "train", FLAGS.batch, max_len, FLAGS.seed)
    calib = None
    if any(m.needs_calib for _, m in spec.rules):  # e.g. LoRA-GA: the base model's gradient on one batch
        first = {k: jnp.asarray(v) for k, v in train_ds[0].items()}
        calib = jax.grad(lambda p: tasks.loss(task, model.apply({"params": p}, *tasks.model_inputs(task, first)),
                                              first))(base)
    params = jpeft.init(jax.random.PRNGKey(FLAGS.seed), base, spec, calib=calib)
    print(f"{FLAGS.model} + {spec.rules[0][1]!r}\nparameters: {jpeft.count(params)}")

    run = jpeft.factored(model.apply, spec)
    tx = optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.steps)
    trainable, frozen = jpeft.split(params)
    opt_state, start, rng, data_it = tx.init(trainable), 0, jax.random.PRNGKey(FLAGS.seed), iter(train_ds)
    ckpt = TrainCheckpointer(FLAGS.ckpt_dir) if FLAGS.ckpt_dir else None
    if ckpt and FLAGS.resume and ckpt.latest_step() is not None:
        state = ckpt.restore(base, opt_state, spec=spec)
        trainable, frozen = jpeft.split(state["params"])
        opt_state, start, rng = state["opt_state"], state["step"], state["rng"]
        data_it.set_state(state["data_state"])
        print(f"resumed from step {start}")

    def evaluate(trainable, frozen, which):
        logits = lambda *inputs: run({"params": jpeft.combine(trainable, frozen)}, *inputs)  # noqa: E731
        out = {task.metric: tasks.evaluate(task, logits, tokenizer, FLAGS.data_dir, FLAGS.eval_count, 16,
                                           max_len)["metric"]}
        if FLAGS.forgetting and task.name != "shakespeare" and not classifier:  # the probe is an LM's
            lm = tasks.TASKS["shakespeare"]
            out["shakespeare_perplexity"] = tasks.evaluate(lm, logits, tokenizer, FLAGS.data_dir, 32, 16, 128)["metric"]
        print(f"{which}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    @jax.jit
    def step(trainable, frozen, opt_state, batch, count, key):
        loss, grads = jax.value_and_grad(
            lambda t: tasks.loss(task, run({"params": jpeft.combine(t, frozen)}, *tasks.model_inputs(task, batch)),
                                 batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        params, opt_state = jpeft.after_step(jpeft.combine(optax.apply_updates(trainable, updates), frozen),
                                             opt_state, spec, step=count, key=key, grads=grads)
        return (*jpeft.split(params), opt_state, loss, optax.global_norm(grads))

    batch0 = {k: jnp.asarray(v) for k, v in train_ds[0].items()}
    memory = step.lower(trainable, frozen, opt_state, batch0, 1, rng).compile().memory_analysis()
    peak_mb = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2 ** 20
    log = RunLog(FLAGS.out_dir)
    stop, seconds = FLAGS.stop_at or FLAGS.steps, []
    try:
        before = evaluate(trainable, frozen, "before")
        log.log(start, **{f"eval_{k}": v for k, v in before.items()})
        for i in (bar := tqdm(range(start, stop), desc="fine-tuning", initial=start, total=stop)):
            rng, key = jax.random.split(rng)
            batch = {k: jnp.asarray(v) for k, v in next(data_it).items()}
            t0 = time.perf_counter()
            trainable, frozen, opt_state, loss, grad_norm = step(trainable, frozen, opt_state, batch, i + 1, key)
            loss, grad_norm = float(loss), float(grad_norm)
            bar.set_postfix(loss=f"{loss:.3f}")
            seconds.append(time.perf_counter() - t0)
            log.log(i + 1, loss=loss, grad_norm=grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                message = (f"step {i + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); check the "
                           f"data, the base weights and --learning_rate={FLAGS.learning_rate}")
                if not FLAGS.allow_nonfinite:
                    raise FloatingPointError(f"{message}. Stopped (--allow_nonfinite continues); nothing exported")
                print(f"warning: {message}; continuing (--allow_nonfinite)")
            if ckpt and ((i + 1) % FLAGS.ckpt_every == 0 or i + 1 == stop):
                ckpt.save(i + 1, params=jpeft.combine(trainable, frozen), spec=spec, opt_state=opt_state, rng=rng,
                          data_state=data_it.get_state())
        after = evaluate(trainable, frozen, "after")
        log.log(stop, **{f"eval_{k}": v for k, v in after.items()})
    finally:
        log.close()
        if ckpt:
            ckpt.close()
    if FLAGS.export_hf:
        bad = [p for p, x in leaves_with_paths(trainable) if not bool(jnp.all(jnp.isfinite(x)))]
        if bad:
            raise FloatingPointError(f"--export_hf: the adapters have non-finite values ({bad[:3]}); not exported")
        from jpeft.interop.hf import default_module_path, export_peft

        export_peft(FLAGS.export_hf, jpeft.combine(trainable, frozen), spec, overwrite=True,
                    module_path=lambda p: "model." + default_module_path(p), task_type="CAUSAL_LM")
    return {"before": before, "after": after, "params": jpeft.combine(trainable, frozen), "spec": spec,
            "trainable": jpeft.count(params).trainable, "peak_mb": peak_mb,
            "step_s": statistics.median(seconds[1:] or seconds or [float("nan")])}


def main(argv):
    del argv
    train()  # app.run exits with main's return value: return nothing


if __name__ == "__main__":
    app.run(main)
