"""L4Q and LR-QAT (docs/quant.md): the oracles (B = 0 is round-to-nearest;
the merged integer model reproduces the training forward bit for bit) and closed-form gradients
of the straight-through / LSQ reading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import quant
from jpeft.methods.qat import L4Q, LRQAT

W = jax.random.normal(jax.random.PRNGKey(0), (64, 48))


def adapted(method, w=W):
    spec = jpeft.Spec({"k": method})
    return jpeft.init(jax.random.PRNGKey(1), {"k": w}, spec), spec


@pytest.mark.parametrize("bits, group, config", [(4, 32, quant.int4(group=32)), (8, None, quant.int8())])
@pytest.mark.parametrize("cls", [L4Q, LRQAT])
def test_b_zero_is_round_to_nearest_and_the_merged_integers_reproduce_training(cls, bits, group, config):
    extra = {"base_dtype": "float32"} if cls is LRQAT else {}
    params, spec = adapted(cls(rank=4, alpha=8.0, bits=bits, group=group, **extra))
    np.testing.assert_array_equal(jpeft.apply(params, spec)["k"],
                                  quant.dequantize_array(quant.quantize_array(W, config)))
    trainable, frozen = jpeft.split(params)
    params = jpeft.combine(jax.tree.map(lambda t: t + 0.03, trainable), frozen)
    exported = jpeft.merge(params, spec, requantize=True)["k"]
    assert quant.is_quantized(exported) and exported.config == config
    trained = jpeft.apply(params, spec)["k"]
    assert float(jnp.max(jnp.abs(trained - quant.dequantize_array(quant.quantize_array(W, config))))) > 0
    np.testing.assert_array_equal(quant.dequantize_array(exported), trained)


def test_lr_qat_downcast_grid_differs_from_round_to_nearest_only_at_near_midpoints():
    """With φ = bfloat16 (the default), `U = bf16(K/δ₀)`: a code moves off round-to-nearest only
    where `K/δ₀` lies within bfloat16's rounding of a half-integer."""
    params, spec = adapted(LRQAT(rank=4, alpha=8.0, bits=4, group=32))
    got = jpeft.apply(params, spec)["k"]
    want = quant.dequantize_array(quant.quantize_array(W, quant.int4(group=32)))
    step = LRQAT(rank=4, bits=4, group=32).rtn_step(W)
    v = np.asarray((W.reshape(2, 32, 48) / step[:, None, :]).reshape(64, 48))
    off = np.asarray(got != want)
    near = np.abs(np.abs(v - np.trunc(v)) - 0.5) <= np.abs(v) * 2.0 ** -8
    assert not np.any(off & ~near)


def grads(method, params, spec, cot):
    trainable, frozen = jpeft.split(params)
    return jax.grad(lambda t: jnp.sum(jpeft.apply(jpeft.combine(t, frozen), spec)["k"] * cot))(trainable)["k"].train


def test_l4q_gradients_are_the_straight_through_and_lsq_ones():
    """`K_q = δ·⌊clip((K + s·ab)/δ, ±7)⌉`, loss `Σ K_q ⊙ C`: `∂/∂b = s·aᵀ(mask ⊙ C)`, `∂/∂a = s·(mask ⊙ C) bᵀ`,
    `∂/∂δ = Σ_in C ⊙ (⌊v⌉ − v inside, ±7 where clipped)` (LSQ)."""
    method = L4Q(rank=4, alpha=8.0, bits=4)
    params, spec = adapted(method)
    node = params["k"]
    node = node.replace(train={**node.train, "b": 0.3 * jax.random.normal(jax.random.PRNGKey(4), (4, 48)),
                               "step": node.train["step"] * 0.7})          # some weights clip
    params = {"k": node}
    cot = jax.random.normal(jax.random.PRNGKey(5), W.shape)
    g = grads(method, params, spec, cot)
    a, b, step = node.train["a"], node.train["b"], node.train["step"]
    v = (W + 2.0 * a @ b) / step
    inside = np.abs(v) <= 7          # clip, then round (LSQ)
    assert 0 < np.mean(~inside) < 0.5
    masked = np.where(inside, cot, 0.0)
    np.testing.assert_allclose(g["b"], 2.0 * a.T @ masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g["a"], 2.0 * masked @ b.T, rtol=1e-5, atol=1e-5)
    lsq = np.where(inside, np.round(v) - v, np.clip(np.round(v), -7, 7))
    np.testing.assert_allclose(g["step"], np.sum(cot * lsq, axis=0, keepdims=True), rtol=1e-4, atol=1e-4)


def test_lr_qat_gradients_are_the_straight_through_ones():
    """`K_q = δ·clip(⌊U + s·ab⌉, −8, 7)`: `∂/∂b = s·aᵀ(δ ⊙ mask ⊙ C)`, `∂/∂δ = Σ_in C ⊙ clip(⌊·⌉)`."""
    method = LRQAT(rank=4, alpha=8.0, bits=4, base_dtype="float32")
    params, spec = adapted(method)
    node = params["k"]
    node = node.replace(train={**node.train, "b": 8.0 * jax.random.normal(jax.random.PRNGKey(4), (4, 48))})
    cot = jax.random.normal(jax.random.PRNGKey(5), W.shape)
    g = grads(method, {"k": node}, spec, cot)
    a, b, step = node.train["a"], node.train["b"], node.train["step"]
    v = node.base + 2.0 * a @ b
    inside = (v >= -8) & (v <= 7)
    assert 0 < np.mean(~inside) < 0.5
    masked = np.where(inside, cot * step, 0.0)
    np.testing.assert_allclose(g["b"], 2.0 * a.T @ masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g["step"], np.sum(cot * np.clip(np.round(v), -8, 7), axis=0, keepdims=True),
                               rtol=1e-5, atol=1e-4)


def test_bad_input_names_the_option_and_the_path():
    with pytest.raises(jpeft.OptionError, match="bits must be 4 or 8"):
        L4Q(bits=3)
    with pytest.raises(jpeft.OptionError, match="base_dtype must be None or one of"):
        LRQAT(base_dtype="int8")
    with pytest.raises(jpeft.OptionError, match="bfloat16' with bits=8"):
        LRQAT(bits=8, base_dtype="bfloat16")
    with pytest.raises(jpeft.AdapterError,
                       match=r"k: leaf of shape \(64, 48\).*group 48 must divide the input dimension 64"):
        adapted(L4Q(rank=4, group=48))
