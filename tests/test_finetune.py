"""The experiment runner end to end on the random-weight `tiny` Llama (real SmolLM2 runs are the
README's main job): metrics files, checkpoint + resume bit-identical, HF export that PEFT loads."""

import json

import jax
import numpy as np
import pytest
from absl import flags

import jpeft
from experiments import finetune

FLAGS = flags.FLAGS


def run(tmp_path, *args):
    FLAGS.unparse_flags()
    FLAGS(["finetune", "--model=tiny", "--task=arithmetic", "--batch=2", "--mesh=data=2,tensor=4", "--eval_count=8",
           "--forgetting=false",
           f"--data_dir={tmp_path / 'tfds'}", "--steps=4", "--ckpt_every=2", *args])
    return finetune.train()


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_resumes_bit_identically(tmp_path):
    straight = run(tmp_path, f"--out_dir={tmp_path / 'a'}")
    assert {"metrics.csv", "curves.png", "tb"} <= {p.name for p in (tmp_path / "a").iterdir()}
    run(tmp_path, f"--out_dir={tmp_path / 'b'}", f"--ckpt_dir={tmp_path / 'ckpt'}", "--stop_at=2")
    resumed = run(tmp_path, f"--out_dir={tmp_path / 'c'}", f"--ckpt_dir={tmp_path / 'ckpt'}", "--resume",
                  f"--export_hf={tmp_path / 'hf'}")
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], straight["params"])
    config = json.load(open(tmp_path / "hf" / "adapter_config.json"))
    assert config["r"] == 8 and "model.layers.0.self_attn.q_proj" in config["target_modules"]


@pytest.mark.slow
def test_qlora_run_resumes_and_its_export_loads_in_peft_as_plain_lora(tmp_path):
    """`--quantize=nf4`: the frozen block kernels train as NF4 codes (through a checkpoint and a
    resume); the exported adapter is a plain PEFT LoRA adapter that gives, over the dequantised
    base in transformers, the logits jpeft gives over the quantised one."""
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    from jpeft.models.llama import Llama, LlamaConfig
    from tests.models.test_llama import torch_model

    common = ("--quantize=nf4", f"--ckpt_dir={tmp_path / 'ckpt'}")
    run(tmp_path, *common, f"--out_dir={tmp_path / 'a'}", "--stop_at=2")
    resumed = run(tmp_path, *common, f"--out_dir={tmp_path / 'b'}", "--resume", f"--export_hf={tmp_path / 'hf'}")
    params, spec = resumed["params"], resumed["spec"]
    node = params["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert jpeft.quant.is_quantized(node.base) and node.base.config == jpeft.quant.nf4()
    assert float(np.max(np.abs(np.asarray(node.train["b"])))) > 0          # trained
    base = jpeft.dequantize(jax.tree.map(lambda n: n.base if isinstance(n, jpeft.Adapter) else n, params,
                                         is_leaf=jpeft.is_adapter))
    config = LlamaConfig.reference()
    loaded = peft.PeftModel.from_pretrained(torch_model(config, jax.device_get(base)), str(tmp_path / "hf"))
    ids = np.array([[1, 40, 50, 60, 70, 80, 90, 100]], np.int32)
    with torch.no_grad():
        want = loaded(torch.from_numpy(ids)).logits.numpy()
    got = jpeft.factored(Llama(config).apply, spec)({"params": jax.device_get(params)}, ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compare_tabulates_methods(tmp_path):
    from experiments import compare

    FLAGS.unparse_flags()
    FLAGS(["compare", "--model=tiny", "--task=arithmetic", "--batch=2", "--mesh=data=2,tensor=4", "--eval_count=8",
           "--forgetting=false",
           f"--data_dir={tmp_path / 'tfds'}", "--steps=2", f"--compare_dir={tmp_path / 'cmp'}", "--methods=lora,dora"])
    compare.main([])
    lines = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert lines[0].startswith("method,trainable,step_s,peak_mb,accuracy_before") and len(lines) == 3
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_minilm_learns_fortune_topics_as_a_program(tmp_path):
    """`python -m experiments.finetune` exits 0 and the real MiniLM classifier's accuracy rises."""
    import csv
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # the main job's one device
    done = subprocess.run([sys.executable, "-m", "experiments.finetune", "--model=minilm", "--task=fortunes",
                           "--steps=20", "--batch=16", "--eval_count=128", f"--data_dir={tmp_path / 'tfds'}",
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=900, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # not installed
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [float(r["eval_accuracy"]) for r in csv.DictReader(open(tmp_path / "out" / "metrics.csv"))
             if r["eval_accuracy"]]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.1, evals  # 8 topics: chance is 1/8
    assert "after: accuracy" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--method=loca", "--rank=4"], r"--rank: method 'loca' has no 'rank' option; its options are \[.*n_coeffs"),
    (["--method=nope"], r"--method='nope': unknown; known methods: .*lora"),
    (["--method_options={\"rnak\": 4}"], r"method 'lora' has no option\(s\) \['rnak'\]"),
    (["--method_options=[1]"], "expected a JSON object"),
    (["--rank=4", "--method_options={\"rank\": 8}"], "disagree; set it once"),
    (["--method=lora", "--alpha=nan"], "option 'alpha' must be a finite float"),
    (["--method=loca", "--quantize=nf4"], r"--quantize=nf4 with --method=loca: .*does not take a quantised base"),
    (["--method_options={\"init\": \"loftq\"}", "--quantize=int8"], r"--quantize=int8 .*chooses and quantises its own"),
    (["--method=pissa", "--quantize=nf4", "--export_hf=x"], r"--export_hf with --quantize=nf4 and init='pissa'"),
    (["--method=lift", "--method_options={\"density\": 0.05, \"lora_rank\": 8}"], "set only one of density, lora_rank"),
])
def test_bad_method_flags_are_refused_before_anything_loads(args, message, tmp_path, monkeypatch):
    from absl import app

    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(app.UsageError, match=message):
        run(tmp_path, *args)


def test_run_level_flags_only_override_when_given(tmp_path):
    FLAGS.unparse_flags()
    FLAGS(["finetune", "--method=lori"])
    assert finetune.method_from_flags() == jpeft.method("lori")          # its own alpha, not a runner default
    FLAGS.unparse_flags()
    FLAGS(["finetune", "--method=lora", "--rank=4", "--alpha=2"])
    assert finetune.method_from_flags() == jpeft.LoRA(rank=4, alpha=2.0)
    FLAGS.unparse_flags()
    FLAGS(["finetune", "--method=adalora", "--steps=30"])
    assert finetune.method_from_flags().total_step == 30
    FLAGS.unparse_flags()


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_keeps_metrics_and_exports_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite loss .*Stopped .*nothing exported"):
        run(tmp_path, f"--out_dir={tmp_path / 'a'}", "--learning_rate=1e30", "--steps=6", "--ckpt_every=100",
            f"--export_hf={tmp_path / 'hf'}")
    assert not (tmp_path / "hf").exists()
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step") and len(rows) >= 3
    one = run(tmp_path, f"--out_dir={tmp_path / 'b'}", "--steps=1", "--ckpt_every=100")   # one step: no schedule error
    assert one["trainable"] > 0
