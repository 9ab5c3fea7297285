"""HF PEFT format on the real SmolLM2-135M (docs/interop.md): jpeft adapters load with
`PeftModel.from_pretrained` onto transformers' Llama with the same weights and give the same
logits; PEFT adapters import into jpeft likewise; the merged export loads with
`LlamaForCausalLM.from_pretrained`. Tolerance: 2e-4 absolute (+1e-4 relative) on logits of
magnitude ~20 after 30 fp32 layers (one element in 590k reached 1.01e-4 with 1e-4)."""

import jax
import numpy as np
import pytest

import jpeft
from jpeft.interop.hf import export_merged, export_peft, import_peft
from jpeft.models.llama import Llama, hf_module_map, to_hf_state_dict

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from tests.models.test_llama import hf_config, torch_model  # noqa: E402

pytestmark = pytest.mark.slow
TARGET = r"layers_(0|7|29)/(self_attn/(q|v)_proj|mlp/down_proj)/kernel"
IDS = np.array([[1, 504, 2914, 28, 216, 1007, 9478, 30, 216, 33, 34, 35]], np.int32)


@pytest.fixture(scope="module")
def smollm2():
    from jpeft.models.gguf_loader import load_smollm2

    return load_smollm2()


def trained_like(tree):
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 256))
    return jax.tree.map(lambda n: n.replace(train={k: v + 0.02 * jax.random.normal(next(keys), v.shape)
                                                   for k, v in n.train.items()})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


@pytest.mark.parametrize("method", [jpeft.LoRA(rank=4, alpha=8), jpeft.LoRA(rank=4, alpha=8, rslora=True),
                                    jpeft.DoRA(rank=4, alpha=8), jpeft.PiSSA(rank=4, alpha=4)],
                         ids=["lora", "rslora", "dora", "pissa"])
def test_export_loads_in_peft_with_the_same_logits(smollm2, method, tmp_path):
    config, params, _ = smollm2
    spec = jpeft.Spec({TARGET: method})
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), params, spec))
    export_peft(str(tmp_path / "adapter"), tree, spec, modules=hf_module_map(config))
    loaded = peft.PeftModel.from_pretrained(torch_model(config, params), str(tmp_path / "adapter"))
    with torch.no_grad():
        want = loaded(torch.from_numpy(IDS)).logits.numpy()
    got = jpeft.factored(Llama(config).apply, spec)({"params": tree}, IDS)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_peft_adapter_imports_with_the_same_logits(smollm2, tmp_path):
    config, params, _ = smollm2
    model = peft.get_peft_model(torch_model(config, params), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 7, 29]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        want = model(torch.from_numpy(IDS)).logits.numpy()
    model.save_pretrained(str(tmp_path / "adapter"))
    tree, spec = import_peft(str(tmp_path / "adapter"), params, modules=hf_module_map(config))
    assert jpeft.count(tree).trainable == 3 * 2 * 4 * (576 + 576) - 3 * 4 * (576 - 192)  # v_proj: 576 → 192
    np.testing.assert_allclose(jpeft.factored(Llama(config).apply, spec)({"params": tree}, IDS), want,
                               atol=2e-4, rtol=1e-4)


def test_merged_export_loads_in_transformers(smollm2, tmp_path):
    config, params, _ = smollm2
    spec = jpeft.Spec({TARGET: jpeft.DoRA(rank=4, alpha=8)})
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), params, spec))
    export_merged(str(tmp_path / "merged"), tree, spec, to_hf_state_dict, config=hf_config(config).to_dict())
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(Llama(config).apply({"params": jpeft.merge(tree, spec)}, IDS), want,
                               atol=2e-4, rtol=1e-4)
