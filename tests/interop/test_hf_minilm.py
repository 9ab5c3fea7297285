"""HF PEFT format on the real all-MiniLM-L6-v2 (BERT): a jpeft adapter loads with
`PeftModel.from_pretrained` onto transformers' `BertModel` with the same weights, and a PEFT adapter
imports into jpeft, with the same hidden states (≤ 1e-4)."""

import jax
import numpy as np
import pytest

import jpeft
from jpeft.interop.hf import export_peft, import_peft
from jpeft.models.bert import MINILM_L6, Bert, hf_module_map, load_minilm

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
TARGET = r"layer_\d/attention/(query|value)/kernel|layer_\d/output/kernel"


@pytest.fixture(scope="module")
def minilm():
    config, params, tokenizer = load_minilm()
    ids = np.array([tokenizer.encode("LoRA adapters move between JAX and PyTorch.").ids], np.int32)
    return config, params, ids


def hf_bert():
    return transformers.BertModel.from_pretrained(str(MINILM_L6.locate().parent), dtype=torch.float32).eval()


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.ones_like(torch.from_numpy(ids))).last_hidden_state.numpy()


@pytest.mark.parametrize("method",
                         [jpeft.LoRA(rank=4, alpha=8), jpeft.DoRA(rank=4, alpha=8), jpeft.PiSSA(rank=4, alpha=4)],
                         ids=["lora", "dora", "pissa"])
def test_export_loads_in_peft_with_the_same_hidden_states(minilm, method, tmp_path):
    config, params, ids = minilm
    spec = jpeft.Spec({TARGET: method})
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 256))
    tree = jax.tree.map(lambda n: n.replace(train={k: v + 0.02 * jax.random.normal(next(keys), v.shape)
                                                   for k, v in n.train.items()})
                        if isinstance(n, jpeft.Adapter) else n, jpeft.init(jax.random.PRNGKey(0), params, spec),
                        is_leaf=jpeft.is_adapter)
    export_peft(str(tmp_path / "adapter"), tree, spec, modules=hf_module_map(config))
    want = hidden(peft.PeftModel.from_pretrained(hf_bert(), str(tmp_path / "adapter")), ids)
    got = jpeft.factored(Bert(config).apply, spec)({"params": tree}, ids, np.ones_like(ids))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_peft_adapter_imports_with_the_same_hidden_states(minilm, tmp_path):
    config, params, ids = minilm
    model = peft.get_peft_model(hf_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    want = hidden(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"))
    tree, spec = import_peft(str(tmp_path / "adapter"), params, modules=hf_module_map(config))
    assert jpeft.count(tree).trainable == 6 * 2 * 4 * (384 + 384)
    got = jpeft.factored(Bert(config).apply, spec)({"params": tree}, ids, np.ones_like(ids))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
