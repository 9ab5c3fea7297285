"""AdaLoRA parity with HuggingFace PEFT (torch): same base and adapter values → same outputs
(fp32, ≤ 1e-5); and PEFT's RankAllocator (`update_and_allocate`: importance EMA, cubic budget,
global masking, final-phase rank pattern) fed the same gradients masks the same triplets as the
jpeft step hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.adaptive import AdaLoRA
from tests.interop.test_peft_parity import IN, TinyTorch, base_params, jax_forward, to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

INIT_R, TARGET_R, ALPHA, TOTAL, TINIT, TFINAL = 4, 2, 8.0, 10, 1, 2
NAMES = ("q_proj", "v_proj")


def models():
    torch.manual_seed(0)
    base = TinyTorch()
    original = base_params(base)
    cfg = peft.AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, total_step=TOTAL, tinit=TINIT,
                             tfinal=TFINAL, deltaT=1, lora_dropout=0.0, target_modules=list(NAMES))
    model = peft.get_peft_model(base, cfg)
    method = AdaLoRA(init_r=INIT_R, target_r=TARGET_R, alpha=ALPHA, total_step=TOTAL, tinit=TINIT, tfinal=TFINAL)
    spec = jpeft.Spec({r"(q|v)_proj/kernel": method})
    return model, spec, jpeft.init(jax.random.PRNGKey(0), original, spec)


def layer(model, name):
    return getattr(model.base_model.model, name)


def load(params, model):
    """jpeft tree holding PEFT's current base and adapter values (lora_A = Q = aᵀ, lora_E = λ,
    lora_B = P = bᵀ)."""
    out = {}
    for name in NAMES:
        lyr = layer(model, name)
        node = params[name]["kernel"]
        train = {"a": jnp.asarray(to_np(lyr.lora_A["default"]).T), "e": jnp.asarray(to_np(lyr.lora_E["default"])[:, 0]),
                 "b": jnp.asarray(to_np(lyr.lora_B["default"]).T)}
        out[name] = {"kernel": node.replace(base=jnp.asarray(to_np(lyr.base_layer.weight).T), train=train),
                     "bias": jnp.asarray(to_np(lyr.base_layer.bias))}
    return out


def perturb(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in NAMES:
            lyr = layer(model, name)
            for p in (lyr.lora_A["default"], lyr.lora_E["default"], lyr.lora_B["default"]):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_outputs_match_peft_at_init_and_after_perturbation():
    model, spec, params = models()
    x = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)
    for perturbed in (False, True):
        if perturbed:
            perturb(model)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        tree = load(params, model)
        np.testing.assert_allclose(jax_forward(jpeft.apply(tree, spec), x), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for name in NAMES:
                np.testing.assert_allclose(tree[name]["kernel"].method.delta(tree[name]["kernel"]).T,
                                           to_np(layer(model, name).get_delta_weight("default")), rtol=1e-5, atol=1e-6)


def test_rank_allocation_matches_peft_rank_allocator():
    model, spec, params = models()
    perturb(model)
    tree = load(params, model)
    rng = np.random.default_rng(2)
    trainable, frozen = jpeft.split(tree)
    for step in range(1, TOTAL):
        x = rng.standard_normal((16, IN)).astype(np.float32)
        y = rng.standard_normal((16, 24)).astype(np.float32)
        model.zero_grad()
        torch.sum(model(torch.from_numpy(x)) * torch.from_numpy(y)).backward()
        model.base_model.update_and_allocate(step)
        grads = jax.grad(lambda t, frozen=frozen, x=x, y=y:
                         jnp.sum(jax_forward(jpeft.apply(jpeft.combine(t, frozen), spec), x) * y))(trainable)
        tree, _ = jpeft.after_step(jpeft.combine(trainable, frozen), {}, spec, step=step, key=jax.random.PRNGKey(0),
                                   grads=grads)
        trainable, frozen = jpeft.split(tree)
        for name in NAMES:
            want = to_np(layer(model, name).lora_E["default"])[:, 0]
            got = np.asarray(tree[name]["kernel"].train["e"])
            np.testing.assert_array_equal(got == 0, want == 0, err_msg=f"step {step} {name}")
            np.testing.assert_allclose(got, want, rtol=1e-6)
    kept = sum(int(np.count_nonzero(tree[n]["kernel"].train["e"])) for n in NAMES)
    assert kept == TARGET_R * len(NAMES)
