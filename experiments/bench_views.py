"""Factored LoRA on models jpeft did not write: DenseGeneral attention, and the whole decoder as an
`nn.scan` stack (the MaxText layout), beside a hand-written factored LoRA and qwix's LoRA.

    python -m experiments.bench_views [--out_dir=out/bench_views] [--qwix=true]

(also run by `python -m experiments.bench_step`, after its own table).

The reference workload's shapes (docs/design.md §8: vocab 4096, hidden 512, MLP 1376, 4 layers, 8
heads, batch 8×128, fp32, r=16 on all seven projections, AdamW), written with Flax's own layers:
q/k/v `DenseGeneral` kernels `(512, 8, 64)`, o `(8, 64, 512)`, Dense MLP; variant `dg` loops over
the layers, variant `scan` stacks them with `nn.scan` (kernels `(4, ...)`). Per row: XLA FLOPs
(`cost_analysis`), peak bytes (`memory_analysis`: arguments + temporaries + non-aliased outputs of
a donating step), and the number of live values shaped like an adapted kernel (or its matrix
view, or one layer's slice) that depend on the trainable leaves (`jpeft.inspect`): dense deltas.
XLA:CPU's `cost_analysis` counts a scan body once, so `scan` rows' FLOPs are per layer plus the
rest; compare them with each other, not with `dg` rows.
"""

from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import jpeft
from experiments.benchlib import define_workload_flags, next_token_loss, train_step, write_table, xla_figures
from jpeft.inspect import big_dependents, kernel_shapes

VOCAB, HIDDEN, MLP, LAYERS, HEADS = 4096, 512, 1376, 4, 8
HEAD_DIM = HIDDEN // HEADS
TARGET = r".*/(q|k|v|o|gate|up|down)/kernel"


def define_flags() -> None:
    define_workload_flags("out/bench_views")
    flags.DEFINE_bool("qwix", True, "also build qwix's LoRA when qwix is installed")


FLAGS = flags.FLAGS


class Block(nn.Module):
    """A Llama-style block from Flax layers. `hand_rank > 0` writes `x@W + s·(x@a)@b` into every
    projection by hand (the floor), with `a`, `b` in the `lora` collection."""

    hand_rank: int = 0

    def proj(self, name, h, features, axis=-1):
        layer = nn.DenseGeneral(features, axis=axis, use_bias=False, name=name)
        y = layer(h)
        if not self.hand_rank:
            return y
        axes = (axis,) if isinstance(axis, int) else axis
        flat = h.reshape(*h.shape[:h.ndim - len(axes)], -1)
        out = (features,) if isinstance(features, int) else tuple(features)
        r = self.hand_rank
        a = self.variable("lora", f"{name}_a", lambda: 0.01 * jnp.ones((flat.shape[-1], r))).value
        b = self.variable("lora", f"{name}_b", lambda: 0.01 * jnp.ones((r, math.prod(out)))).value
        return y + (2.0 * ((flat @ a) @ b)).reshape(y.shape)

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.RMSNorm(name="attn_norm")(x)
        q = self.proj("q", h, (HEADS, HEAD_DIM))
        k = self.proj("k", h, (HEADS, HEAD_DIM))
        v = self.proj("v", h, (HEADS, HEAD_DIM))
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.proj("o", nn.dot_product_attention(q, k, v, mask=mask), HIDDEN, axis=(-2, -1))
        h = nn.RMSNorm(name="mlp_norm")(x)
        x = x + self.proj("down", nn.silu(self.proj("gate", h, MLP)) * self.proj("up", h, MLP), HIDDEN)
        return x, None


class Decoder(nn.Module):
    scan: bool = False
    hand_rank: int = 0

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, HIDDEN, name="embed")(ids)
        if self.scan:
            stack = nn.scan(Block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                            length=LAYERS)
            x, _ = stack(hand_rank=self.hand_rank, name="layers")(x, None)
        else:
            for i in range(LAYERS):
                x, _ = Block(hand_rank=self.hand_rank, name=f"layers_{i}")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def _make(loss_fn, trainable, frozen, tx):
    return (*train_step(loss_fn, trainable, frozen, tx), loss_fn)


def qwix_row(model, ids, rank):
    """qwix's LoRA on the same model (its own rules: every DenseGeneral of the seven projections)."""
    try:
        import qwix
    except ImportError:
        return None
    provider = qwix.LoraProvider(module_path=r".*/(q|k|v|o|gate|up|down)", rank=rank, alpha=2.0 * rank)
    lora_model = qwix.apply_lora_to_model(model, provider)
    params = lora_model.init(jax.random.PRNGKey(0), ids)["params"]
    is_lora = lambda path: bool(re.search(r"lora", path))  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(kp) for kp, _ in flat]
    treedef = jax.tree_util.tree_structure(params)
    trainable = treedef.unflatten([x if is_lora(p) else None for p, (_, x) in zip(paths, flat)])
    frozen = treedef.unflatten([None if is_lora(p) else x for p, (_, x) in zip(paths, flat)])
    combine = lambda t, f: jax.tree.map(lambda a, b: a if b is None else b, f, t, is_leaf=lambda x: x is None)  # noqa: E731
    return lambda t, f: next_token_loss(lora_model.apply({"params": combine(t, f)}, ids), ids), trainable, frozen


