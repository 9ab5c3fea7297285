"""GraLoRA parity with HuggingFace PEFT (torch, `peft.GraloraConfig`): same base and adapter values
→ same outputs (fp32, ≤ 1e-5) and the same merged delta, with and without the hybrid branch; the
init distribution matches too. jpeft stores `a`, `b` in PEFT's own layout
(`gralora_A`: (k, in/k, r), `gralora_B`: (k, r, out/k))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.block import GraLoRA
from tests.interop.test_peft_parity import IN, TinyTorch, base_params, jax_forward, to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

R, ALPHA, K = 4, 8.0, 2
NAMES = ("q_proj", "v_proj")


def models(hybrid):
    torch.manual_seed(0)
    base = TinyTorch()
    original = base_params(base)
    cfg = peft.GraloraConfig(r=R, alpha=ALPHA, gralora_k=K, hybrid_r=hybrid, target_modules=list(NAMES))
    spec = jpeft.Spec({r"(q|v)_proj/kernel": GraLoRA(rank=R, alpha=ALPHA, k=K, hybrid_rank=hybrid)})
    return peft.get_peft_model(base, cfg), spec, jpeft.init(jax.random.PRNGKey(0), original, spec)


def layer(model, name):
    return getattr(model.base_model.model, name)


def load(params, model):
    out = {}
    for name in NAMES:
        lyr = layer(model, name)
        node = params[name]["kernel"]
        train = {"a": jnp.asarray(to_np(lyr.gralora_A["default"])), "b": jnp.asarray(to_np(lyr.gralora_B["default"]))}
        if "ha" in node.train:
            train["ha"] = jnp.asarray(to_np(lyr.gralora_A_general["default"].weight).T)
            train["hb"] = jnp.asarray(to_np(lyr.gralora_B_general["default"].weight).T)
        out[name] = {"kernel": node.replace(base=jnp.asarray(to_np(lyr.base_layer.weight).T), train=train),
                     "bias": jnp.asarray(to_np(lyr.base_layer.bias))}
    return out


def perturb(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in NAMES:
            lyr = layer(model, name)
            params = [lyr.gralora_A["default"], lyr.gralora_B["default"]]
            if not isinstance(lyr.gralora_A_general["default"], torch.nn.Identity):
                params += [lyr.gralora_A_general["default"].weight, lyr.gralora_B_general["default"].weight]
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("hybrid", [0, 2])
def test_outputs_and_delta_match_peft(hybrid):
    model, spec, params = models(hybrid)
    x = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)
    for perturbed in (False, True):
        if perturbed:
            perturb(model)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        tree = load(params, model)
        np.testing.assert_allclose(jax_forward(jpeft.apply(tree, spec), x), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jax_forward(jpeft.merge(tree, spec), x), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for name in NAMES:
                node = tree[name]["kernel"]
                np.testing.assert_allclose(node.method.delta(node).T,
                                           to_np(layer(model, name).get_delta_weight("default")),
                                           rtol=1e-5, atol=1e-6)
                xin = jax.random.normal(jax.random.PRNGKey(4), (8, node.base.shape[0]))  # factored path
                np.testing.assert_allclose(node.method.matmul(node, xin), xin @ node.method.materialise(node),
                                           rtol=1e-5, atol=1e-5)


def test_init_distribution_matches_peft():
    """PEFT: kaiming_uniform(a=√5) on each (r, in/k) block → bound 1/√(in/k); B = 0."""
    model, _, params = models(0)
    for name in NAMES:
        a_peft = to_np(layer(model, name).gralora_A["default"])
        a_ours = np.asarray(params[name]["kernel"].train["a"])
        assert a_peft.shape == a_ours.shape
        bound = 1 / (a_peft.shape[1]) ** 0.5
        for a in (a_peft, a_ours):
            assert bound * 0.9 < np.max(np.abs(a)) <= bound
        assert not np.any(to_np(layer(model, name).gralora_B["default"]))
