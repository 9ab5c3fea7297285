"""Any Flax model: N-D kernels through views, scanned stacks, every standard layer, custom layers,
factored (docs/any_model.md).

Models we did not write: Flax's own `MultiHeadDotProductAttention`, `DenseGeneral`, `Einsum`,
`Embed` (lookup and tied `attend`) and `nn.scan`; NNX's `MultiHeadAttention`, `LinearGeneral`,
`Einsum`, `Embed`; custom layers calling `jnp.dot` / `jnp.einsum` / `jnp.matmul` /
`lax.dot_general`. On each: the factored path equals the materialised one (outputs and gradients)
and, walking the jaxpr of the gradient step (`jpeft/inspect.py`), no live value as large as an
adapted kernel slice depends on the adapters' trainable leaves (`jpeft.inspect`).

Method × layer pairs covered by the no-dense-delta check (`FACTORED_METHODS` on every model):
lora, dora, pissa, lora_xs (SVD core), adalora (adaptive), lori (bank), gralora (block),
sltrain (low-rank + sparse), ether_plus (orthogonal), on the Linen encoder (Embed lookup + attend,
MHA q/k/v/out, DenseGeneral, Einsum, Dense), the `nn.scan` decoder (DenseGeneral q/k/v/o, Dense
MLP, stacked (layers, …) kernels), the NNX model (Embed + attend, MultiHeadAttention,
LinearGeneral, Einsum, Linear), the `nnx.scan` + `nnx.remat` stack (LinearGeneral in/out, Linear MLP) and the
custom-op layer (jnp.dot, jnp.einsum, jnp.matmul, lax.dot_general), and recurrentgemma's Griffin from PyPI
(attention, MLP einsum, recurrent linears, RG-LRU block-diagonal gates with per-head batch axes). RandLoRA is
not in the list: its factored form scales `min(in, out)/r` random bases, an `in×out`-sized buffer by
construction (the conformance table checks its equality).
"""

from __future__ import annotations

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jpeft
from jpeft.inspect import big_dependents, kernel_shapes
from jpeft.methods import adaptive, bank, block, lowrank_sparse, orthogonal, svdcore

D, H, HD, F, V = 32, 2, 16, 64, 40   # kernels >= 32*32 elements; activations below that


# ------------------------------------------------------------------------ the models
class Encoder(nn.Module):
    """Linen: Embed, MHA (DenseGeneral q/k/v/out), DenseGeneral, Einsum, Dense, tied attend."""

    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(V, D, name="emb")
        x = emb(tok)
        x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, name="mha")(x)
        h = nn.DenseGeneral((H, HD), name="dg")(x)
        x = x + nn.Einsum((H, HD, D), "bthd,hdo->bto", name="ein")(h)
        x = jnp.tanh(nn.Dense(D, name="dense")(x))
        return emb.attend(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.RMSNorm(name="n1")(x)
        q = nn.DenseGeneral((H, HD), use_bias=False, name="q")(h)
        k = nn.DenseGeneral((H, HD), use_bias=False, name="k")(h)
        v = nn.DenseGeneral((H, HD), use_bias=False, name="v")(h)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(nn.dot_product_attention(q, k, v))
        h = nn.RMSNorm(name="n2")(x)
        g = nn.Dense(F, use_bias=False, name="gate")(h)
        u = nn.Dense(F, use_bias=False, name="up")(h)
        return x + nn.Dense(D, use_bias=False, name="down")(nn.silu(g) * u), None


class ScanDecoder(nn.Module):
    """A Llama-style decoder as one `nn.scan` stack (the MaxText layout: kernels `(layers, ...)`)."""

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(V, D, name="emb")(tok)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)
        return nn.Dense(V, name="lm_head")(x)


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.mha = nnx.MultiHeadAttention(num_heads=H, in_features=D, qkv_features=D, decode=False, rngs=rngs)
        self.lg = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.ein = nnx.Einsum("bthd,hdo->bto", (H, HD, D), rngs=rngs)
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, tok):
        x = self.emb(tok)
        x = x + self.mha(x)
        x = x + self.ein(self.lg(x))
        return self.emb.attend(jnp.tanh(self.lin(x)))


