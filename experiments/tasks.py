"""Fine-tuning tasks for causal LMs: token batches for training and the task's metric.

- `arithmetic`: "Question: …\nAnswer: 42\n"; the loss covers the answer tokens only; the metric
  is exact match — every answer token (and the closing newline) is the argmax given the prompt
  and the answer so far, which is exactly when greedy decoding writes the answer and stops.
- `shakespeare`: plain language modelling; the metric is perplexity on held-out works (also the
  "forgetting" probe of any fine-tuning run).
- `fortunes`: topic classification (kind `"classify"`, for an encoder classifier such as MiniLM's
  `BertClassifier`): batches carry `ids`, `mask` (attention mask) and `label`; the loss is
  cross-entropy of the logits and the metric is accuracy (argmax of the logits).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import arithmetic, fortunes, shakespeare, source


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    builder: type
    encode: Callable[[object, dict, int], dict]   # (tokenizer, example, max_len) -> {"ids", "mask"}
    metric: str                                   # "accuracy" or "perplexity"
    kind: str = "lm"                              # "lm" (causal LM on ids) or "classify" (ids, mask -> logits)


def arithmetic_example(tokenizer, example, max_len):
    prompt = tokenizer.encode(f"Question: {example['question']}\nAnswer:").ids
    answer = tokenizer.encode(f" {example['answer']}\n").ids
    if len(prompt) + len(answer) > max_len:
        raise ValueError(f"an arithmetic example needs {len(prompt) + len(answer)} tokens, more than "
                         f"max_len={max_len}: raise --max_len")
    return _pack(prompt + answer, [0] * len(prompt) + [1] * len(answer), max_len)


def lm_example(tokenizer, example, max_len):
    ids = tokenizer.encode(example["text"]).ids[:max_len]
    return _pack(ids, [0] + [1] * (len(ids) - 1), max_len)


def classify_example(tokenizer, example, max_len):
    """Tokens (cut to `max_len`, keeping the closing special token), attention mask and label."""
    ids = tokenizer.encode(example["text"]).ids
    if len(ids) > max_len:
        ids = ids[:max_len - 1] + ids[-1:]
    return {**_pack(ids, [1] * len(ids), max_len), "label": np.asarray(example["label"], np.int32)}


def _pack(ids, mask, max_len):
    """Right-pad (or cut) to `max_len`; `mask[i]` says whether token i is predicted by the loss."""
    ids, mask = ids[:max_len], mask[:max_len]
    pad = max_len - len(ids)
    return {"ids": np.asarray(ids + [0] * pad, np.int32), "mask": np.asarray(mask + [0] * pad, np.float32)}


TASKS = {
    "arithmetic": Task("arithmetic", arithmetic.Arithmetic, arithmetic_example, "accuracy"),
    "shakespeare": Task("shakespeare", shakespeare.Shakespeare, lm_example, "perplexity"),
    "fortunes": Task("fortunes", fortunes.Fortunes, classify_example, "accuracy", kind="classify"),
}


def model_inputs(task: Task, batch: dict) -> tuple:
    """The model's positional inputs for a batch: `(ids,)` for an LM, `(ids, mask)` for a classifier."""
    return (batch["ids"], batch["mask"]) if task.kind == "classify" else (batch["ids"],)


def loss(task: Task, logits: jax.Array, batch: dict) -> jax.Array:
    """The training loss of `task`: masked next-token loss, or classification cross-entropy."""
    if task.kind == "classify":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    return masked_loss(logits, batch)


def batches(task: Task, tokenizer, data_dir: str, split: str, batch: int, max_len: int, seed: int = 0,
            repeat: bool = True, rows: tuple[int, int] | None = None) -> grain.MapDataset:
    """Batches of `batch` encoded examples (shuffled and repeated for training). `rows=(start,
    stop)`: only those rows of every batch (a process's share in a multi-process run): the process
    reads and encodes only its own examples."""
    ds = source.dataset(task.builder, data_dir, split)
    if repeat:
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map(lambda ex: task.encode(tokenizer, ex, max_len))
    start, stop = rows or (0, batch)
    size = stop - start
    if not (0 <= start < stop <= batch) or start % size or batch % size:
        raise ValueError(f"rows={rows}: expected a block of equal-sized blocks of a batch of {batch}")
    return ds.batch(size)[start // size::batch // size]


def token_losses(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Next-token cross-entropy at positions 1..L-1 (predicting `ids[:, 1:]`)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])


