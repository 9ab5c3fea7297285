"""Quantised frozen bases (family K, docs/quant.md): the NF4 / FP4 / DYN8 tables and the
blockwise 4-bit quantiser equal bitsandbytes' (codes bit for bit, on its CPU backend), the
worked oracles, int8 / int4 round-trip bounds, stored bytes, and LoRA / PiSSA / DoRA over a
quantised base through init / apply / factored / split / count."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import checkpoint, quant
from jpeft.methods.lowrank import lowrank_matmul

SPEC_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def test_code_tables_are_bitsandbytes_tables():
    import bitsandbytes.functional as F

    np.testing.assert_array_equal(quant.NF4_CODE, np.array(SPEC_NF4, np.float32))
    assert quant.NF4_CODE[7] == 0 and quant.NF4_CODE[0] == -1 and quant.NF4_CODE[15] == 1
    np.testing.assert_array_equal(quant.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(quant.FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(quant.DYN8_CODE, F.create_dynamic_map(signed=True).numpy())
    assert quant.DYN8_CODE.shape == (256,) and np.all(np.diff(quant.DYN8_CODE) > 0)
    assert quant.DYN8_CODE.max() == 1.0 and quant.DYN8_CODE.min() == np.float32(-0.99296875)
    assert np.sum(quant.DYN8_CODE == 0) == 1 and quant.DYN8_CODE[quant.DYN8_CODE > 0].min() == pytest.approx(5.5e-7)
    ulp = np.spacing(np.abs(quant.DYN8_CODE))
    assert np.all(np.abs(quant.dynamic_map() - quant.DYN8_CODE) <= 2 * ulp)   # the definition, to 2 float32 ulps


def test_worked_nf4_block():
    v = np.array([0.1, -0.5, 2.0, 0.3, -0.04, 0.04, 0.7, -2.0], np.float32)
    q = quant.quantize_array(v.reshape(8, 1), quant.nf4(block=8, double_quant=False))  # K = Wᵀ, W = (1, 8)
    assert [int(b) for b in np.asarray(q.codes)] == [0x84, 0xF9, 0x77, 0xB0]
    np.testing.assert_allclose(np.asarray(quant.dequantize_array(q)).ravel(),
                               [0.1591606, -0.5688828, 2.0, 0.3218604, 0, 0, 0.6758305, -2.0], atol=1e-7)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 48), (100, 37), (33, 7)])   # tail blocks, an odd element count
def test_4bit_quantiser_equals_bitsandbytes(kind, double_quant, shape):
    import bitsandbytes.functional as F
    import torch

    k = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    packed, state = F.quantize_4bit(torch.from_numpy(k.T.copy()), blocksize=64, quant_type=kind,
                                    compress_statistics=double_quant)
    q = quant.quantize_array(k, quant.QuantConfig(kind, block=64, double_quant=double_quant))
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().ravel())
    if double_quant:
        np.testing.assert_array_equal(np.asarray(q.scales["absmax_q"]), state.absmax.numpy())
        # the offset is a mean: its float32 sum order (and so the last bit) is torch's own
        np.testing.assert_allclose(np.asarray(q.scales["absmax2"]), state.state2.absmax.numpy(), rtol=1e-6)
        np.testing.assert_allclose(float(q.scales["offset"]), float(state.offset), rtol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(q.scales["absmax"]), state.absmax.numpy())
    want = F.dequantize_4bit(packed, state).numpy().T
    np.testing.assert_allclose(np.asarray(quant.dequantize_array(q)), want, rtol=0, atol=1e-6 * np.abs(k).max())


def test_nf4_idempotence_error_bound_tail_blocks_and_double_quant():
    k = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)   # W: 48 rows of 64 = blocks
    q = quant.quantize_array(k, quant.nf4(double_quant=False))
    again = quant.quantize_array(np.asarray(quant.dequantize_array(q)), quant.nf4(double_quant=False))
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(again.scales["absmax"]), np.asarray(q.scales["absmax"]))
    err = np.abs(np.asarray(quant.dequantize_array(q)) - k).T.reshape(-1, 64)
    absmax = np.asarray(q.scales["absmax"])
    assert np.all(err <= absmax[:, None] * 0.1519036 + 1e-7)
    assert quant.quantize_array(np.ones((100, 1), np.float32),
                                quant.nf4(double_quant=False)).scales["absmax"].shape == (2,)
    odd = quant.quantize_array(np.ones((101, 1), np.float32), quant.nf4())
    assert odd.codes.shape == (51,) and int(odd.codes[-1]) & 0xF == 7
    dq = quant.quantize_array(k, quant.nf4(double_quant=True))
    assert float(dq.scales["offset"]) == pytest.approx(float(np.mean(absmax)), rel=1e-6)
    recovered = np.asarray(quant._absmax_of(dq.scales, dq.config))
    half_gap = np.max(np.diff(quant.DYN8_CODE)) / 2
    assert np.all(np.abs(recovered - absmax) <= np.asarray(dq.scales["absmax2"]).max() * half_gap + 1e-7)


def test_stored_bytes_per_parameter():
    shape = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    nf4 = jax.eval_shape(lambda w: quant.quantize_array(w, quant.nf4()), shape)
    assert nf4.codes.shape == (8_388_608,) and nf4.scales["absmax_q"].shape == (262_144,)
    assert nf4.scales["absmax2"].shape == (1024,)
    assert quant.stored_bytes(nf4) == 8_388_608 + 262_144 + 4096 + 4
    assert quant.stored_bytes(nf4) * 8 / 4096 ** 2 == pytest.approx(4.12695, abs=1e-4)   # ≤ 0.53 bytes / param
    int8 = jax.eval_shape(lambda w: quant.quantize_array(w, quant.int8()), shape)
    assert quant.stored_bytes(int8) / (4 * 4096 ** 2) < 0.26
    assert quant.logical_size({"a": nf4, "b": np.zeros(3)}) == 4096 ** 2 + 3


def test_int8_and_int4_codes_and_bounds():
    w = np.array([[3.0, 1.0], [1.0, 0.5], [-3.0, -1.0]], np.float32)   # K (in=3, out=2): columns are channels
    q = quant.quantize_array(w, quant.int8())
    np.testing.assert_array_equal(np.asarray(q.codes), [[127, 127], [42, 64], [-127, -127]])
    k = np.random.default_rng(2).standard_normal((128, 16)).astype(np.float32)
    for config, bound in ((quant.int8(), 127), (quant.int8(group=32), 127), (quant.int4(group=64), 7),
                          (quant.int4(group=None), 7)):
        q = quant.quantize_array(k, config)
        g = config.group or 128
        amax = np.abs(k.reshape(128 // g, g, 16)).max(axis=1)
        err = np.abs(np.asarray(quant.dequantize_array(q)) - k).reshape(128 // g, g, 16)
        assert np.all(err <= amax[:, None, :] / (2 * bound) * (1 + 1e-5)), config
    assert quant.quantize_array(k, quant.int4()).codes.shape == (128 * 16 // 2,)
    zero = quant.quantize_array(np.zeros((4, 2), np.float32), quant.int8())
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(zero)), 0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(48, name="down")(nn.gelu(nn.Dense(128, name="up")(x)))


@pytest.fixture(scope="module")
def mlp():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
    base = MLP().init(jax.random.PRNGKey(0), x)["params"]
    qbase = jpeft.quantize(base, {r"up/kernel": quant.nf4(), r"down/kernel": quant.int8()})
    return x, base, qbase


@pytest.mark.parametrize("method", [jpeft.LoRA(rank=4, alpha=8), jpeft.DoRA(rank=4, alpha=8)], ids=["qlora", "qdora"])
def test_adapters_over_a_quantised_base(mlp, method):
    x, _, qbase = mlp
    spec = jpeft.Spec({r"(up|down)/kernel": method})
    params = jpeft.init(jax.random.PRNGKey(2), qbase, spec)
    assert quant.is_quantized(params["up"]["kernel"].base)          # the base stays quantised
    y_base = MLP().apply({"params": jpeft.dequantize(qbase)}, x)
    np.testing.assert_allclose(MLP().apply({"params": jpeft.apply(params, spec)}, x), y_base, atol=1e-6)  # identity
    trainable, frozen = jpeft.split(params)
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(trainable, is_leaf=quant.is_quantized))
    assert quant.is_quantized(frozen["up"]["kernel"].base) and quant.is_quantized(frozen["down"]["kernel"].base)
    trainable = jax.tree.map(lambda t: t + 0.01, trainable)         # off the identity
    run = jpeft.factored(MLP().apply, spec)
    with warnings.catch_warnings():   # LoRA runs factored on the codes, DoRA is materialised: no fallback warning
        warnings.simplefilter("error")
        jax.eval_shape(lambda t: run({"params": jpeft.combine(t, frozen)}, x), trainable)
    loss_m = lambda t: jnp.sum(MLP().apply({"params": jpeft.apply(jpeft.combine(t, frozen), spec)}, x) ** 2)  # noqa: E731
    loss_f = lambda t: jnp.sum(run({"params": jpeft.combine(t, frozen)}, x) ** 2)  # noqa: E731
    (lm, gm), (lf, gf) = jax.jit(jax.value_and_grad(loss_m))(trainable), jax.jit(jax.value_and_grad(loss_f))(trainable)
    np.testing.assert_allclose(lf, lm, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gf, gm)
    merged = jpeft.merge(jpeft.combine(trainable, frozen), spec)
    assert not any(quant.is_quantized(v) for v in jax.tree.leaves(merged, is_leaf=quant.is_quantized))


def test_count_and_stored_bytes_of_an_adapted_quantised_tree(mlp):
    _, base, qbase = mlp
    spec = jpeft.Spec({r"up/kernel": jpeft.LoRA(rank=4)})
    params = jpeft.init(jax.random.PRNGKey(2), qbase, spec)
    plain = jpeft.init(jax.random.PRNGKey(2), base, spec)
    assert jpeft.count(params) == jpeft.count(plain)                 # logical parameters
    assert quant.stored_bytes(params) < 0.4 * quant.stored_bytes(plain)
    assert jax.eval_shape(lambda p: jpeft.apply(p, spec), params)["up"]["kernel"].shape == (64, 128)


def test_qpissa_quantises_the_residual_and_is_closer_to_the_weight_than_qlora(mlp):
    _, base, qbase = mlp
    spec = jpeft.Spec({r"up/kernel": jpeft.PiSSA(rank=16)})
    with pytest.raises(jpeft.SpecError, match="rewrites the base at init.*then jpeft.quantize the result"):
        jpeft.init(jax.random.PRNGKey(2), qbase, spec)
    params = jpeft.quantize(jpeft.init(jax.random.PRNGKey(2), base, spec), {r"up/kernel": quant.nf4()})
    node = params["up"]["kernel"]
    assert quant.is_quantized(node.base) and node.base.config == quant.nf4()
    w = np.asarray(base["up"]["kernel"])
    qpissa = np.linalg.norm(np.asarray(jpeft.merge(params, spec)["up"]["kernel"]) - w)
    qlora = np.linalg.norm(np.asarray(quant.dequantize_array(qbase["up"]["kernel"])) - w)
    assert qpissa < 0.9 * qlora, (qpissa, qlora)


def test_bad_input_is_refused_with_the_path(mlp):
    _, base, qbase = mlp
    with pytest.raises(jpeft.SpecError, match=r"up/bias: shape \(128,\): quantisation is for kernels"):
        jpeft.quantize(base, {r"up/bias": quant.nf4()})
    with pytest.raises(jpeft.SpecError, match="only floating-point leaves"):
        jpeft.quantize({"k": np.zeros((4, 4), np.int32)}, {"k": quant.int8()})
    with pytest.raises(jpeft.SpecError, match=r"group 48 does not divide the input dimension 64"):
        jpeft.quantize(base, {r"up/kernel": quant.int4(group=48)})
    with pytest.raises(jpeft.SpecError, match=r"rule\(s\) \['nope'\] matched no leaf"):
        jpeft.quantize(base, {"nope": quant.nf4()})
    with pytest.raises(jpeft.SpecError, match="block must be a positive even int"):
        quant.nf4(block=63)
    params = jpeft.init(jax.random.PRNGKey(0), base, jpeft.Spec({r"up/kernel": jpeft.LoRA(rank=2)}))
    quant_lora = jpeft.quantize(params, {r"up/kernel": quant.nf4()})   # the node's base, not its factors
    assert (quant.is_quantized(quant_lora["up"]["kernel"].base)
            and quant_lora["up"]["kernel"].train["a"].dtype == jnp.float32)
    full = jpeft.init(jax.random.PRNGKey(0), base, jpeft.Spec({r"up/kernel": jpeft.Full()}))
    with pytest.raises(jpeft.SpecError, match="up/kernel: an adapter node whose base cannot be quantised: full does"):
        jpeft.quantize(full, {r"up/kernel": quant.nf4()})
    with pytest.raises(jpeft.SpecError, match="up/kernel: quantised \\(nf4\\) and targeted by periodic_lora"):
        jpeft.init(jax.random.PRNGKey(0), qbase, jpeft.Spec({r"up/kernel": jpeft.PeriodicLoRA(rank=2)}))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.gelu(nn.Dense(64, name="d")(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="s")(x, None)[0]


class NNXLinear(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return self.l(x)


def test_qlora_runs_factored_on_an_nn_scan_stack_and_an_nnx_module(tmp_path):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
    base = Stack().init(jax.random.PRNGKey(0), x)["params"]
    qbase = jpeft.quantize(base, {r".*d/kernel": quant.nf4()})
    assert qbase["s"]["d"]["kernel"].codes.shape == (3, 64 * 64 // 2)    # one quantised matrix per layer
    spec = jpeft.Spec({r".*d/kernel": jpeft.LoRA(rank=4)},
                      views={r".*d/kernel": jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(2), qbase, spec))
    trainable = jax.tree.map(lambda t: t + 0.01, trainable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jpeft.factored(Stack().apply, spec)({"params": jpeft.combine(trainable, frozen)}, x)
    want = Stack().apply({"params": jpeft.apply(jpeft.combine(trainable, frozen), spec)}, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a viewed QLoRA checkpoint restores onto the quantised stack
    checkpoint.save_adapters(str(tmp_path / "scan"), jpeft.combine(trainable, frozen), spec)
    back, _ = checkpoint.load_adapters(str(tmp_path / "scan"), qbase, spec)
    jax.tree.map(np.testing.assert_array_equal, back, jpeft.combine(trainable, frozen))

    graphdef, state = nnx.split(NNXLinear(nnx.Rngs(0)))
    spec = jpeft.Spec({r"l/kernel": jpeft.LoRA(rank=4)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(2),
                                               jpeft.quantize(state, {r"l/kernel": quant.int4(group=32)}), spec))
    trainable = jax.tree.map(lambda t: t + 0.01, trainable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jpeft.factored_nnx(graphdef, spec)(jpeft.combine(trainable, frozen), x)
    want = nnx.merge(graphdef, jpeft.apply(jpeft.combine(trainable, frozen), spec))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)


class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(8):
            x = x + nn.gelu(nn.Dense(512, name=f"l{i}")(x))
        return x


def test_the_qlora_step_keeps_no_full_precision_copy_of_the_weights():
    """`memory_analysis` temporaries of the gradient: factored QLoRA needs at most one layer's
    fp32 weight (the one being dequantised) and one activation more than fp32 LoRA, whatever the
    depth; the materialised path keeps every layer's `K'`."""
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 512))
    base = Deep().init(jax.random.PRNGKey(0), x)["params"]
    spec = jpeft.Spec({r"l\d+/kernel": jpeft.LoRA(rank=8)})
    run = jpeft.factored(Deep().apply, spec)

    def temp(params, factored=True):
        trainable, frozen = jpeft.split(params)

        def loss(t):
            p = jpeft.combine(t, frozen)
            y = run({"params": p}, x) if factored else Deep().apply({"params": jpeft.apply(p, spec)}, x)
            return jnp.mean(y ** 2)

        return jax.jit(jax.grad(loss)).lower(trainable).compile().memory_analysis().temp_size_in_bytes

    fp32 = jpeft.init(jax.random.PRNGKey(2), base, spec)
    qlora = jpeft.init(jax.random.PRNGKey(2), jpeft.quantize(base, {r"l\d+/kernel": quant.nf4()}), spec)
    layer, activation = 512 * 512 * 4, 64 * 512 * 4
    assert temp(qlora) <= temp(fp32) + layer + activation, (temp(qlora), temp(fp32))
    assert temp(qlora, factored=False) >= temp(fp32) + 4 * layer


def test_a_quantised_tree_goes_through_orbax_jit_and_eval_shape(tmp_path):
    import orbax.checkpoint as ocp

    base = {"k": jax.random.normal(jax.random.PRNGKey(0), (64, 32)), "v": jnp.ones((3,))}
    qtree = jpeft.quantize(base, {"k": quant.nf4()})
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "q", qtree)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "q", jax.eval_shape(lambda: qtree))
    assert quant.is_quantized(back["k"]) and back["k"].config == quant.nf4()
    jax.tree.map(np.testing.assert_array_equal, back, qtree)
    np.testing.assert_allclose(jax.jit(jpeft.dequantize)(back)["k"], jpeft.dequantize(qtree)["k"], rtol=1e-6)


def test_merge_requantize_and_an_adapter_checkpoint_restored_onto_the_quantised_base(mlp, tmp_path):
    """`merge(requantize=True)`: each adapted leaf re-quantised from its merged weight with its
    base's config, untargeted quantised leaves kept bit for bit; `load_adapters` onto the
    quantised base gives the saved tree back."""
    x, base, qbase = mlp
    qbase = {**qbase, "extra": jpeft.quantize({"k": base["up"]["kernel"]}, {"k": quant.int4(group=32)})}
    spec = jpeft.Spec({r"(up|down)/kernel": jpeft.LoRA(rank=4, alpha=8)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(2), qbase, spec))
    params = jpeft.combine(jax.tree.map(lambda t: t + 0.05, trainable), frozen)
    plain = jpeft.merge(params, spec)
    requant = jpeft.merge(params, spec, requantize=True)
    for path, config in (("up", quant.nf4()), ("down", quant.int8())):
        want = quant.quantize_array(plain[path]["kernel"], config)
        got = requant[path]["kernel"]
        assert quant.is_quantized(got) and got.config == config
        np.testing.assert_array_equal(got.codes, want.codes)
    assert requant["extra"]["k"].config == quant.int4(group=32)
    jax.tree.map(np.testing.assert_array_equal, requant["extra"]["k"], qbase["extra"]["k"])
    np.testing.assert_array_equal(requant["up"]["bias"], plain["up"]["bias"])
    with pytest.raises(jpeft.SpecError, match="requantize must be True or False"):
        jpeft.merge(params, spec, requantize="nf4")
    checkpoint.save_adapters(str(tmp_path / "a"), params, spec)
    back, _ = checkpoint.load_adapters(str(tmp_path / "a"), qbase, spec)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("tokens", [8, 96], ids=["two_matmuls", "one_matmul"])
def test_qlora_matmul_values_and_gradients_equal_the_dense_form(tokens):
    """`lowrank_matmul` over a quantised base (XLA:CPU's custom VJP in both of its forms, fewer
    and more tokens than input features; an adapter-branch input `xd` unlike `x`, as dropout
    makes it) against `x@deq(q) + s·(xd@a)@b` by autodiff."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = quant.quantize_array(jax.random.normal(keys[0], (64, 48)), quant.nf4())
    x, a, b = (jax.random.normal(k, s) for k, s in zip(keys[1:], [(2, tokens // 2, 64), (64, 4), (4, 48)]))
    xd = x * (jax.random.uniform(keys[4], x.shape) > 0.25)
    w = quant.dequantize_array(q)

    def loss(fn):
        return lambda x, xd, a, b: jnp.sum(jnp.sin(fn(x, xd, a, b)))

    got = jax.value_and_grad(loss(lambda x, xd, a, b: lowrank_matmul(x, xd, q, a, b, 0.5)), argnums=(0, 1, 2, 3))
    want = jax.value_and_grad(loss(lambda x, xd, a, b: x @ w + 0.5 * ((xd @ a) @ b)), argnums=(0, 1, 2, 3))
    (vg, gg), (vw, gw) = jax.jit(got)(x, xd, a, b), want(x, xd, a, b)
    np.testing.assert_allclose(vg, vw, rtol=1e-5)
    for g1, g2 in zip(gg, gw):   # fp32 sums in another order: 1e-5 of the gradient's scale
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(g2)))))


def test_side_by_side_with_qwix_nf4_and_int8_lora(mlp):
    """qwix's `LoraRule(weight_qtype=...)` on the same MLP and weights. NF4 with
    `tile_size=64` (blocks of 64 along the contraction, as bitsandbytes' on `Kᵀ`): the same
    dequantised weights bit for bit as `nf4(double_quant=False)`, and with qwix's own LoRA factors
    (b moved off zero) the same outputs. int8: qwix rounds to [-128, 127] with bound 127.5, jpeft to
    [-127, 127] with 127 (bitsandbytes' rule): the two dequantised weights differ by less than one
    code step of either."""
    qwix = pytest.importorskip("qwix")
    from qwix._src.core import qarray

    x, base, _ = mlp
    for qtype, config in (("nf4", quant.nf4(double_quant=False)), (jnp.int8, quant.int8())):
        provider = qwix.LoraProvider(module_path=r".*(up|down)", rank=4, alpha=8.0, weight_qtype=qtype,
                                     tile_size=64 if qtype == "nf4" else None)
        model = qwix.apply_lora_to_model(MLP(), provider)
        qparams = model.init(jax.random.PRNGKey(0), x)["params"]   # the same init key: the same float kernels
        qbase = jpeft.quantize(base, {r"(up|down)/kernel": config})
        for name in ("up", "down"):
            theirs = qarray.dequantize(qparams[name]["kernel"].array)
            ours = quant.dequantize_array(qbase[name]["kernel"])
            if qtype == "nf4":
                np.testing.assert_array_equal(theirs, ours)
            else:
                step = jnp.max(jnp.abs(base[name]["kernel"]), axis=0) / 127.0
                assert bool(jnp.all(jnp.abs(theirs - ours) <= step)) and bool(jnp.any(theirs != ours))
        if qtype != "nf4":
            continue
        for name in ("up", "down"):
            qparams[name]["kernel_lora_b"] = 0.05 * jax.random.normal(jax.random.PRNGKey(3),
                                                                      qparams[name]["kernel_lora_b"].shape)
        spec = jpeft.Spec({r"(up|down)/kernel": jpeft.LoRA(rank=4, alpha=8)})
        params = jpeft.init(jax.random.PRNGKey(2), qbase, spec)
        for name in ("up", "down"):
            node = params[name]["kernel"]
            params[name]["kernel"] = node.replace(train={"a": qparams[name]["kernel_lora_a"],
                                                         "b": qparams[name]["kernel_lora_b"]})
        want = model.apply({"params": qparams}, x)
        got = jpeft.factored(MLP().apply, spec)({"params": params}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