class CustomOps(nn.Module):
    """A custom layer passing its kernels to the public op functions."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.2)
        w1 = self.param("w_dot", init, (D, D))
        w2 = self.param("w_einsum", init, (H, D, HD))
        w3 = self.param("w_matmul", init, (D, D))
        w4 = self.param("w_dg", init, (D, D))
        x = jnp.tanh(jnp.dot(x, w1))
        h = jnp.einsum("btd,ndh->btnh", x, w2).reshape(*x.shape[:-1], D)
        x = jnp.tanh(jnp.matmul(h, w3))
        return lax.dot_general(x, w4, (((x.ndim - 1,), (0,)), ((), ())))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.LinearGeneral(D, (H, HD), rngs=rngs)
        self.out = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.out(jnp.tanh(self.attn(x)))
        return x + self.down(nnx.gelu(self.up(x)))


class NNXScan(nnx.Module):
    """NNX: a stack of blocks made with `nnx.vmap`, run with `nnx.scan` over `nnx.remat`
    (kernels `(3, ...)`)."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tok):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def layer(x, block):
            return nnx.remat(lambda b, h: b(h))(block, x)

        return self.head(layer(self.emb(tok), self.blocks))


TOK = jax.random.randint(jax.random.PRNGKey(7), (1, 5), 0, V)
XF = jax.random.normal(jax.random.PRNGKey(8), (1, 5, D))


