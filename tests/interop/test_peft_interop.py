"""HF PEFT interop as a table: one row per PEFT configuration, run PEFT → jpeft (`import_peft`)
and jpeft → PEFT (`export_peft`, then back through `import_peft`) on a random-weight Llama
(`LlamaForCausalLM`, CAUSAL_LM) and BERT (`BertForSequenceClassification`, SEQ_CLS; `BertModel`,
FEATURE_EXTRACTION) with randomised adapter tensors, comparing outputs (fp32, 1e-4) and checking
that the adapter has a visible effect; plus the error rows and the LoraConfig key table."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.interop import peft_config, peft_rows
from jpeft.interop.hf import export_peft, export_peft_adapters, import_peft, import_peft_adapters
from jpeft.interop.modules import ModuleMap
from jpeft.methods.adaptive import AdaLoRA
from jpeft.methods.bank import RandLoRA
from jpeft.methods.block import GraLoRA
from jpeft.methods.vb_lora import VBLoRA
from jpeft.models import bert as jbert
from jpeft.models.llama import Llama, LlamaConfig, from_hf_state_dict, hf_module_map, to_hf_state_dict
from jpeft.paths import leaves_with_paths

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.initialization import no_init_weights  # noqa: E402

from tests.models.test_llama import hf_config  # noqa: E402

LL = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                 tie_embeddings=False)
IDS = np.array([[1, 5, 9, 33, 2, 60, 7, 12], [3, 3, 8, 41, 22, 0, 17, 63]], np.int32)
BERT_HF = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=16, hidden_act="gelu", num_labels=3, attn_implementation="eager")
MASK = np.ones_like(IDS)


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


# One random model of each kind; every row starts from a fresh copy (PEFT changes models in place).
_LLAMA = _seeded(lambda: transformers.LlamaForCausalLM(hf_config(LL)))
_CLS = _seeded(lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**BERT_HF)))
BC = jbert.BertConfig.from_hf(_CLS.config.to_dict())


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def fresh(kind):
    like = {"llama": _LLAMA, "cls": _CLS, "bert": _CLS.bert}[kind]
    with no_init_weights():
        model = (type(like)(like.config) if kind != "bert"
                 else transformers.BertModel(like.config, add_pooling_layer=True))
    model.load_state_dict(like.state_dict())
    return model.eval()


KINDS = {   # kind: (jpeft params, module map, jitted jpeft forward, torch forward, task type)
    "llama": (from_hf_state_dict(numpy_state(_LLAMA), LL), hf_module_map(LL), jax.jit(Llama(LL).apply),
              lambda m: m(torch.from_numpy(IDS)).logits, "CAUSAL_LM"),
    "cls": (jbert.params_from_hf(numpy_state(_CLS), BC, 3), jbert.hf_module_map(BC, 3),
            jax.jit(jbert.BertClassifier(BC, 3, pooling="cls").apply),
            lambda m: m(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).logits, "SEQ_CLS"),
    "bert": (jbert.params_from_hf(numpy_state(_CLS.bert), BC), jbert.hf_module_map(BC),
             jax.jit(lambda v, i, m: jbert.Bert(BC).apply(v, i, m)[0]),
             lambda m: m(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).last_hidden_state,
             "FEATURE_EXTRACTION"),
}


def jax_out(kind, params):
    forward = KINDS[kind][2]
    return np.asarray(forward({"params": params}, IDS) if kind == "llama" else forward({"params": params}, IDS, MASK))


def torch_out(kind, model):
    with torch.no_grad():
        return KINDS[kind][3](model).numpy()


def test_converters_reproduce_the_transformers_models():
    for kind, model in [("llama", _LLAMA), ("cls", _CLS), ("bert", _CLS.bert)]:
        np.testing.assert_allclose(jax_out(kind, KINDS[kind][0]), torch_out(kind, model), atol=1e-5, rtol=1e-5)
    state = numpy_state(_LLAMA)
    back = to_hf_state_dict(from_hf_state_dict(state, LL))
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)
    assert set(jbert.to_hf_state_dict(KINDS["cls"][0])) == {k for k in numpy_state(_CLS) if "position_ids" not in k}
    with pytest.raises(ValueError, match="model.norm.weight .* is missing"):
        from_hf_state_dict({k: v for k, v in state.items() if k != "model.norm.weight"}, LL)
    with pytest.raises(ValueError, match="no parameter for: \\['extra.weight'\\]"):
        from_hf_state_dict({**state, "extra.weight": np.zeros(2)}, LL)


def visible(adapted, base) -> bool:
    """The adapter moves the outputs by more than 2% of their scale (the tolerance is 1e-4)."""
    return float(np.max(np.abs(adapted - base))) > 0.02 * float(np.max(np.abs(base)))


# ------------------------------------------------------------------------------------- PEFT → jpeft

IMPORT_ROWS = {
    "lora": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "dora": ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "rank_alpha_pattern": ("llama", dict(target_modules=["q_proj", "v_proj"],
                                         rank_pattern={"layers.0.self_attn.q_proj": 3}, alpha_pattern={"v_proj": 7})),
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "v_proj"])),
    "pissa": ("llama", dict(target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")),
    "olora": ("llama", dict(target_modules=["q_proj", "down_proj"], init_lora_weights="olora")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    "exclude_modules": ("llama", dict(target_modules=["q_proj", "v_proj"],
                                      exclude_modules=["model.layers.0.self_attn.q_proj"])),
    "all_linear": ("llama", dict(target_modules="all-linear")),
    "regex": ("llama", dict(target_modules=r".*\.(k|o)_proj")),
    "seq_cls": ("cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bias_all": ("bert", dict(target_modules=["query", "value"], bias="all", task_type="FEATURE_EXTRACTION")),
    "bias_lora_only": ("bert", dict(target_modules=["query", "dense"], bias="lora_only")),
    "lora_bias": ("bert", dict(target_modules=["query", "value"], lora_bias=True)),
}


def peft_folder(kind, options, directory):
    """A PEFT model of `kind` with `options`, every trainable tensor randomised, saved; its outputs."""
    model = peft.get_peft_model(fresh(kind), peft.LoraConfig(r=4, lora_alpha=8, **options))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(directory))
    return torch_out(kind, model)


@pytest.mark.parametrize("row", list(IMPORT_ROWS))
def test_peft_folders_import_with_the_same_outputs(row, tmp_path):
    kind, options = IMPORT_ROWS[row]
    params, modules = KINDS[kind][:2]
    want = peft_folder(kind, options, tmp_path / "a")
    tree, spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    got = jax_out(kind, jpeft.apply(tree, spec))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out(kind, params))
    if row == "rank_alpha_pattern":
        ranks = {p: n.train["a"].shape[1] for p, n in leaves_with_paths(tree, is_leaf=jpeft.is_adapter)
                 if isinstance(n, jpeft.Adapter)}
        assert ranks["layers_0/self_attn/q_proj/kernel"] == 3 and ranks["layers_1/self_attn/q_proj/kernel"] == 4


# ------------------------------------------------------------------------------------- jpeft → PEFT

LL_QV = r"layers_\d/self_attn/(q|v)_proj/kernel"
BERT_QV = r"layer_\d/attention/(query|value)/kernel"
EXPORT_ROWS = {
    "lora": ("llama", {LL_QV: jpeft.LoRA(rank=4, alpha=8)}),
    "rslora": ("llama", {LL_QV: jpeft.LoRA(rank=4, alpha=8, rslora=True)}),
    "dora": ("llama", {LL_QV: jpeft.DoRA(rank=4, alpha=8)}),
    "per_rule_ranks": ("llama", {r"layers_0/self_attn/q_proj/kernel": jpeft.LoRA(rank=2, alpha=4),
                                 r"layers_\d/self_attn/q_proj/kernel": jpeft.LoRA(rank=4, alpha=8),
                                 r"layers_\d/mlp/up_proj/kernel": jpeft.LoRA(rank=4, alpha=32)}),
    "modules_to_save": ("llama", {LL_QV: jpeft.LoRA(rank=4, alpha=8), "lm_head/kernel": jpeft.Full()}),
    "embedding": ("llama", {"embed_tokens/embedding": jpeft.LoRA(rank=4, alpha=8), LL_QV: jpeft.LoRA(rank=4, alpha=8)}),
    "pissa_as_2r": ("llama", {LL_QV: jpeft.PiSSA(rank=4, alpha=4)}),
    "one_layer": ("llama", {r"layers_1/mlp/down_proj/kernel": jpeft.LoRA(rank=4, alpha=8)}),
    "seq_cls_trained_head": ("cls", {"bert/" + BERT_QV: jpeft.LoRA(rank=4, alpha=8),
                                     r"classifier/(kernel|bias)": jpeft.Full()}),
    "seq_cls_frozen_head": ("cls", {"bert/" + BERT_QV: jpeft.LoRA(rank=4, alpha=8)}),
    "feature_extraction": ("bert", {BERT_QV: jpeft.LoRA(rank=4, alpha=8)}),
    "bias_all": ("bert", {BERT_QV: jpeft.LoRA(rank=4, alpha=8), r".*/bias": jpeft.Full()}),
    "bias_lora_only": ("bert", {BERT_QV: jpeft.LoRA(rank=4, alpha=8),
                                r"layer_\d/attention/(query|value)/bias": jpeft.Full()}),
    "bias_as_modules_to_save": ("bert", {BERT_QV: jpeft.LoRA(rank=4, alpha=8), r"layer_1/output/bias": jpeft.Full()}),
}


def trained_like(tree):
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 256))
    return jax.tree.map(lambda n: n.replace(train={k: v + 0.3 * jax.random.normal(next(keys), v.shape)
                                                   for k, v in n.train.items()})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


@pytest.mark.parametrize("row", list(EXPORT_ROWS))
def test_jpeft_exports_load_in_peft_and_back_with_the_same_outputs(row, tmp_path):
    kind, rules = EXPORT_ROWS[row]
    params, modules, _, _, task = KINDS[kind]
    spec = jpeft.Spec(rules)
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), params, spec))
    want = jax_out(kind, jpeft.apply(tree, spec))
    export_peft(str(tmp_path / "a"), tree, spec, modules=modules, task_type=task)
    loaded = peft.PeftModel.from_pretrained(fresh(kind), str(tmp_path / "a"))
    np.testing.assert_allclose(torch_out(kind, loaded), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out(kind, params))
    back, back_spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    np.testing.assert_allclose(jax_out(kind, jpeft.apply(back, back_spec)), want, atol=1e-4, rtol=1e-4)
    config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert set(config) == set(peft_config.LORA_KEYS) - {"runtime_config"}
    if row == "per_rule_ranks":
        assert (config["r"], config["rank_pattern"]) == (4, {r"model\.layers\.0\.self_attn\.q_proj": 2})
    if row.startswith("bias_"):
        assert config["bias"] == {"bias_all": "all", "bias_lora_only": "lora_only"}.get(row, "none")


def test_merged_adapter_exports_and_matches_peft_merging_the_exported_sources(tmp_path):
    """Two jpeft adapters (other targets, other ranks) exported as one PEFT folder; PEFT's
    `add_weighted_adapter` on what it loaded gives the outputs of `jpeft.merge_adapters`, and
    the merged adapter exports and loads in PEFT like any other."""
    params, modules, _, _, task = KINDS["llama"]
    one = jpeft.Spec({LL_QV: jpeft.LoRA(rank=4, alpha=8)})
    two = jpeft.Spec({r"layers_\d/self_attn/q_proj/kernel|layers_1/mlp/up_proj/kernel": jpeft.LoRA(rank=2, alpha=1)})
    trees = [trained_like(jpeft.init(jax.random.PRNGKey(i), params, s)) for i, s in enumerate((one, two))]
    export_peft_adapters(str(tmp_path / "src"), {"default": (trees[0], one), "two": (trees[1], two)},
                         modules=modules, task_type=task)
    model = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "src"))
    model.load_adapter(str(tmp_path / "src" / "two"), adapter_name="two")
    model.add_weighted_adapter(["default", "two"], [0.6, 1.5], "merged", combination_type="svd", svd_rank=5)
    model.set_adapter("merged")
    merged = jpeft.merge_adapters(trees, [one, two], [0.6, 1.5], "svd", svd_rank=5)
    want = jax_out("llama", jpeft.apply(*merged))
    np.testing.assert_allclose(torch_out("llama", model), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out("llama", params))
    export_peft(str(tmp_path / "merged"), *merged, modules=modules, task_type=task)
    loaded = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "merged"))
    np.testing.assert_allclose(torch_out("llama", loaded), want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft") / "lora"
    peft_folder("llama", dict(target_modules=["q_proj", "v_proj"]), directory)
    return directory


Q1 = "base_model.model.model.layers.1.self_attn.q_proj"


def _edit_tensors(d, change):
    tensors = load_file(d / "adapter_model.safetensors")
    save_file(change(tensors), str(d / "adapter_model.safetensors"))


def _edit_config(d, change):
    config = json.load(open(d / "adapter_config.json"))
    json.dump(change(config), open(d / "adapter_config.json", "w"))


ERROR_ROWS = {
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != f"{Q1}.lora_B.weight"}),
                       r"layers.1.self_attn.q_proj.lora_B.weight is missing"),
    "missing_module": (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if not k.startswith(Q1)}),
                       r"selects 'model.layers.1.self_attn.q_proj' .* no LoRA tensors"),
    "missing_config": (lambda d: os.remove(d / "adapter_config.json"), "no adapter_config.json"),
    "missing_weights": (lambda d: os.remove(d / "adapter_model.safetensors"), "no adapter_model.safetensors"),
    "corrupt_config": (lambda d: open(d / "adapter_config.json", "w").write("{\"r\": 4,"), "not valid JSON"),
    "corrupt_weights": (lambda d: open(d / "adapter_model.safetensors", "wb").write(b"\x10\x00garbage"),
                        "not a readable safetensors file"),
    "fractional_r": (lambda d: _edit_config(d, lambda c: {**c, "r": 4.7}), r"r=4.7: expected a positive integer"),
    "wrong_r": (lambda d: _edit_config(d, lambda c: {**c, "r": 3}), "the factors have rank 4, the config says r=3"),
    "int_tensor": (lambda d: _edit_tensors(d, lambda t: {**t, f"{Q1}.lora_A.weight": t[f"{Q1}.lora_A.weight"].astype(
        np.int32)}), "lora_A.weight' has dtype int32"),
    "renamed_module": (lambda d: _edit_tensors(d, lambda t: {k.replace("layers.1", "layers.7"): v
                                                             for k, v in t.items()}),
                       r"torch module 'model.layers.7.self_attn.(q|v)_proj' is not in this model"),
    "stray_tensor": (lambda d: _edit_tensors(
                         d, lambda t: {**t, "base_model.model.model.norm.extra": np.ones(2, np.float32)}),
                     "'base_model.model.model.norm.extra' is not a PEFT LoRA tensor name"),
    "unknown_key": (lambda d: _edit_config(d, lambda c: {**c, "lora_frobnicate": 1}),
                    "key 'lora_frobnicate' is not in jpeft's LORA config table"),
    "use_qalora": (lambda d: _edit_config(d, lambda c: {**c, "use_qalora": True}), "use_qalora=True is not supported"),
    "loftq": (lambda d: _edit_config(d, lambda c: {**c, "init_lora_weights": "loftq"}),
              "path_initial_model_for_weight_conversion"),
    "pissa_niter": (lambda d: _edit_config(d, lambda c: {**c, "init_lora_weights": "pissa_niter_4"}),
                    "path_initial_model_for_weight_conversion"),
    "target_parameters": (lambda d: _edit_config(d, lambda c: {**c, "target_parameters": ["experts.w"]}),
                          "target_parameters names experts.w, but the file has no factors for it"),
    "bias_without_bias_mode": (lambda d: _edit_tensors(d, lambda t: {**t, "base_model.model.model.norm.bias":
                                                                     np.ones(16, np.float32)}),
                               "norm.bias is neither in modules_to_save nor a bias that bias='none' saves"),
}


@pytest.mark.parametrize("row", list(ERROR_ROWS))
def test_bad_folders_are_refused_naming_the_problem(row, folder, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(folder, directory)
    damage, match = ERROR_ROWS[row]
    damage(directory)
    with pytest.raises(jpeft.SpecError, match=match):
        import_peft(str(directory), KINDS["llama"][0], modules=KINDS["llama"][1])


def test_a_bfloat16_folder_imports_its_exact_values(folder, tmp_path):
    """PEFT saves adapters in the model's dtype; bfloat16 factors import exactly (widened)."""
    directory = tmp_path / "bf16"
    shutil.copytree(folder, directory)
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    original = torch_load(str(directory / "adapter_model.safetensors"))
    torch_save({k: v.to(torch.bfloat16) for k, v in original.items()}, str(directory / "adapter_model.safetensors"))
    tree, _ = import_peft(str(directory), KINDS["llama"][0], modules=KINDS["llama"][1])
    want = original[f"{Q1}.lora_A.weight"].to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(tree["layers_1"]["self_attn"]["q_proj"]["kernel"].train["a"]), want)


