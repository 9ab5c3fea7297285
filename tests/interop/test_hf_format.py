"""HF PEFT adapter folders both ways: jpeft → `PeftModel.from_pretrained` gives the same outputs,
and PEFT's `save_pretrained` → `jpeft.interop.hf.import_peft` gives the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.interop.hf import default_module_path, default_param_path, export_peft, import_peft
from tests.interop.test_peft_parity import IN, TinyTorch, base_params, jax_forward, peft_model, perturb_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

METHODS = {
    "lora": jpeft.LoRA(rank=4, alpha=8),
    "rslora": jpeft.LoRA(rank=4, alpha=8, rslora=True),
    "dora": jpeft.DoRA(rank=4, alpha=8),
    "pissa": jpeft.PiSSA(rank=4, alpha=8),
    "lora_ga": jpeft.LoRAGA(rank=4, alpha=8),
    "dora_pissa": jpeft.DoRA(rank=4, alpha=8, init="pissa"),
}
X = np.random.default_rng(0).standard_normal((8, IN)).astype(np.float32)


def trained_like(tree):
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    return jax.tree.map(lambda n: n.replace(train={k: v + 0.1 * jax.random.normal(next(keys), v.shape) for k, v in n.train.items()})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


@pytest.mark.parametrize("name", list(METHODS))
def test_export_loads_in_peft_with_the_same_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = TinyTorch()
    original = base_params(model)
    spec = jpeft.Spec({r"(q|v)_proj/kernel": METHODS[name]})
    calib = jax.grad(lambda p: jnp.sum(jnp.square(jax_forward(p, X))))(original) if METHODS[name].needs_calib else None
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), original, spec, calib=calib))
    export_peft(str(tmp_path / "adapter"), tree, spec)
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    with torch.no_grad():
        want = loaded(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(jax_forward(jpeft.apply(tree, spec), X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_peft_adapter_imports_with_the_same_outputs(extra, tmp_path):
    original, model = peft_model(extra)
    perturb_peft(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        want = model(torch.from_numpy(X)).numpy()
    tree, spec = import_peft(str(tmp_path / "adapter"), original)
    assert isinstance(spec.rules[0][1], jpeft.DoRA) == bool(extra.get("use_dora"))
    np.testing.assert_allclose(jax_forward(jpeft.apply(tree, spec), X), want, rtol=1e-5, atol=1e-5)


def test_export_of_mixed_methods_is_a_clear_error(tmp_path):
    original = base_params(TinyTorch())
    spec = jpeft.Spec({r"q_proj/kernel": jpeft.LoRA(rank=4), r"v_proj/kernel": jpeft.LoRA(rank=2)})
    with pytest.raises(jpeft.SpecError, match="one LoRA or DoRA config on every adapted leaf"):
        export_peft(str(tmp_path / "x"), jpeft.init(jax.random.PRNGKey(0), original, spec), spec)


def test_module_path_mapping_roundtrips():
    for path in ["layers_0/self_attn/q_proj/kernel", "q_proj/kernel", "model/layers_11/mlp/up_proj/kernel"]:
        assert default_param_path(default_module_path(path)) == path
    assert default_module_path("layers_3/self_attn/q_proj/kernel") == "layers.3.self_attn.q_proj"