def _linen(model, x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return model.apply, variables, x


def _griffin():
    """recurrentgemma's Griffin (PyPI, third-party Flax): a tiny config, random weights."""
    import recurrentgemma.jax as rg

    cfg = rg.GriffinConfig(vocab_size=V, width=D, mlp_expanded_width=F, num_heads=H,
                           block_types=(rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION),
                           embeddings_scale_by_sqrt_dim=True, attention_window_size=8, logits_soft_cap=30.0)
    model = rg.Griffin(cfg)
    pos = jnp.arange(TOK.shape[1])[None]
    variables = model.init(jax.random.PRNGKey(0), TOK, pos)
    return (lambda v, tok, p: model.apply(v, tok, p)[0]), variables, (TOK, pos)


def _nnx(cls):
    graphdef, state = nnx.split(cls(nnx.Rngs(0)))
    return graphdef, state, TOK


MODELS = {
    "linen_encoder": (lambda: _linen(Encoder(), TOK), r".*(emb/embedding|kernel)", None),
    "scan_decoder": (lambda: _linen(ScanDecoder(), TOK), r"layers/.*/kernel", None),
    "nnx": (lambda: _nnx(NNXModel), r".*(embedding|kernel)", None),
    "nnx_scan": (lambda: _nnx(NNXScan), r"blocks/.*/kernel", None),
    "custom_ops": (lambda: _linen(CustomOps(), XF), r"w_.*", None),
    # Griffin: attention and MLP projections, the recurrent block's linears and the RG-LRU's
    # block-diagonal gates (einsum "... h i, h i j -> ... h j": per-head batch axes)
    "griffin": (_griffin, r"blocks\.\d/(attention_block/proj_\w+/kernel|mlp_block/(ffw_up/w|ffw_down/kernel)"
                          r"|recurrent_block/(linear_\w+/kernel|rg_lru/\w+_gate/w))", None),
}

#: Models whose activations outnumber their smallest kernel slice: the no-dense check matches
#: kernel shapes (`jpeft.inspect.kernel_shapes`) instead of sizes.
BY_SHAPE = {"griffin"}

FACTORED_METHODS = {
    "lora": jpeft.LoRA(rank=2, alpha=4),
    "dora": jpeft.DoRA(rank=2, alpha=4),
    "pissa": jpeft.PiSSA(rank=2, alpha=2),
    "lora_xs": svdcore.LoRAXS(rank=2),
    "adalora": adaptive.AdaLoRA(init_r=4, target_r=2, alpha=8.0, total_step=10),
    "lori": bank.LoRI(rank=2, alpha=8.0),
    "gralora": block.GraLoRA(rank=4, alpha=8.0, k=2),
    "sltrain": lowrank_sparse.SLTrain(rank=2, alpha=4, density=0.05),
    "ether_plus": orthogonal.ETHERPlus(n_blocks=2),
}


#: Methods with a factored embedding lookup and tied `attend` (`lookup`, `matmul_t`); the others
#: adapt the embedding through its materialised weight, so the no-dense check leaves it out.
EMBEDDING_FACTORED = {"lora", "pissa"}


def _target(model_name, method_name):
    target = MODELS[model_name][1]
    if method_name not in EMBEDDING_FACTORED and model_name in ("linen_encoder", "nnx"):
        return target.replace("emb/embedding|", "").replace("(embedding|kernel)", "kernel")
    return target


def _setup(model_name):
    make, target, _ = MODELS[model_name]
    apply_fn, variables, x = make()
    x = x if isinstance(x, tuple) else (x,)
    params = variables["params"] if isinstance(variables, dict) else variables
    views = jpeft.infer_views(apply_fn, variables, *x)
    return apply_fn, variables, params, x, target, views


def _run(model_name, apply_fn, variables, spec, tree, x, factored):
    if isinstance(apply_fn, nnx.GraphDef):
        if factored:
            return jpeft.factored_nnx(apply_fn, spec)(tree, *x)
        return nnx.merge(apply_fn, jpeft.apply(tree, spec))(*x)
    if factored:
        return jpeft.factored(apply_fn, spec)({**variables, "params": tree}, *x)
    return apply_fn({**variables, "params": jpeft.apply(tree, spec)}, *x)


def _perturb(tree, seed=3):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 256))

    def bump(n):
        train = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape, a.dtype), n.train)
        return n.replace(train=train)

    return jax.tree.map(lambda n: bump(n) if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


def _kernel_slice_size(tree):
    sizes = []
    for leaf in jax.tree.leaves(tree, is_leaf=jpeft.is_adapter):
        if isinstance(leaf, jpeft.Adapter):
            view = leaf.view or jpeft.View((0,), (1,))
            sizes.append(int(np.prod(view.matrix_shape(leaf.base.shape))))
    return min(sizes)


#: The larger models get one method per family: DoRA and PiSSA (family A, like LoRA) run on the others.
LARGE = {"griffin", "scan_decoder"}
PAIRS = [(model, method) for method in FACTORED_METHODS for model in MODELS
         if not (model in LARGE and method in ("dora", "pissa"))]


@pytest.mark.parametrize("model_name, method_name", PAIRS, ids=[f"{meth}-{model}" for model, meth in PAIRS])
def test_factored_equals_materialised_and_builds_no_dense_delta(model_name, method_name):
    apply_fn, variables, params, x, target, views = _setup(model_name)
    spec = jpeft.Spec({_target(model_name, method_name): FACTORED_METHODS[method_name]}, views=views)
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    trainable, frozen = jpeft.split(tree)

    def loss(t, factored):
        out = _run(model_name, apply_fn, variables, spec, jpeft.combine(t, frozen), x, factored)
        return jnp.mean(jnp.square(out)), out

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no kernel may fall back to the materialised weight
        (lf, of), gf = jax.jit(jax.value_and_grad(lambda t: loss(t, True), has_aux=True))(trainable)
    (lm, om), gm = jax.jit(jax.value_and_grad(lambda t: loss(t, False), has_aux=True))(trainable)
    scale = float(jnp.max(jnp.abs(om)))
    np.testing.assert_allclose(of, om, atol=2e-5 * max(1.0, scale), rtol=0)
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(gf)[0], jax.tree.leaves(gm)):
        bound = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * max(bound, 1e-3), jax.tree_util.keystr(kp)
    size, shapes = (None, kernel_shapes(tree)) if model_name in BY_SHAPE else (_kernel_slice_size(tree), None)
    found = big_dependents(jax.grad(lambda t: loss(t, True)[0]), (trainable,), lambda p, leaf: True, size,
                           shapes=shapes)
    assert found == [], found[:5]
    # the same check catches the materialised path (the test can fail)
    if method_name == "lora":
        assert big_dependents(jax.grad(lambda t: loss(t, False)[0]), (trainable,), lambda p, leaf: True, size,
                              shapes=shapes)


