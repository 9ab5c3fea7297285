"""LoftQ (`jpeft.LoRA(init="loftq")`, docs/quant.md): the oracles (a)–(e), parity with
PEFT's `loftq_init` run on this CPU, and the quantised base it leaves through init, views,
checkpoints and the factored path."""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint, quant
from jpeft.interop.hf import check_exportable
from tests.test_quant import Stack

PATH = "blk/q_proj/kernel"


def weight(shape=(64, 48), seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def loftq_node(w, **cfg):
    spec = jpeft.Spec({PATH: jpeft.LoRA(init="loftq", **cfg)})
    ad = jpeft.init(jax.random.PRNGKey(1), {"blk": {"q_proj": {"kernel": w}}}, spec)
    return ad["blk"]["q_proj"]["kernel"], spec, ad


def effective(ad, spec):
    return jpeft.apply(ad, spec)["blk"]["q_proj"]["kernel"]


def test_one_iteration_is_eckart_young_on_the_nf4_residual_and_the_base_is_nf4_of_w():
    """(a) `‖W − Q − s·ab‖² = Σ_{i>r} σ_i(W − Q)²` with `Q = deq(nf4(W))`; (c) the stored base is
    exactly `nf4(W)` (blocks of 64, no double quantisation), codes and absmax."""
    w = weight()
    node, spec, ad = loftq_node(w, rank=4, alpha=8)
    want = quant.quantize_array(w, quant.nf4(block=64, double_quant=False))
    assert quant.is_quantized(node.base) and node.base.config == want.config
    np.testing.assert_array_equal(node.base.codes, want.codes)
    np.testing.assert_array_equal(node.base.scales["absmax"], want.scales["absmax"])
    q = np.asarray(quant.dequantize_array(want), np.float64)
    sig = np.linalg.svd(np.asarray(w, np.float64) - q, compute_uv=False)
    err = float(np.sum((np.asarray(w, np.float64) - np.asarray(effective(ad, spec), np.float64)) ** 2))
    np.testing.assert_allclose(err, np.sum(sig[4:] ** 2), rtol=1e-5)
    assert err < 0.9 * float(np.sum((np.asarray(w, np.float64) - q) ** 2))  # the factors help


def test_peft_compat_scaling_and_the_factor_grams():
    """(b) `loftq_compat="peft"`: identical to the default when alpha == rank; otherwise `a@b`
    (not `s·a@b`) is the rank-r part. (e) `aᵀa = b bᵀ = diag(Σ_r)/s` (default scaling)."""
    w = weight()
    same = [loftq_node(w, rank=4, alpha=4, loftq_compat=c)[0] for c in ("paper", "peft")]
    jax.tree.map(np.testing.assert_array_equal, same[0].train, same[1].train)
    paper, _, _ = loftq_node(w, rank=4, alpha=8)
    peft, _, _ = loftq_node(w, rank=4, alpha=8, loftq_compat="peft")
    np.testing.assert_allclose(peft.train["a"] @ peft.train["b"], 2.0 * (paper.train["a"] @ paper.train["b"]),
                               rtol=1e-5, atol=1e-5)
    q = quant.dequantize_array(paper.base)
    sig = np.linalg.svd(np.asarray(w - q), compute_uv=False)[:4]
    a, b = np.asarray(paper.train["a"]), np.asarray(paper.train["b"])
    np.testing.assert_allclose(a.T @ a, np.diag(sig / 2.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.diag(sig / 2.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_more_iterations_do_not_increase_the_error(bits):
    """(d) On a fixed-seed N(0,1) 64×48 matrix, T = 5 is no worse than T = 1 (both bit widths)."""
    w = weight((64, 48), seed=7)
    errs = []
    for t in (1, 5):
        _, spec, ad = loftq_node(w, rank=4, alpha=4, loftq_bits=bits, loftq_iter=t)
        errs.append(float(jnp.sum((w - effective(ad, spec)) ** 2)))
    assert errs[1] <= errs[0]
    node, _, _ = loftq_node(w, rank=4, alpha=4, loftq_bits=bits)
    assert node.base.config == (quant.nf4(block=64, double_quant=False) if bits == 4 else quant.int8())


def peft_loftq_init():
    """PEFT's `loftq_init` with its compute device pinned to this CPU (it hard-codes cuda / xpu);
    the rest of its code runs unchanged, bitsandbytes' CPU backend doing the NF4 quantisation."""
    from peft.utils import loftq_utils
    source = inspect.getsource(loftq_utils.loftq_init)
    pinned = source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"')
    assert pinned != source, "PEFT's loftq_init changed: update the device pin"
    scope = dict(vars(loftq_utils))
    exec(pinned, scope)
    return scope["loftq_init"]


def test_equals_peft_loftq_init_with_two_iterations():
    """PEFT (torch layout `W = Kᵀ`, `num_bits=4`, `num_iter=2`) against `loftq_compat="peft"`:
    the same quantised base and the same rank-r product `lora_B @ lora_A`."""
    torch = pytest.importorskip("torch")
    w = weight((64, 48), seed=3)
    q_t, a_t, b_t = peft_loftq_init()(torch.tensor(np.asarray(w).T.copy()), num_bits=4, reduced_rank=4, num_iter=2)
    node, _, _ = loftq_node(w, rank=4, alpha=8, loftq_iter=2, loftq_compat="peft")
    np.testing.assert_allclose(quant.dequantize_array(node.base), q_t.numpy().T, rtol=0, atol=1e-6)
    np.testing.assert_allclose(node.train["a"] @ node.train["b"], (b_t @ a_t).numpy().T, rtol=1e-5, atol=1e-5)


def test_on_an_nn_scan_stack_factored_and_restored_from_a_checkpoint(tmp_path):
    """A stacked `(layers, in, out)` kernel: one LoftQ per layer, the base stored as the stack's
    NF4 codes; the factored forward equals the materialised one; an adapter checkpoint restores
    onto the full-precision weights with the same codes (the alternation is rerun)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
    params = Stack().init(jax.random.PRNGKey(0), x)["params"]
    w = params["s"]["d"]["kernel"]
    spec = jpeft.Spec({r".*d/kernel": jpeft.LoRA(rank=4, alpha=8, init="loftq", loftq_iter=2)},
                      views={r".*d/kernel": jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))})
    ad = jpeft.init(jax.random.PRNGKey(0), params, spec)
    node = ad["s"]["d"]["kernel"]
    assert quant.is_quantized(node.base) and node.base.shape == w.shape
    for i in range(w.shape[0]):
        one, _, _ = loftq_node(w[i], rank=4, alpha=8, loftq_iter=2)
        np.testing.assert_array_equal(quant.dequantize_array(node.base)[i], quant.dequantize_array(one.base))
        np.testing.assert_allclose(node.train["a"][i] @ node.train["b"][i], one.train["a"] @ one.train["b"],
                                   rtol=1e-5, atol=1e-5)
    trainable, frozen = jpeft.split(ad)
    ad = jpeft.combine(jax.tree.map(lambda t: t + 0.01, trainable), frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # every kernel runs factored
        got = jpeft.factored(Stack().apply, spec)({"params": ad}, x)
    want = Stack().apply({"params": jpeft.apply(ad, spec)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    checkpoint.save_adapters(str(tmp_path / "a"), ad, spec)
    back, _ = checkpoint.load_adapters(str(tmp_path / "a"), params, spec)
    jax.tree.map(np.testing.assert_array_equal, back, ad)


def test_bad_input_names_the_path():
    w = weight()
    with pytest.raises(jpeft.OptionError, match="loftq_bits must be 4 or 8"):
        jpeft.LoRA(init="loftq", loftq_bits=2)
    with pytest.raises(jpeft.OptionError, match="loftq_iter must be an int >= 1"):
        jpeft.LoRA(init="loftq", loftq_iter=0)
    with pytest.raises(jpeft.OptionError, match="loftq_compat"):
        jpeft.LoRA(init="loftq", loftq_compat="code")
    with pytest.raises(jpeft.OptionError, match=r"\['loftq_iter'\] apply to init='loftq' only"):
        jpeft.LoRA(loftq_iter=3)
    with pytest.raises(jpeft.OptionError, match="svd_niter=4 would be ignored"):
        jpeft.LoRA(init="loftq", svd_niter=4)
    with pytest.raises(jpeft.SpecError, match="not exported"):
        check_exportable(jpeft.Spec({PATH: jpeft.LoRA(init="loftq")}))
    qbase = jpeft.quantize({"blk": {"q_proj": {"kernel": w}}}, {PATH: quant.nf4()})
    with pytest.raises(jpeft.SpecError, match=rf"{PATH}.*chooses and quantises the base itself.*full precision"):
        jpeft.init(jax.random.PRNGKey(0), qbase, jpeft.Spec({PATH: jpeft.LoRA(init="loftq")}))
    grouped = jpeft.Spec({"k": jpeft.LoRA(rank=2, init="loftq")}, views={"k": jpeft.View(inputs=(0,), outputs=(1, 2))})
    with pytest.raises(jpeft.SpecError, match=r"k: .*trailing 2-D matrices.*View\(inputs=\(0,\), outputs=\(1, 2\)"):
        jpeft.init(jax.random.PRNGKey(0), {"k": jnp.ones((64, 4, 12))}, grouped)