def masked_loss(logits: jax.Array, batch: dict) -> jax.Array:
    mask = batch["mask"][:, 1:]
    return jnp.sum(token_losses(logits, batch["ids"]) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _valid(batch: dict, n: int) -> jax.Array:
    """Per-row weights: `batch["valid"]` (0 for the padding rows of a last batch), else ones."""
    return batch["valid"] if "valid" in batch else jnp.ones((n,), jnp.float32)


def batch_metrics(logits: jax.Array, batch: dict) -> dict:
    """Sums over the batch: masked loss, predicted tokens, and exactly-right sequences."""
    valid = _valid(batch, logits.shape[0])
    mask = batch["mask"][:, 1:] * valid[:, None]
    right = (jnp.argmax(logits[:, :-1], -1) == batch["ids"][:, 1:]) | (mask == 0)
    return {"loss_sum": jnp.sum(token_losses(logits, batch["ids"]) * mask), "tokens": jnp.sum(mask),
            "exact": jnp.sum(jnp.all(right, axis=1) * valid), "sequences": jnp.sum(valid)}


def class_metrics(logits: jax.Array, batch: dict) -> dict:
    """Sums over the batch for a classifier: cross-entropy and right predictions (argmax)."""
    valid = _valid(batch, logits.shape[0])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"loss_sum": jnp.sum(losses * valid), "tokens": jnp.sum(valid),
            "exact": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid), "sequences": jnp.sum(valid)}


@functools.lru_cache(maxsize=16)
def _metrics_fn(task: Task, logits_fn):
    """The jitted per-batch sums, one per `(task, logits_fn)`: evaluating before and after training
    (or on several layouts of the same shapes) compiles once."""
    per_batch = class_metrics if task.kind == "classify" else batch_metrics
    return jax.jit(lambda p, b: per_batch(logits_fn(p, *model_inputs(task, b)), b))


def evaluate(task: Task, logits_fn, params, tokenizer, data_dir: str, count: int, batch: int, max_len: int,
             layout=None) -> dict:
    """The task metric on exactly the first `count` test examples, `logits_fn(params,
    *model_inputs(task, batch)) -> logits` (jitted here). The last batch is padded with zero-weight
    rows (one compile). `layout` (`experiments.scale.Layout`) spreads each batch over a mesh: the
    batch is rounded up to a multiple of its shards, each process reads only its rows, and the
    sums come back reduced over all devices (every example evaluated once)."""
    shards = layout.shards if layout else 1
    batch = -(-max(1, min(batch, count)) // shards) * shards
    rows = layout.rows(batch) if layout else (0, batch)
    ds = batches(task, tokenizer, data_dir, "test", batch, max_len, repeat=False, rows=rows)
    available = len(source.dataset(task.builder, data_dir, "test"))
    if count > available:
        raise ValueError(f"{task.name}: {count} test examples asked, the test split has {available}")
    metrics_fn = _metrics_fn(task, logits_fn)
    totals: dict[str, float] = {}
    size = rows[1] - rows[0]
    for i in range(-(-count // batch)):
        local = dict(ds[i]) if i < len(ds) else {}
        real = len(local["ids"]) if local else 0
        if real < size:  # past the end of the split: zero rows (weight 0)
            like = dict(ds[0])
            local = {k: np.concatenate([local[k][:real] if local else v[:0], np.zeros((size - real, *v.shape[1:]),
                                                                                       v.dtype)])
                     for k, v in like.items()}
        index = i * batch + rows[0] + np.arange(size)
        local["valid"] = ((index < count) & (np.arange(size) < real)).astype(np.float32)
        placed = layout.put(local) if layout else {k: jnp.asarray(v) for k, v in local.items()}
        for k, v in metrics_fn(params, placed).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
    out = {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": totals["exact"] / totals["sequences"]}
    return {"metric": out[task.metric], **out}