# ------------------------------------------------------------------------ views
def test_infer_views_reads_layers_and_scan_axes():
    *_, views = _setup("scan_decoder")
    assert views[r"layers/q/kernel"] == jpeft.View(inputs=(1,), outputs=(2, 3), batch=(0,))
    assert views[r"layers/o/kernel"] == jpeft.View(inputs=(1, 2), outputs=(3,), batch=(0,))
    assert views[r"layers/gate/kernel"] == jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))
    *_, views = _setup("linen_encoder")
    assert views["mha/query/kernel"] == jpeft.View(inputs=(0,), outputs=(1, 2))
    assert views["mha/out/kernel"] == jpeft.View(inputs=(0, 1), outputs=(2,))
    assert views["ein/kernel"] == jpeft.View(inputs=(0, 1), outputs=(2,))
    assert "dense/kernel" not in views and "emb/embedding" not in views   # plain (in, out)
    *_, views = _setup("custom_ops")
    assert views["w_einsum"] == jpeft.View(inputs=(1,), outputs=(0, 2))


def test_per_slice_init_equals_the_2d_method_on_each_slice():
    """PiSSA on a stacked kernel takes one SVD per layer: each slice equals 2-D PiSSA on it."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 10))
    view = jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))
    spec = jpeft.Spec({"w": jpeft.PiSSA(rank=2, alpha=2)}, views={"w": view})
    node = jpeft.init(jax.random.PRNGKey(1), {"w": w}, spec)["w"]
    assert node.train["a"].shape == (3, 12, 2) and node.base.shape == w.shape
    for i in range(3):
        one = jpeft.init(jax.random.PRNGKey(1), {"w": w[i]}, jpeft.Spec({"w": jpeft.PiSSA(rank=2, alpha=2)}))["w"]
        np.testing.assert_allclose(jnp.abs(node.train["a"][i] @ node.train["b"][i]),
                                   jnp.abs(one.train["a"] @ one.train["b"]), atol=1e-5)
        np.testing.assert_allclose(node.base[i], one.base, atol=1e-5)
    np.testing.assert_allclose(jpeft.merge({"w": node}, spec)["w"], w, atol=1e-5)


def test_per_head_batch_axes_give_one_adapter_per_head():
    """A rule can make head axes batch axes: q kernel (in, heads, hd) with batch=(1,)."""
    apply_fn, variables, params, x, _, _ = _setup("linen_encoder")
    view = jpeft.View(inputs=(0,), outputs=(2,), batch=(1,))
    spec = jpeft.Spec({"mha/query/kernel": jpeft.LoRA(rank=2, alpha=4)}, views={"mha/query/kernel": view})
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    node = tree["mha"]["query"]["kernel"]
    assert node.train["a"].shape == (H, D, 2) and node.train["b"].shape == (H, 2, HD)
    delta = jpeft.merge(tree, spec)["mha"]["query"]["kernel"] - params["mha"]["query"]["kernel"]
    for h in range(H):
        np.testing.assert_allclose(delta[:, h, :], 2.0 * node.train["a"][h] @ node.train["b"][h], atol=1e-5)
    out = jpeft.factored(apply_fn, spec)({"params": tree}, *x)
    np.testing.assert_allclose(out, apply_fn({"params": jpeft.merge(tree, spec)}, *x), atol=1e-4)


def test_missing_or_wrong_view_is_a_clear_error():
    _, _, params, *_ = _setup("scan_decoder")
    with pytest.raises(jpeft.AdapterError, match=r"layers/q/kernel.*\(3, 32, 2, 16\).*needs a View"):
        jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec({"layers/q/kernel": jpeft.LoRA(rank=2)}))
    with pytest.raises(jpeft.AdapterError, match=r"layers/q/kernel.*is for a 3-D kernel"):
        jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec(
            {"layers/q/kernel": jpeft.LoRA(rank=2)}, views={"layers/q/kernel": jpeft.View((1,), (2,), batch=(0,))}))
    with pytest.raises(ValueError, match="each once"):
        jpeft.View(inputs=(0,), outputs=(2,))
    with pytest.raises(jpeft.SpecError, match="view rule 'nope' matches no leaf"):
        jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec(
            {"layers/gate/kernel": jpeft.LoRA(rank=2)}, views={"nope": jpeft.View((1,), (2,), batch=(0,))}))
    with pytest.raises(jpeft.SpecError, match="trains the whole leaf"):
        jpeft.init(jax.random.PRNGKey(0), params, jpeft.Spec(
            {"layers/gate/kernel": jpeft.Full()}, views={"layers/gate/kernel": jpeft.View((1,), (2,), batch=(0,))}))


def test_views_roundtrip_through_json_and_checkpoints(tmp_path):
    from jpeft import checkpoint

    _, _, params, _, target, views = _setup("scan_decoder")
    spec = jpeft.Spec({target: jpeft.PiSSA(rank=2, alpha=2)}, views=views)
    again = jpeft.Spec.from_json(spec.to_json())
    assert again == spec and json.loads(spec.to_json())["views"]
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    checkpoint.save_adapters(str(tmp_path / "ad"), tree, spec)
    loaded, saved_spec = checkpoint.load_adapters(str(tmp_path / "ad"), params)
    assert saved_spec == spec
    for a, b in zip(jax.tree.leaves(jpeft.merge(loaded, spec)), jax.tree.leaves(jpeft.merge(tree, spec))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(jpeft.SpecError, match="through the view"):
        jpeft.check_fits(tree, jpeft.Spec({target: jpeft.PiSSA(rank=2, alpha=2)},
                                          views={**views, r"layers/q/kernel": jpeft.View((1,), (3,), batch=(0, 2))}))


def test_step_hooks_and_compact_see_each_slice():
    """PeriodicLoRA's unload folds each layer's own delta into that layer; AdaLoRA's compact
    keeps each slice's components (padded to the largest) and leaves the merge unchanged."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 10))
    view = jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))
    spec = jpeft.Spec({"w": jpeft.PeriodicLoRA(rank=2, alpha=2, period=1)}, views={"w": view})
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), {"w": w}, spec))
    before = jpeft.merge(tree, spec)["w"]
    opt_state = jax.tree.map(jnp.zeros_like, jpeft.split(tree)[0])
    after, _ = jax.jit(lambda p, o: jpeft.after_step(p, o, spec, step=1, key=jax.random.PRNGKey(2)))(tree, opt_state)
    np.testing.assert_allclose(after["w"].base, before, atol=1e-5)
    assert after["w"].train["a"].shape == (3, 12, 2)
    np.testing.assert_allclose(after["w"].train["b"], 0.0)

    spec = jpeft.Spec({"w": adaptive.AdaLoRA(init_r=4, target_r=2, alpha=8.0, total_step=10)}, views={"w": view})
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), {"w": w}, spec))
    e = tree["w"].train["e"]
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], e.dtype)
    tree = {"w": tree["w"].replace(train={**tree["w"].train, "e": e * mask})}
    small = jpeft.compact(tree, spec)
    assert small["w"].train["e"].shape == (3, 3)
    np.testing.assert_allclose(jpeft.merge(small, spec)["w"], jpeft.merge(tree, spec)["w"], atol=1e-5)


