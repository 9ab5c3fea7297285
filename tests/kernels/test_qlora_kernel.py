"""fused_qlora_matmul (dequantise + matmul + LoRA for NF4 / FP4 codes): the interpret-mode kernel
against the jnp reference and `jpeft.quant`'s own dequantisation, gradients included; lowering for
GPU (Triton) and TPU (Mosaic); dispatch from jpeft's factored path."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import pallas_kernels as pk
import pallas_kernels.qlora as qlora
from jpeft import quant
from tests.kernels._helpers import assert_close, assert_matches, normal, pallas_calls

# 38 tokens (padded to the 32-token tile), n = 128 (two blocks of 64), m = 96 (three 32-wide tiles).
LEAD, N, M, R = (2, 19), 128, 96, 5


def operands(config):
    q = quant.quantize_array(normal(0, (N, M)), config)
    codes, absmax, table = quant.kernel_operands(q)
    return q, codes, absmax, table, normal(1, (*LEAD, N)), normal(2, (N, R)) / N ** 0.5, normal(3, (R, M))


@pytest.mark.parametrize("config", [quant.nf4(), quant.fp4(block=32)], ids=["nf4_dq", "fp4_block32"])
def test_kernel_matches_the_reference_and_jpeft_dequantisation(config):
    q, codes, absmax, table, x, a, b = operands(config)
    block = config.block
    np.testing.assert_array_equal(qlora.dequantize_reference(codes, absmax, table, block), quant.dequantize_array(q))

    def call(impl):
        return lambda x, a, b, s: pk.fused_qlora_matmul(x, codes, absmax, table, a, b, s, block=block, impl=impl,
                                                        tokens_block=32, out_block=32)

    args = (x, a, b, jnp.float32(0.75))
    y, _ = assert_matches(call("kernel"), call("reference"), args, (0, 1, 2, 3), normal(9, (*LEAD, M)))
    assert_close(y, x @ quant.dequantize_array(q) + 0.75 * ((x @ a) @ b))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(call("kernel")(x, a, b, 0.75))))(x)
    assert len(pallas_calls(jaxpr)) == 2          # the forward and the dx kernels, nothing else


def test_bad_operands_are_refused_by_name():
    _, codes, absmax, table, x, a, b = operands(quant.nf4())
    with pytest.raises(ValueError, match="block 48 must be even and divide the input size 128"):
        pk.fused_qlora_matmul(x, codes, absmax, table, a, b, block=48)
    with pytest.raises(ValueError, match=r"absmax must be \(n/block, m\) = \(2, 96\)"):
        pk.fused_qlora_matmul(x, codes, absmax.T, table, a, b)
    with pytest.raises(ValueError, match="a and b: pass both"):
        pk.fused_qlora_matmul(x, codes, absmax, table, None, b)
    with pytest.raises(ValueError, match="codes must be uint8"):
        pk.fused_qlora_matmul(x, codes.astype(jnp.int32), absmax, table, a, b)


@pytest.mark.parametrize("platform,lowered_as", [("gpu", "cuda"), ("tpu", "tpu")])
def test_forward_and_backward_lower(monkeypatch, platform, lowered_as):
    monkeypatch.setattr(qlora, "platform", lambda: platform)
    _, codes, absmax, table, x, a, b = operands(quant.nf4())

    def loss(x, a, b):
        return jnp.sum(pk.fused_qlora_matmul(x, codes, absmax, table, a, b, 0.5, impl="kernel") ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, a, b).lower(
        lowering_platforms=(lowered_as,)).as_text()
    assert text.count("triton" if platform == "gpu" else "tpu_custom_call") >= 2


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(48, name="down")(nn.gelu(nn.Dense(128, name="up")(x)))


def test_the_factored_path_dispatches_qlora_to_the_kernel():
    """`jpeft.factored(..., impl="kernel")` (what GPU/TPU get by default) runs every NF4 LoRA
    layer through the kernel, with the values and gradients of the XLA path."""
    x = normal(5, (6, 64))
    base = MLP().init(jax.random.PRNGKey(0), x)["params"]
    spec = jpeft.Spec({r"(up|down)/kernel": jpeft.LoRA(rank=4, alpha=8)})
    trainable, frozen = jpeft.split(jpeft.init(jax.random.PRNGKey(1),
                                               jpeft.quantize(base, {r"(up|down)/kernel": quant.nf4()}), spec))
    trainable = jax.tree.map(lambda t: t + 0.05, trainable)

    def loss(impl):
        run = jpeft.factored(MLP().apply, spec, impl=impl)
        return lambda t: jnp.sum(jnp.sin(run({"params": jpeft.combine(t, frozen)}, x)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxpr = jax.make_jaxpr(jax.grad(loss("kernel")))(trainable)
        (vk, gk), (vr, gr) = (jax.jit(jax.value_and_grad(loss(i)))(trainable) for i in ("kernel", "reference"))
    assert len(pallas_calls(jaxpr)) == 4          # two layers, forward and dx each
    assert_close(vk, vr)
    jax.tree.map(assert_close, gk, gr)
