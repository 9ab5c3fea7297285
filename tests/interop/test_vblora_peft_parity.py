"""VB-LoRA parity with HF PEFT (`tuners/vblora`): PEFT's vector bank and logits loaded into jpeft
nodes give the same model outputs (fp32, ≤ 1e-5) at init and after perturbing bank and logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.vb_lora import VBLoRA, vblora_storage

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tests.interop.test_peft_parity import IN, TinyTorch, base_params, jax_forward, to_np  # noqa: E402

R, H, B, K = 4, 16, 8, 2  # vector_length 8 divides 32, 48 and 24
METHOD = VBLoRA(rank=R, num_vectors=H, vector_length=B, topk=K)
SPEC = jpeft.Spec({r"(q|v)_proj/kernel": METHOD})


def peft_model():
    torch.manual_seed(0)
    base = TinyTorch()
    original = base_params(base)
    cfg = peft.VBLoRAConfig(r=R, num_vectors=H, vector_length=B, topk=K, target_modules=["q_proj", "v_proj"],
                            vblora_dropout=0.0)
    return original, peft.get_peft_model(base, cfg)


def load(params, model):
    """The jpeft tree holding PEFT's bank (in the owner node, q_proj) and per-layer logits."""
    out = {}
    bank = jnp.asarray(to_np(model.base_model.vblora_vector_bank["default"]))
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.base_model.model, name)
        node = params[name]["kernel"]
        train = {"logits_a": jnp.asarray(to_np(layer.vblora_logits_A["default"])),
                 "logits_b": jnp.asarray(to_np(layer.vblora_logits_B["default"]))}
        if "shared" in node.train:
            train["shared"] = {"bank": bank}
        out[name] = {"kernel": node.replace(base=jnp.asarray(to_np(layer.base_layer.weight).T), train=train),
                     "bias": jnp.asarray(to_np(layer.base_layer.bias))}
    return out


def test_vblora_outputs_match_peft_at_init_and_after_perturbation():
    original, model = peft_model()
    params = jpeft.init(jax.random.PRNGKey(0), original, SPEC)
    assert "shared" in params["q_proj"]["kernel"].train and "shared" not in params["v_proj"]["kernel"].train
    x = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)
    for perturb in (False, True):
        if perturb:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                model.base_model.vblora_vector_bank["default"].add_(0.5 * torch.randn((H, B), generator=gen))
                for name in ("q_proj", "v_proj"):
                    layer = getattr(model.base_model.model, name)
                    for p in (layer.vblora_logits_A["default"], layer.vblora_logits_B["default"]):
                        p.add_(torch.randn(p.shape, generator=gen))
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        loaded = load(params, model)
        got = jax_forward(jpeft.apply(loaded, SPEC), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        fact = jpeft.factored(lambda v, x: jax_forward(v["params"], x), SPEC)  # no Dense: materialised path
        np.testing.assert_allclose(fact({"params": loaded}, x), want, rtol=1e-5, atol=1e-5)
        # Not the identity (VB-LoRA's BA ≠ 0 at init, in PEFT and in jpeft alike).
        plain = jax_forward(jax.tree.map(lambda n: n.base if isinstance(n, jpeft.Adapter) else n, loaded,
                                         is_leaf=jpeft.is_adapter), x)
        assert float(np.max(np.abs(want - np.asarray(plain)))) > 1e-6


def test_peft_init_distributions_and_savable_count_match_jpeft():
    original, model = peft_model()
    params = jpeft.init(jax.random.PRNGKey(0), original, SPEC)
    bank = to_np(model.base_model.vblora_vector_bank["default"])
    assert np.max(np.abs(bank)) <= 0.02
    ours = np.asarray(params["q_proj"]["kernel"].train["shared"]["bank"])
    assert ours.shape == bank.shape and np.max(np.abs(ours)) <= 0.02
    vb_params, _ = model.get_nb_savable_parameters()
    # PEFT counts full logits unless save_only_topk_weights; jpeft's trainable count is the same.
    assert vb_params == jpeft.count(params).trainable == vblora_storage(params).bank + vblora_storage(params).logits
    model.peft_config["default"].save_only_topk_weights = True
    assert model.get_nb_savable_parameters()[0] == vblora_storage(params).topk_fp32