def _assert_falls_back(model, name, warning):
    """`model` (one param `name`, LoRA on it) warns `warning` and equals the materialised path."""
    params = model.init(jax.random.PRNGKey(0), XF)["params"]
    spec = jpeft.Spec({name: jpeft.LoRA(rank=2)})
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    with pytest.warns(UserWarning, match=warning):
        out = jpeft.factored(model.apply, spec)({"params": tree}, XF)
    np.testing.assert_allclose(out, model.apply({"params": jpeft.merge(tree, spec)}, XF), atol=1e-5)


def test_unfactorable_use_falls_back_with_one_warning():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w_bare", nn.initializers.normal(0.2), (D, D))

    _assert_falls_back(Bare(), "w_bare", r"w_bare.*materialised weight")


def test_import_jpeft_makes_optim_available():
    import importlib

    mod = importlib.import_module("jpeft")
    assert hasattr(mod, "optim") and hasattr(mod.optim, "galore")


# ------------------------------------------------------------------------ mixed precision
def test_fp32_adapters_on_a_bf16_model():
    """`adapter_dtype="float32"`: fp32 adapter arrays on bf16 kernels, the layer computes in bf16,
    gradients reach the fp32 leaves; DoRA is exactly the identity at init on bf16 kernels."""
    model = nn.Dense(D, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = model.init(jax.random.PRNGKey(0), XF)["params"]
    for method in (jpeft.LoRA(rank=2, alpha=4), jpeft.DoRA(rank=2, alpha=4), jpeft.PiSSA(rank=2, alpha=2)):
        spec = jpeft.Spec({"kernel": method}, adapter_dtype="float32")
        tree = jpeft.init(jax.random.PRNGKey(1), params, spec)
        node = tree["kernel"]
        assert node.base.dtype == jnp.bfloat16
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(node.train))
        merged = jpeft.merge(tree, spec)["kernel"]
        assert merged.dtype == jnp.bfloat16
        if method.name == "dora" or method.init == "kaiming":
            np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(params["kernel"], np.float32))
        trainable, frozen = jpeft.split(_perturb(tree))
        run = jpeft.factored(model.apply, spec)
        y, g = jax.value_and_grad(lambda t, run=run, frozen=frozen:
                                  jnp.sum(run({"params": jpeft.combine(t, frozen)}, XF).astype(jnp.float32)))(trainable)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
        ref = jnp.sum(model.apply({"params": jpeft.merge(jpeft.combine(trainable, frozen), spec)},
                                  XF).astype(jnp.float32))
        np.testing.assert_allclose(y, ref, rtol=3e-2)
    # DoRA without the option also stays exact on bf16 (its magnitude is kept in fp32)
    spec = jpeft.Spec({"kernel": jpeft.DoRA(rank=2, alpha=4)})
    tree = jpeft.init(jax.random.PRNGKey(1), params, spec)
    assert tree["kernel"].train["m"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(jpeft.merge(tree, spec)["kernel"], np.float32),
                                  np.asarray(params["kernel"], np.float32))
    assert jpeft.Spec.from_json(spec.to_json()) == spec
    assert jpeft.Spec.from_json(jpeft.Spec({"kernel": jpeft.LoRA()},
                                           adapter_dtype="float32").to_json()).adapter_dtype == "float32"
    with pytest.raises(jpeft.SpecError, match="adapter_dtype='int8'"):
        jpeft.Spec({"kernel": jpeft.LoRA()}, adapter_dtype="int8")