def rows_for(variant, batch, seq, rank, with_qwix):
    model = Decoder(scan=variant == "scan")
    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, VOCAB)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    views = jpeft.infer_views(model.apply, {"params": params}, ids)
    tx = optax.adamw(1e-4)
    out = {"full": _make(lambda p, _: next_token_loss(model.apply({"params": p}, ids), ids), params, None, tx)}
    spec = jpeft.Spec({TARGET: jpeft.LoRA(rank=rank, alpha=2 * rank)}, views=views)
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), params, spec))
    shapes = kernel_shapes(jpeft.combine(trainable, frozen))
    out["lora_materialised"] = _make(lambda t, f: next_token_loss(
        model.apply({"params": jpeft.apply(jpeft.combine(t, f), spec)}, ids), ids), trainable, frozen, tx)
    run = jpeft.factored(model.apply, spec)
    out["lora_factored"] = _make(lambda t, f: next_token_loss(run({"params": jpeft.combine(t, f)}, ids), ids),
                                 trainable, frozen, tx)
    hand = Decoder(scan=variant == "scan", hand_rank=rank)
    lora = hand.init(jax.random.PRNGKey(0), ids)["lora"]
    out["lora_hand"] = _make(lambda t, p: next_token_loss(hand.apply({"params": p, "lora": t}, ids), ids),
                             lora, params, tx)
    q = qwix_row(model, ids, rank) if with_qwix else None
    if q is not None:
        out["qwix_lora"] = _make(q[0], q[1], q[2], tx)
    return out, shapes


def table(batch, seq, rank, with_qwix):
    rows = []
    for variant in ("dg", "scan"):
        configs, shapes = rows_for(variant, batch, seq, rank, with_qwix)
        figures = {name: xla_figures(step, state) for name, (step, state, _) in configs.items()}
        for name, (_step, state, loss_fn) in configs.items():
            trainable, frozen, _ = state
            dense = "" if name == "full" else len(big_dependents(
                jax.grad(loss_fn), (trainable, frozen), lambda p, leaf: p.split("/")[0] == "0", shapes=shapes))
            rows.append({"variant": variant, "config": name, **figures[name],
                         "flops_vs_hand": figures[name]["gflops"] / figures["lora_hand"]["gflops"],
                         "peak_vs_full": figures[name]["peak_mb"] / figures["full"]["peak_mb"],
                         "dense_deltas": dense})
    return rows


class Layers(nn.Module):
    """One of each Flax layer kind a fine-tuner adapts, for the coverage table."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB // 8, 64, name="embed")
        x = emb(ids)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="mha")(x)
        h = nn.DenseGeneral((4, 16), name="dense_general")(x)
        x = x + nn.Einsum((4, 16, 64), "bthd,hdo->bto", name="einsum")(h)
        w = self.param("custom_einsum", nn.initializers.normal(0.02), (64, 64))
        x = jnp.tanh(jnp.einsum("btd,de->bte", x, w))
        x = nn.Conv(64, (3,), name="conv")(x)
        return emb.attend(nn.Dense(64, name="dense")(x))


#: Coverage rows: (layer, parameter-path prefix in `Layers`, what the row exercises).
COVERAGE = [("Dense", "dense"), ("DenseGeneral", "dense_general"), ("MultiHeadDotProductAttention", "mha"),
            ("Einsum", "einsum"), ("custom jnp.einsum", "custom_einsum"), ("Conv", "conv"),
            ("Embed (lookup + attend)", "embed")]


def coverage(rank=4):
    """Per layer kind: does jpeft's LoRA run it factored, and does qwix's LoRA adapt it?"""
    import warnings

    model = Layers()
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, VOCAB // 8)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    views = jpeft.infer_views(model.apply, {"params": params}, ids)
    rows = []
    for layer, prefix in COVERAGE:
        target = rf"{prefix}(/.*)?/(kernel|embedding)|{prefix}"
        spec = jpeft.Spec({target: jpeft.LoRA(rank=rank)}, views=views)
        tree = jpeft.init(jax.random.PRNGKey(1), params, spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jax.eval_shape(lambda t, spec=spec: jpeft.factored(model.apply, spec)({"params": t}, ids), tree)
        fell_back = any("jpeft.factored" in str(w.message) for w in caught)
        rows.append({"layer": layer, "jpeft_lora": "materialised" if fell_back else "factored",
                     "qwix_lora": _qwix_covers(model, ids, prefix, rank)})
    return rows


def _qwix_covers(model, ids, prefix, rank) -> str:
    try:
        import qwix
    except ImportError:
        return "not installed"
    provider = qwix.LoraProvider(module_path=rf"{prefix}(/.*)?", rank=rank, alpha=2.0 * rank)
    try:
        params = qwix.apply_lora_to_model(model, provider).init(jax.random.PRNGKey(0), ids)["params"]
    except Exception as e:  # noqa: BLE001 - the table records what qwix does with the layer
        return f"error ({type(e).__name__})"
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params.get(prefix, {}))[0]]
    return "adapted" if any("lora" in p for p in paths) else "not adapted"


COLUMNS = ["variant", "config", "gflops", "flops_vs_hand", "peak_mb", "peak_vs_full", "temp_mb", "dense_deltas"]


def main(argv):
    del argv
    rows = table(FLAGS.batch, FLAGS.seq, FLAGS.rank, FLAGS.qwix)
    print(write_table(rows, COLUMNS, os.path.join(FLAGS.out_dir, "bench_views")))
    print(write_table(coverage(), ["layer", "jpeft_lora", "qwix_lora"], os.path.join(FLAGS.out_dir, "coverage")))


if __name__ == "__main__":
    define_flags()
    app.run(main)
