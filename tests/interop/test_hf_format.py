"""HF PEFT adapter folders both ways: jpeft → `PeftModel.from_pretrained` gives the same outputs,
and PEFT's `save_pretrained` → `jpeft.interop.hf.import_peft` gives the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.interop.hf import export_peft, import_peft
from jpeft.interop.modules import flax_to_torch, torch_to_flax
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
    return jax.tree.map(lambda n: n.replace(train={k: v + 0.1 * jax.random.normal(next(keys), v.shape)
                                                   for k, v in n.train.items()})
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


@pytest.mark.parametrize("rules, match", [
    ({"q_proj/kernel": jpeft.LoRA(rank=4), "v_proj/kernel": jpeft.DoRA(rank=4)}, "needs one of LoRA, DoRA"),
    ({"q_proj/kernel": jpeft.LoRA(rank=4, dropout=0.1), "v_proj/kernel": jpeft.LoRA(rank=4)}, "one lora_dropout"),
    ({"q_proj/kernel": jpeft.LoRA(rank=4, rslora=True), "v_proj/kernel": jpeft.LoRA(rank=4)}, "one use_rslora"),
], ids=["lora_and_dora", "two_dropouts", "rslora_and_plain"])
def test_export_of_configs_peft_cannot_hold_in_one_adapter_is_a_clear_error(rules, match, tmp_path):
    original = base_params(TinyTorch())
    spec = jpeft.Spec(rules)
    with pytest.raises(jpeft.SpecError, match=match):
        export_peft(str(tmp_path / "x"), jpeft.init(jax.random.PRNGKey(0), original, spec), spec)


def test_module_path_mapping_roundtrips():
    for path in ["layers_0/self_attn/q_proj", "q_proj", "model/layers_11/mlp/up_proj"]:
        assert torch_to_flax(flax_to_torch(path)) == path
    assert flax_to_torch("layers_3/self_attn/q_proj") == "layers.3.self_attn.q_proj"


class StackedTorch(torch.nn.Module):
    """Three layers of `q` (8 → 2 heads × 4) and `o` (2 × 4 → 8), as torch `Linear`s."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"q": torch.nn.Linear(8, 8, bias=False), "o": torch.nn.Linear(8, 8, bias=False)}) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["o"](torch.tanh(layer["q"](x))))
        return x


def _stacked_forward(params, x):
    """The same model in Flax layout: one `(3, ...)` stack, q `(in, heads, head_dim)` and o
    `(heads, head_dim, out)` kernels (the `nn.scan` + DenseGeneral layout)."""
    q, o = params["layers"]["q"]["kernel"], params["layers"]["o"]["kernel"]
    for i in range(q.shape[0]):
        h = jnp.tanh(jnp.einsum("bi,ihd->bhd", x, q[i]))
        x = jnp.tanh(jnp.einsum("bhd,hdo->bo", h, o[i]))
    return x


STACKED_VIEWS = {r"layers/q/kernel": jpeft.View(inputs=(1,), outputs=(2, 3), batch=(0,)),
                 r"layers/o/kernel": jpeft.View(inputs=(1, 2), outputs=(3,), batch=(0,))}


def _stacked_params(model: "StackedTorch") -> dict:
    """`model`'s weights in `_stacked_forward`'s layout (one `(3, ...)` stack per projection)."""
    return {"layers": {
        "q": {"kernel": jnp.stack([jnp.asarray(layer["q"].weight.detach().numpy().T).reshape(8, 2, 4)
                            for layer in model.layers])},
        "o": {"kernel": jnp.stack([jnp.asarray(layer["o"].weight.detach().numpy().T).reshape(2, 4, 8)
                            for layer in model.layers])}}}


@pytest.mark.parametrize("name", ["lora", "dora", "pissa"])
def test_export_of_viewed_stacked_kernels_loads_in_peft_with_the_same_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = StackedTorch()
    params, views = _stacked_params(model), STACKED_VIEWS
    spec = jpeft.Spec({r"layers/(q|o)/kernel": METHODS[name]}, views=views)
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), params, spec))
    export_peft(str(tmp_path / "adapter"), tree, spec)
    import json
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_modules"]) == sorted(f"layers.{i}.{m}" for i in range(3) for m in "qo")
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    x = X[:, :8]
    with torch.no_grad():
        want = loaded(torch.from_numpy(x)).numpy()
    got = _stacked_forward(jpeft.apply(tree, spec), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(np.max(np.abs(got - _stacked_forward(params, x)))) > 1e-3   # the adapters matter


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"layers_to_transform": [0, 2], "layers_pattern": "layers"}],
                         ids=["lora", "dora", "two_of_three_layers"])
def test_peft_adapter_imports_onto_viewed_stacked_kernels(extra, tmp_path):
    torch.manual_seed(0)
    model = StackedTorch()
    params, views = _stacked_params(model), STACKED_VIEWS
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "o"], **extra))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = X[:, :8]
    with torch.no_grad():
        want = peft_model(torch.from_numpy(x)).numpy()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(jpeft.SpecError, match="no parameter layers_0/(q|o)/kernel .* pass views="):
        import_peft(str(tmp_path / "adapter"), params)
    tree, spec = import_peft(str(tmp_path / "adapter"), params, views=views)
    got = _stacked_forward(jpeft.apply(tree, spec), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(np.max(np.abs(got - _stacked_forward(params, x)))) > 1e-3
    assert tree["layers"]["q"]["kernel"].train["a"].shape == (3, 8, 2)


def test_export_with_colliding_slice_names_is_a_clear_error(tmp_path):
    params = {"layers": {"q": {"kernel": jnp.ones((3, 8, 8))}}}
    spec = jpeft.Spec({r"layers/q/kernel": jpeft.LoRA(rank=2)},
                      views={r"layers/q/kernel": jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))})
    with pytest.raises(jpeft.SpecError, match="already taken"):
        export_peft(str(tmp_path / "x"), jpeft.init(jax.random.PRNGKey(0), params, spec), spec,
                    slice_path=lambda path, index: path)