# ------------------------------------------------------------------------ the fused kernel
def test_factored_lora_through_the_pallas_kernel_in_interpret_mode():
    """`impl="kernel"` runs the LoRA family's factored matmul through
    `pallas_kernels.fused_lora_matmul` (interpret mode on CPU): same outputs and gradients as
    the XLA path, on the scanned decoder's DenseGeneral and Dense kernels."""
    apply_fn, variables, params, x, target, views = _setup("scan_decoder")
    spec = jpeft.Spec({r"layers/(gate|up|o)/kernel": jpeft.LoRA(rank=2, alpha=4)}, views=views)
    trainable, frozen = jpeft.split(_perturb(jpeft.init(jax.random.PRNGKey(1), params, spec)))

    def loss(t, impl):
        out = jpeft.factored(apply_fn, spec, impl=impl)({"params": jpeft.combine(t, frozen)}, *x)
        return jnp.mean(jnp.square(out))

    text = jax.jit(lambda t: loss(t, "kernel")).trace(trainable).lower().as_text()
    assert "pallas" in text or "custom_call" in text or text.count("while") > 0
    lk, gk = jax.value_and_grad(lambda t: loss(t, "kernel"))(trainable)
    lr, gr = jax.value_and_grad(lambda t: loss(t, "reference"))(trainable)
    np.testing.assert_allclose(lk, lr, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)
    # forward mode goes through the reference path
    tangent = jax.tree.map(jnp.ones_like, trainable)
    jax.jvp(lambda t: loss(t, "reference"), (trainable,), (tangent,))


