"""RandLoRA parity with HF PEFT (`tuners/randlora`): PEFT's shared random bases and per-layer λ, γ
loaded into jpeft nodes give the same model outputs (fp32, ≤ 1e-5) at init (identity) and after
perturbing λ and γ; the bases' shapes, scaling and the trainable count agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.bank import RandLoRA

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tests.interop.test_peft_parity import IN, TinyTorch, base_params, jax_forward, to_np  # noqa: E402

R, ALPHA = 4, 8.0


def peft_model(**extra):
    torch.manual_seed(0)
    base = TinyTorch()
    original = base_params(base)
    cfg = peft.RandLoraConfig(r=R, randlora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], randlora_dropout=0.0,
                              **extra)
    return original, peft.get_peft_model(base, cfg)


def load(params, model):
    """The jpeft tree holding PEFT's bases (in the owner node, q_proj) and per-layer λ, γ."""
    a = to_np(model.base_model.randlora_A["default"])  # (r, 1, d_max): one A shared by all bases
    b = to_np(model.base_model.randlora_B["default"])  # (D_max, N_max, r)
    out = {}
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.base_model.model, name)
        node = params[name]["kernel"]
        frozen = {"shared": {"a": jnp.asarray(a[:, 0, :]), "b": jnp.asarray(b)}} if "shared" in node.frozen else {}
        train = {"lam": jnp.asarray(to_np(layer.randlora_lambda["default"])),
                 "gamma": jnp.asarray(to_np(layer.randlora_gamma["default"]))}
        out[name] = {"kernel": node.replace(base=jnp.asarray(to_np(layer.base_layer.weight).T), train=train,
                                            frozen=frozen),
                     "bias": jnp.asarray(to_np(layer.base_layer.bias))}
    return out


@pytest.mark.parametrize("extra", [{}, {"sparse": True}], ids=["dense", "sparse"])
def test_randlora_outputs_match_peft_at_init_and_after_perturbation(extra):
    method = RandLoRA(rank=R, alpha=ALPHA, basis="sparse" if extra else "dense")
    spec = jpeft.Spec({r"(q|v)_proj/kernel": method})
    original, model = peft_model(**extra)
    params = jpeft.init(jax.random.PRNGKey(0), original, spec)
    ours = params["q_proj"]["kernel"].frozen["shared"]
    assert ours["a"].shape == (R, 48) and ours["b"].shape == model.base_model.randlora_B["default"].shape == (48, 12, R)
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.base_model.model, name)
        node = params[name]["kernel"]
        assert node.train["lam"].shape == tuple(layer.randlora_lambda["default"].shape)
        np.testing.assert_allclose(node.train["gamma"], to_np(layer.randlora_gamma["default"]), rtol=1e-7)  # init
    assert jpeft.count(params).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)

    x = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)
    for perturb in (False, True):
        if perturb:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name in ("q_proj", "v_proj"):
                    layer = getattr(model.base_model.model, name)
                    layer.randlora_lambda["default"].add_(torch.randn(layer.randlora_lambda["default"].shape,
                                                                      generator=gen))
                    layer.randlora_gamma["default"].mul_(1 + torch.randn(layer.randlora_gamma["default"].shape,
                                                                         generator=gen))
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        loaded = load(params, model)
        got = jax_forward(jpeft.apply(loaded, spec), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        plain = jax_forward(jax.tree.map(lambda n: n.base if isinstance(n, jpeft.Adapter) else n, loaded,
                                         is_leaf=jpeft.is_adapter), x)
        if not perturb:  # λ = 0: exactly the base model
            np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)
        else:  # and the perturbed adapter moves the outputs well beyond the tolerance
            assert float(np.max(np.abs(got - plain))) > 1e-3
        # The factored per-layer form against PEFT's delta weights.
        for name in ("q_proj", "v_proj"):
            layer = getattr(model.base_model.model, name)
            node = loaded[name]["kernel"]
            if "shared" not in node.frozen:
                node = node.replace(frozen=loaded["q_proj"]["kernel"].frozen)
            with torch.no_grad():
                peft_delta = to_np(layer.get_delta_weight("default")).T
            np.testing.assert_allclose(node.method.materialise(node) - node.base, peft_delta, rtol=1e-5, atol=1e-6)
