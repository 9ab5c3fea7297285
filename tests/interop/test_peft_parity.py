"""Parity with HuggingFace PEFT (torch): same base weights, same adapter values, same outputs.

LoRA, rsLoRA, DoRA, PiSSA and OLoRA, at init and after the adapter values are perturbed (fp32,
≤ 1e-5). For PiSSA and OLoRA the data-dependent inits themselves are compared too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IN, HID, OUT, R, ALPHA = 32, 48, 24, 4, 8.0


class TinyTorch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(IN, HID)
        self.v_proj = torch.nn.Linear(HID, OUT)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


def jax_forward(p, x):
    h = jnp.tanh(x @ p["q_proj"]["kernel"] + p["q_proj"]["bias"])
    return h @ p["v_proj"]["kernel"] + p["v_proj"]["bias"]


def to_np(t):
    return t.detach().numpy().astype(np.float32)


def base_params(model):
    return {name: {"kernel": jnp.asarray(to_np(getattr(model, name).weight).T),
                   "bias": jnp.asarray(to_np(getattr(model, name).bias))} for name in ("q_proj", "v_proj")}


CONFIGS = {
    "lora": (dict(), jpeft.LoRA(rank=R, alpha=ALPHA)),
    "rslora": (dict(use_rslora=True), jpeft.LoRA(rank=R, alpha=ALPHA, rslora=True)),
    "dora": (dict(use_dora=True), jpeft.DoRA(rank=R, alpha=ALPHA)),
    "pissa": (dict(init_lora_weights="pissa"), jpeft.PiSSA(rank=R, alpha=ALPHA)),
    "olora": (dict(init_lora_weights="olora"), jpeft.LoRA(rank=R, alpha=ALPHA, init="olora")),
}


def peft_model(extra):
    torch.manual_seed(0)
    base = TinyTorch()
    original = base_params(base)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **extra)
    return original, peft.get_peft_model(base, cfg)


def peft_layers(model):
    return {name: getattr(model.base_model.model, name) for name in ("q_proj", "v_proj")}


def load_peft_values(params, model):
    """jpeft adapter tree holding exactly PEFT's current base and adapter values."""
    out = {}
    for name, layer in peft_layers(model).items():
        node = params[name]["kernel"]
        train = {"a": jnp.asarray(to_np(layer.lora_A["default"].weight).T),
                 "b": jnp.asarray(to_np(layer.lora_B["default"].weight).T)}
        if "m" in node.train:
            train["m"] = jnp.asarray(to_np(layer.lora_magnitude_vector["default"].weight))
        base = jnp.asarray(to_np(layer.base_layer.weight).T)
        out[name] = {"kernel": node.replace(base=base, train=train),
                     "bias": jnp.asarray(to_np(layer.base_layer.bias))}
    return out


def perturb_peft(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in peft_layers(model).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            if layer.lora_magnitude_vector:
                mag = layer.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=gen))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_peft_at_init_and_after_perturbation(name):
    extra, method = CONFIGS[name]
    original, model = peft_model(extra)
    spec = jpeft.Spec({r"(q|v)_proj/kernel": method})
    params = jpeft.init(jax.random.PRNGKey(0), original, spec)
    x = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)
    for perturb in (False, True):
        if perturb:
            perturb_peft(model)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = jax_forward(jpeft.apply(load_peft_values(params, model), spec), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_data_dependent_inits_match_peft(name):
    extra, method = CONFIGS[name]
    original, model = peft_model(extra)
    params = jpeft.init(jax.random.PRNGKey(0), original, jpeft.Spec({r"(q|v)_proj/kernel": method}))
    for layer_name, layer in peft_layers(model).items():
        node = params[layer_name]["kernel"]
        a_t, b_t = to_np(layer.lora_A["default"].weight).T, to_np(layer.lora_B["default"].weight).T
        # Singular/QR vectors are defined up to sign; the products and the residual base are not.
        np.testing.assert_allclose(node.train["a"] @ node.train["b"], a_t @ b_t, atol=2e-5)
        np.testing.assert_allclose(node.base, to_np(layer.base_layer.weight).T, atol=2e-5)
        np.testing.assert_allclose(jnp.abs(node.train["a"]), np.abs(a_t), atol=2e-5)
        np.testing.assert_allclose(jnp.abs(node.train["b"]), np.abs(b_t), atol=2e-5)


def test_default_lora_init_distribution_matches_peft():
    """PEFT draws A with kaiming_uniform(a=√5): bound 1/√in; B = 0."""
    _, model = peft_model({})
    a = to_np(peft_layers(model)["q_proj"].lora_A["default"].weight)
    assert np.max(np.abs(a)) <= 1 / IN ** 0.5 and np.max(np.abs(a)) > 0.9 / IN ** 0.5
    assert not np.any(to_np(peft_layers(model)["q_proj"].lora_B["default"].weight))