@pytest.mark.parametrize("platform,lowered_as", [("gpu", "cuda"), ("tpu", "tpu")])
def test_factored_lora_lowers_to_the_kernel_on_accelerators(monkeypatch, platform, lowered_as):
    import pallas_kernels._common as common
    import pallas_kernels._dispatch as dispatch

    monkeypatch.setattr(dispatch, "platform", lambda: platform)
    monkeypatch.setattr(common, "platform", lambda: platform)
    model = nn.Dense(128, use_bias=False)
    xs = jax.random.normal(jax.random.PRNGKey(0), (64, 128))
    params = model.init(jax.random.PRNGKey(0), xs)["params"]
    spec = jpeft.Spec({"kernel": jpeft.LoRA(rank=8)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1), params, spec))
    run = jpeft.factored(model.apply, spec)   # impl="auto": the kernel on GPU/TPU
    grad = jax.jit(jax.grad(lambda t: jnp.sum(run({"params": jpeft.combine(t, frozen)}, xs) ** 2)))
    text = grad.trace(trainable).lower(lowering_platforms=(lowered_as,)).as_text()
    assert text.count("triton" if platform == "gpu" else "tpu_custom_call") >= 2


# ------------------------------------------------------------------------ per-slice consumers
def test_regularisers_and_lora_pro_treat_each_slice_as_a_matrix():
    """A stacked node's loss regularisers and LoRA-Pro's adjusted update equal those of the same
    slices adapted one by one (unrolled layers)."""
    from jpeft.optim import lora_pro

    w = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 10))
    view = jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))

    def pair(method):
        stacked = _perturb(jpeft.init(jax.random.PRNGKey(1), {"w": w}, jpeft.Spec({"w": method}, views={"w": view})))
        node = stacked["w"]
        flat = {f"w{i}": node.replace(base=node.base[i], view=None,
                                      **{part: jax.tree.map(lambda x, i=i: x[i], getattr(node, part))
                                         for part in ("train", "frozen", "state")}) for i in range(3)}
        jpeft.check_fits(flat, jpeft.Spec({r"w\d": method}))
        return stacked, flat

    stacked, flat = pair(adaptive.AdaLoRA(init_r=4, target_r=2, alpha=8.0, total_step=10))
    np.testing.assert_allclose(jpeft.penalty(stacked), jpeft.penalty(flat), rtol=1e-5)
    assert float(jpeft.penalty(flat)) > 0
    stacked, flat = pair(svdcore.KaSA(rank=2))
    np.testing.assert_allclose(jpeft.penalty(stacked), jpeft.penalty(flat), rtol=1e-5)
    assert float(jpeft.penalty(flat)) > 0

    stacked, flat = pair(jpeft.LoRA(rank=2, alpha=4))
    tx = lora_pro(1e-2)
    ts, tf = jpeft.split(stacked)[0], jpeft.split(flat)[0]
    gs = jax.tree.map(lambda x: jnp.cos(x), ts)
    gf = {f"w{i}": gs["w"].replace(train=jax.tree.map(lambda x, i=i: x[i], gs["w"].train)) for i in range(3)}
    us, _ = tx.update(gs, tx.init(ts), ts)
    uf, _ = tx.update(gf, tx.init(tf), tf)
    for i in range(3):
        for k in ("a", "b"):
            np.testing.assert_allclose(us["w"].train[k][i], uf[f"w{i}"].train[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ convolutions
class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="c1")(x))
        return nn.Conv(16, (3, 3), strides=2, padding="VALID", name="c2")(x)