def test_exports_peft_would_load_without_effect_are_refused(tmp_path):
    params, modules = KINDS["llama"][:2]
    spec = jpeft.Spec({LL_QV: jpeft.LoRA(rank=4)})
    tree = jpeft.init(jax.random.PRNGKey(0), params, spec)
    no_prefix = ModuleMap(state_keys=modules.state_keys)   # layers.0.self_attn.q_proj: not the HF name
    with pytest.raises(jpeft.SpecError, match="PEFT would load it with missing keys"):
        export_peft(str(tmp_path / "a"), tree, spec, modules=no_prefix)
    tied = dataclasses.replace(LL, tie_embeddings=True)
    tied_params = {k: v for k, v in params.items() if k != "lm_head"}
    spec = jpeft.Spec({"embed_tokens/embedding": jpeft.LoRA(rank=4)})
    with pytest.raises(jpeft.SpecError, match="ties this weight"):
        export_peft(str(tmp_path / "b"), jpeft.init(jax.random.PRNGKey(0), tied_params, spec), spec,
                    modules=hf_module_map(tied))
    bert_params, bert_map = KINDS["bert"][:2]
    spec = jpeft.Spec({BERT_QV: jpeft.LoRA(rank=4), r"layer_0/attention/query/bias|layer_1/output/bias": jpeft.Full()})
    with pytest.raises(jpeft.SpecError, match="this set is none of these"):
        export_peft(str(tmp_path / "c"), jpeft.init(jax.random.PRNGKey(0), bert_params, spec), spec, modules=bert_map)