@pytest.mark.parametrize("method_name", ["lora", "dora", "pissa"])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_low_rank_conv_runs_factored(kind, method_name):
    """PEFT's low-rank conv: `conv(x, K) + s·conv(x, a) @ b` with `a` as a conv to r channels;
    view inputs = (kh, kw, in), outputs = out; equal to the materialised conv, no dense delta."""
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 5, 5, 8))
    if kind == "linen":
        model = ConvNet()
        apply_fn, variables = model.apply, model.init(jax.random.PRNGKey(0), x)
        params = variables["params"]
        run = lambda spec, t: jpeft.factored(apply_fn, spec)({"params": t}, x)  # noqa: E731
        ref = lambda spec, t: apply_fn({"params": jpeft.merge(t, spec)}, x)  # noqa: E731
    else:
        apply_fn, params = nnx.split(nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0)))
        variables = params
        run = lambda spec, t: jpeft.factored_nnx(apply_fn, spec)(t, x)  # noqa: E731
        ref = lambda spec, t: nnx.merge(apply_fn, jpeft.merge(t, spec))(x)  # noqa: E731
    views = jpeft.infer_views(apply_fn, variables, x)
    assert set(views.values()) == {jpeft.View(inputs=(0, 1, 2), outputs=(3,))}
    spec = jpeft.Spec({r".*kernel": FACTORED_METHODS[method_name]}, views=views)
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(run(spec, tree), ref(spec, tree), atol=2e-5)
    trainable, frozen = jpeft.split(tree)
    loss = lambda t: jnp.sum(jnp.square(run(spec, jpeft.combine(t, frozen))))  # noqa: E731
    loss_m = lambda t: jnp.sum(jnp.square(ref(spec, jpeft.combine(t, frozen))))  # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(trainable)), jax.tree.leaves(jax.grad(loss_m)(trainable))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    assert big_dependents(jax.grad(loss), (trainable,), lambda p, leaf: True, _kernel_slice_size(tree)) == []


def test_a_kernel_also_used_outside_a_factorable_op_gets_the_materialised_weight():
    """`jnp.dot(x, w) + sum(w²)`: the dot could run factored, but the other use must see `K'`;
    the probe pass finds it (`jpeft.inspect.output_sources`) and the whole kernel falls back."""
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w_mixed", nn.initializers.normal(0.2), (D, D))
            return jnp.dot(x, w) + jnp.sum(w ** 2)

    _assert_falls_back(Mixed(), "w_mixed", r"w_mixed.*also used outside a factorable op")


def test_factored_runs_from_several_threads_and_restores_the_ops():
    """The interceptors are shared by threads (installed while any thread is inside a factored
    call); each thread's state is its own, and the originals are back afterwards."""
    import threading

    original = (lax.dot_general, jnp.einsum, lax.scan, jax.checkpoint)
    apply_fn, variables, params, x, target, views = _setup("custom_ops")
    spec = jpeft.Spec({target: jpeft.LoRA(rank=2, alpha=4)}, views=views)
    tree = _perturb(jpeft.init(jax.random.PRNGKey(1), params, spec))
    want = _run("custom_ops", apply_fn, variables, spec, tree, x, False)
    results, errors = [], []

    def work(i):
        try:
            scaled = jax.tree.map(lambda n: n.replace(train=jax.tree.map(lambda a: a * (1 + i), n.train))
                                  if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)
            got = _run("custom_ops", apply_fn, variables, spec, scaled, x, True)
            results.append((i, got, _run("custom_ops", apply_fn, variables, spec, scaled, x, False)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4
    for _, got, ref in results:
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(results[0][2] if results[0][0] == 0 else want, want, atol=1e-5)
    assert (lax.dot_general, jnp.einsum, lax.scan, jax.checkpoint) == original