@pytest.mark.parametrize("peft_type, config_class", [("LORA", "LoraConfig"), ("ADALORA", "AdaLoraConfig"),
                                                     ("GRALORA", "GraloraConfig"), ("VBLORA", "VBLoRAConfig"),
                                                     ("RANDLORA", "RandLoraConfig")])
def test_the_config_tables_cover_the_installed_peft(peft_type, config_class):
    fields = {f.name for f in dataclasses.fields(getattr(peft, config_class))}
    table = peft_rows.TABLES[peft_type]
    assert set(table) == fields, (f"keys PEFT has that the table lacks: {fields - set(table)}; "
                                  f"stale: {set(table) - fields}")
    for key, entry in table.items():
        assert entry.handling in ("honoured", "irrelevant", "refused") and entry.why, key


def test_multi_adapter_folders_both_ways(tmp_path):
    params, modules = KINDS["llama"][:2]
    model = peft.get_peft_model(fresh("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    want = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        want[name] = torch_out("llama", model)
    model.save_pretrained(str(tmp_path / "a"))
    adapters = import_peft_adapters(str(tmp_path / "a"), params, modules=modules)
    assert sorted(adapters) == ["default", "second"]
    for name, (tree, spec) in adapters.items():
        np.testing.assert_allclose(jax_out("llama", jpeft.apply(tree, spec)), want[name], atol=1e-4, rtol=1e-4)
    assert not np.allclose(want["default"], want["second"], atol=1e-2)
    export_peft_adapters(str(tmp_path / "b"), adapters, modules=modules, task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "b"))
    loaded.load_adapter(str(tmp_path / "b" / "second"), adapter_name="second")
    for name in ("default", "second"):
        loaded.set_adapter(name)
        np.testing.assert_allclose(torch_out("llama", loaded), want[name], atol=1e-4, rtol=1e-4)
    with pytest.raises(jpeft.SpecError, match="keeps the 'default' adapter at the top"):
        export_peft_adapters(str(tmp_path / "c"), {"second": adapters["second"]}, modules=modules)
    os.remove(tmp_path / "a" / "second" / "adapter_model.safetensors")
    with pytest.raises(jpeft.SpecError, match="second: no adapter_model.safetensors"):
        import_peft_adapters(str(tmp_path / "a"), params, modules=modules)


ADALORA = dict(init_r=4, target_r=2, lora_alpha=8, total_step=6, tinit=1, tfinal=2, deltaT=1,
               target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("allocated", [False, True], ids=["during_training", "after_final_allocation"])
def test_adalora_folders_import_with_the_same_outputs(allocated, tmp_path):
    params, modules = KINDS["llama"][:2]
    model = peft.get_peft_model(fresh("llama"), peft.AdaLoraConfig(**ADALORA))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    if allocated:   # PEFT's RankAllocator through its final phase: the file holds the kept triplets
        model.train()
        for step in range(ADALORA["total_step"]):
            model.zero_grad()
            torch.sum(model(torch.from_numpy(IDS)).logits ** 2).backward()
            model.base_model.update_and_allocate(step)
        model.eval()
        assert model.peft_config["default"].rank_pattern
    want = torch_out("llama", model)
    model.save_pretrained(str(tmp_path / "a"))
    tree, spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    assert isinstance(spec.rules[0][1], AdaLoRA) and spec.rules[0][1].init_r == 4
    np.testing.assert_allclose(jax_out("llama", jpeft.apply(tree, spec)), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out("llama", params))
    kept = [int(np.count_nonzero(n.train["e"])) for _, n in leaves_with_paths(tree, is_leaf=jpeft.is_adapter)
            if isinstance(n, jpeft.Adapter)]
    assert sum(kept) == (2 * 2 * 2 if allocated else 4 * 4)


def test_adalora_exports_load_in_peft_with_the_same_outputs(tmp_path):
    params, modules = KINDS["llama"][:2]
    method = AdaLoRA(init_r=4, target_r=2, alpha=8.0, total_step=6, tinit=1, tfinal=2)
    spec = jpeft.Spec({LL_QV: method})
    tree = trained_like(jpeft.init(jax.random.PRNGKey(0), params, spec))
    tree = jax.tree.map(lambda n: n.replace(train={**n.train, "e": n.train["e"].at[1].set(0.0)})
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)   # a masked triplet
    want = jax_out("llama", jpeft.apply(tree, spec))
    export_peft(str(tmp_path / "a"), tree, spec, modules=modules, task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "a"))
    np.testing.assert_allclose(torch_out("llama", loaded), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out("llama", params))
    back, back_spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    assert back_spec.rules[0][1] == method
    np.testing.assert_allclose(jax_out("llama", jpeft.apply(back, back_spec)), want, atol=1e-5, rtol=1e-5)


METHOD_ROWS = {   # PEFT tuner types with a `jpeft.interop.peft_rows` row: (config class, options, jpeft method)
    "gralora": ("GraloraConfig", dict(r=4, alpha=8, gralora_k=2), GraLoRA(rank=4, alpha=8.0, k=2)),
    "gralora_hybrid": ("GraloraConfig", dict(r=4, alpha=8, gralora_k=2, hybrid_r=2),
                       GraLoRA(rank=4, alpha=8.0, k=2, hybrid_rank=2)),
    "vblora": ("VBLoRAConfig", dict(r=4, num_vectors=16, vector_length=8, topk=2),
               VBLoRA(rank=4, num_vectors=16, vector_length=8, topk=2)),
    "randlora": ("RandLoraConfig", dict(r=4, randlora_alpha=8), RandLoRA(rank=4, alpha=8.0)),
    "randlora_sparse": ("RandLoraConfig", dict(r=4, randlora_alpha=8, sparse=True),
                        RandLoRA(rank=4, alpha=8.0, basis="sparse")),
}


@pytest.mark.parametrize("row", list(METHOD_ROWS))
def test_method_row_folders_both_ways(row, tmp_path):
    params, modules = KINDS["llama"][:2]
    config_class, options, method = METHOD_ROWS[row]
    model = peft.get_peft_model(fresh("llama"), getattr(peft, config_class)(target_modules=["q_proj", "up_proj"],
                                                                             **options))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    want = torch_out("llama", model)
    model.save_pretrained(str(tmp_path / "a"))
    tree, spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    assert [m for _, m in spec.rules] == [method]
    np.testing.assert_allclose(jax_out("llama", jpeft.apply(tree, spec)), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_out("llama", params))
    export_peft(str(tmp_path / "b"), tree, spec, modules=modules, task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "b"))
    np.testing.assert_allclose(torch_out("llama", loaded), want, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_layout_both_ways(tmp_path):
    """GPT-2's `Conv1D` projections (PEFT `fan_in_fan_out`): factors as for a Linear, whole weights
    (`modules_to_save`) in their `(in, out)` layout."""
    from tests.models import gpt2

    gc = gpt2.GPT2Config()
    hf_cfg = transformers.GPT2Config(vocab_size=gc.vocab_size, n_positions=gc.positions, n_embd=gc.width,
                                     n_layer=gc.layers, n_head=gc.heads, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    params, modules, forward = (gpt2.params_from_hf(numpy_state(hf), gc), gpt2.hf_module_map(gc),
                                jax.jit(gpt2.GPT2(gc).apply))

    def torch_logits(model):
        with torch.no_grad():
            return model(torch.from_numpy(IDS[:, :gc.positions])).logits.numpy()

    def jax_logits(p):
        return np.asarray(forward({"params": p}, IDS[:, :gc.positions]))

    def fresh_gpt2():
        with no_init_weights():
            model = transformers.GPT2LMHeadModel(hf_cfg)
        model.load_state_dict(state)
        return model.eval()

    np.testing.assert_allclose(jax_logits(params), torch_logits(hf), atol=1e-5, rtol=1e-5)
    model = peft.get_peft_model(fresh_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                               fan_in_fan_out=True, modules_to_save=["h.1.mlp.c_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    want = torch_logits(model)
    model.save_pretrained(str(tmp_path / "a"))
    tree, spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    np.testing.assert_allclose(jax_logits(jpeft.apply(tree, spec)), want, atol=1e-4, rtol=1e-4)
    assert visible(want, jax_logits(params))
    export_peft(str(tmp_path / "b"), tree, spec, modules=modules, task_type="CAUSAL_LM")
    assert json.load(open(tmp_path / "b" / "adapter_config.json"))["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(fresh_gpt2(), str(tmp_path / "b"))
    np.testing.assert_allclose(torch_logits(loaded), want, atol=1e-4, rtol=1e-4)


class _Experts(torch.nn.Module):
    """A raw `(E, in, out)` expert stack (the MoE layout PEFT's `target_parameters` adapts)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 8, 6))

    def forward(self, x):
        return torch.einsum("eti,eio->eto", x, self.w)


class _TransposedExperts(_Experts):
    is_transposed = True   # PEFT then keeps the stack's in/out order (ModuleMap.transposed_experts)


class _MoE(torch.nn.Module):
    def __init__(self, experts=_Experts):
        super().__init__()
        self.experts = experts()

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("transposed", [False, True], ids=["peft_swaps", "is_transposed"])
def test_target_parameters_expert_stacks_both_ways(transposed, tmp_path):
    """PEFT's LoRA on a raw 3-D parameter: one adapter per expert, jpeft's view
    `batch=(0,), inputs=(1,), outputs=(2,)` (added to the returned Spec)."""
    experts = _TransposedExperts if transposed else _Experts
    modules = ModuleMap(transposed_experts=frozenset({"experts"} if transposed else ()))
    torch.manual_seed(0)
    model = _MoE(experts)
    params = {"experts": {"w": jax.numpy.asarray(model.experts.w.detach().numpy())}}
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    forward = lambda p: np.asarray(jax.numpy.einsum("eti,eio->eto", x, p["experts"]["w"]))  # noqa: E731
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                             target_parameters=["experts.w"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen))
        want = peft_model(torch.from_numpy(x)).numpy()
    peft_model.save_pretrained(str(tmp_path / "a"))
    tree, spec = import_peft(str(tmp_path / "a"), params, modules=modules)
    assert tree["experts"]["w"].train["a"].shape == (3, 8, 2) and spec.view_for("experts/w") is not None
    np.testing.assert_allclose(forward(jpeft.apply(tree, spec)), want, atol=1e-4, rtol=1e-4)
    assert visible(want, forward(params))
    export_peft(str(tmp_path / "b"), tree, spec, modules=modules)
    assert json.load(open(tmp_path / "b" / "adapter_config.json"))["target_parameters"] == ["experts.w"]
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(_MoE(experts), str(tmp_path / "b"))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.from_numpy(x)).numpy(), want, atol=1e-4, rtol=1e-4)
