"""The runner across devices and processes (`--mesh`): the same global batch and seed train the
same adapter on 1 device, on 4 devices in one process and on 2 processes × 2 devices (data
parallel and data=2,fsdp=2); a checkpoint written by 2 processes restores losslessly in one;
only process 0 writes; HD-PiSSA runs through the runner; bad meshes and batches are refused
before anything loads. The subprocess runs use `--task=shakespeare` so that the evaluation
(perplexity, gathered over the mesh) is a continuous number to compare."""

import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags
from safetensors.numpy import load_file

import jpeft
from experiments import finetune, scale
from jpeft.adapter import is_adapter
from jpeft.paths import leaves_with_paths
from launch import run_multiprocess

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--model=tiny", "--task=shakespeare", "--batch=8", "--eval_count=8", "--steps=4", "--max_len=64"]


def one_process(devices: int, args: list[str]) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "experiments.finetune", *COMMON, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def two_processes(args: list[str]) -> list:
    results = run_multiprocess("experiments.finetune", [*COMMON, *args], num_processes=2, devices_per_process=2,
                               cwd=ROOT, timeout=600)
    for r in results:
        assert r.returncode == 0, r.output[-4000:]
    return results


def adapter(out) -> dict:
    return load_file(os.path.join(out, "hf", "adapter_model.safetensors"))


def metrics(out) -> tuple[np.ndarray, dict]:
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    losses = np.array([float(r["loss"]) for r in rows if r["loss"]])
    evals = {int(r["step"]): float(r["eval_perplexity"]) for r in rows if r["eval_perplexity"]}
    return losses, evals


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess run once: `{name: out_dir}` (+ the 2-process checkpoint and its outputs)."""
    tmp = tmp_path_factory.mktemp("scale")
    data = f"--data_dir={tmp / 'tfds'}"
    out = {name: str(tmp / name) for name in ("one", "four", "two_procs", "four_fsdp", "two_procs_fsdp",
                                                "ckpt_writer", "resumed")}
    io = lambda name: [data, f"--out_dir={out[name]}", f"--export_hf={os.path.join(out[name], 'hf')}"]  # noqa: E731
    one_process(1, io("one"))  # builds the data for the others
    one_process(4, [*io("four"), "--mesh=data=-1"])
    procs = two_processes([*io("two_procs"), "--mesh=data=-1"])
    one_process(4, [*io("four_fsdp"), "--mesh=data=2,fsdp=2"])
    two_processes([*io("two_procs_fsdp"), "--mesh=data=2,fsdp=2"])
    ckpt = str(tmp / "ckpt")
    two_processes([*io("ckpt_writer"), "--mesh=data=2,fsdp=2", f"--ckpt_dir={ckpt}", "--ckpt_every=2", "--stop_at=2"])
    one_process(1, [*io("resumed"), f"--ckpt_dir={ckpt}", "--ckpt_every=2", "--resume"])
    return {**out, "ckpt": ckpt, "procs": procs}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["four", "two_procs", "four_fsdp", "two_procs_fsdp"])
def test_the_same_global_batch_trains_the_same_adapter_on_any_mesh(runs, name):
    want, got = adapter(runs["one"]), adapter(runs[name])
    assert sorted(got) == sorted(want) and len(want) == 4 * 7 * 2
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
    (losses, evals), (want_losses, want_evals) = metrics(runs[name]), metrics(runs["one"])
    assert len(losses) == 4
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
    assert evals.keys() == {0, 4} and evals[4] < evals[0]  # gathered over the mesh: the same perplexity
    np.testing.assert_allclose([evals[0], evals[4]], [want_evals[0], want_evals[4]], rtol=1e-5)


@pytest.mark.slow
def test_only_process_0_writes(runs):
    first, second = runs["procs"]
    assert "before: perplexity" in first.output and "mesh: data=4,fsdp=1,tensor=1 over 2 processes" in first.output
    assert "perplexity" not in second.output and "fine-tuning" not in second.output
    assert sorted(os.listdir(runs["two_procs"])) == ["curves.png", "hf", "metrics.csv", "tb"]
    assert len(os.listdir(os.path.join(runs["two_procs"], "tb"))) == 1  # one event file: one writer


@pytest.mark.slow
def test_a_two_process_checkpoint_restores_in_one_process_and_continues(runs):
    from jpeft.checkpoint import TrainCheckpointer

    # Lossless: the state the 2-process run saved at step 2 comes back bit for bit in this one
    # process (its step-2 export is the gathered state of those processes).
    saved = adapter(runs["ckpt_writer"])
    with TrainCheckpointer(runs["ckpt"]) as ckpt:
        assert ckpt.latest_step() == 4  # the resumed run saved its own steps
        FLAGS.unparse_flags()
        FLAGS(["finetune", *COMMON])
        model, base, _ = finetune.load_model("tiny")
        spec = jpeft.Spec({finetune.LM_TARGET: jpeft.LoRA(rank=8, alpha=8)})
        tx = finetune.optimizer("adamw", 2e-3, 4)
        state = ckpt.restore(base, tx.init(jpeft.split(jpeft.init(jax.random.PRNGKey(0), base, spec))[0]), step=2,
                             spec=spec)
    nodes = dict(leaves_with_paths(state["params"], is_leaf=is_adapter))
    node = nodes["layers_1/self_attn/q_proj/kernel"]
    np.testing.assert_array_equal(node.train["a"].T,
                                  saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"])
    np.testing.assert_array_equal(node.train["b"].T,
                                  saved["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"])
    # ... and training continues from it in one process as the uninterrupted 1-device run does.
    want, got = adapter(runs["one"]), adapter(runs["resumed"])
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
    losses, _ = metrics(runs["resumed"])
    np.testing.assert_allclose(losses, metrics(runs["one"])[0][2:], atol=1e-5, rtol=0)


def run_here(tmp_path, *args):
    FLAGS.unparse_flags()
    FLAGS(["finetune", "--model=tiny", "--task=shakespeare", "--batch=8", "--eval_count=8", "--max_len=64",
           f"--data_dir={tmp_path / 'tfds'}", f"--out_dir={tmp_path / 'out'}", *args])
    return finetune.train()


@pytest.mark.slow
def test_hd_pissa_trains_through_the_runner_on_the_data_axis(tmp_path):
    """8 devices, r=2 each: every device trains its own slice of the principal frames, and the
    folded update of one step spans more than data-parallel PiSSA's 2r directions."""
    model, base, _ = finetune.load_model("tiny")
    # (two steps: the warm-up schedule's first learning rate is 0, so one folded update)
    out = run_here(tmp_path, "--method=hd_pissa", "--rank=2", "--steps=2", "--mesh=data=-1", "--forgetting=false")
    spec = out["spec"]
    assert spec.rules[0][1].devices == 8
    node = dict(leaves_with_paths(out["params"], is_leaf=is_adapter))["layers_0/mlp/up_proj/kernel"]
    assert node.train["a"].shape == (8, 512, 2) and node.train["a"].sharding.spec[0] == "data"
    merged = dict(leaves_with_paths(jpeft.merge(jax.device_get(out["params"]), spec)))["layers_0/mlp/up_proj/kernel"]
    delta = np.asarray(merged, np.float64) - np.asarray(base["layers_0"]["mlp"]["up_proj"]["kernel"], np.float64)
    s = np.linalg.svd(delta, compute_uv=False)
    rank = int(np.sum(s > 1e-4 * s[0]))
    assert 2 * 2 < rank <= 2 * 8 * 2, rank


@pytest.mark.slow
def test_non_writers_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scale, "is_writer", lambda: False)
    run_here(tmp_path, "--steps=1", "--eval_count=1", "--max_len=32", f"--export_hf={tmp_path / 'hf'}",
             "--mesh=data=-1")
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
    out = capsys.readouterr().out  # (TFDS announces the dataset it builds; the runner says nothing)
    assert "mesh:" not in out and "before:" not in out and "parameters:" not in out


@pytest.mark.parametrize("args, message", [
    (["--mesh=data=3"], r"--mesh=data=3: the axes multiply to 3 devices; the job has 8 devices \(1 process × 8\)"),
    (["--mesh=data=3,fsdp=-1"], "the fixed axes need a multiple of 3 devices; the job has 8"),
    (["--mesh=dp=8"], r"'dp=8' is not <axis>=<size> with an axis of \('data', 'fsdp', 'tensor'\)"),
    (["--mesh=data=-1,fsdp=-1"], "at most one axis"),
    (["--mesh=data=two"], "must be an integer"),
    (["--batch=6"], r"--batch=6: the batch is split over the mesh's data × fsdp = 8 devices .*multiple of 8"),
    (["--batch=6", "--mesh=data=4,tensor=2"], r"--batch=6: .* data × fsdp = 4 devices"),
    (["--mesh=data=2,fsdp=2,tensor=2"], "on XLA:CPU a mesh with data, fsdp and tensor all > 1"),
    (["--method=hd_pissa", "--mesh=data=4,fsdp=2"], "runs on the data axis only"),
    (["--method=hd_pissa", '--method_options={"devices": 4}'], "devices=4: .* data axis, which has 8 devices"),
    (["--method=hd_pissa", "--export_hf=x"],
     "--export_hf with --method=hd_pissa: HF PEFT export needs one of LoRA, DoRA"),
])
def test_bad_meshes_and_batches_are_refused_before_anything_loads(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(app.UsageError, match=message):
        run_here(tmp_path, *args)


def test_resuming_with_an_incompatible_spec_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from jpeft.checkpoint import TrainCheckpointer

    toy = {"layers_0": {"self_attn": {"q_proj": {"kernel": np.ones((16, 16), np.float32)}}}}
    spec = jpeft.Spec({finetune.LM_TARGET: jpeft.LoRA(rank=4, alpha=8)})
    params = jpeft.init(jax.random.PRNGKey(0), toy, spec)
    with TrainCheckpointer(str(tmp_path / "ckpt")) as ckpt:
        ckpt.save(2, params=params, spec=spec, opt_state={}, rng=jax.random.PRNGKey(0))
    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(app.UsageError, match=r"--resume --ckpt_dir=.*spec differs.*rank"):
        run_here(tmp_path, f"--ckpt_dir={tmp_path / 'ckpt'}", "--resume", "--rank=8")


def test_layout_rows_and_global_batches():
    mesh = scale.make_mesh({"data": 4, "tensor": 2})
    layout = scale.Layout(mesh)
    assert layout.shards == 4 and layout.rows(8) == (0, 8)  # one process holds every row
    batch = layout.put({"ids": np.arange(16).reshape(8, 2)})
    assert batch["ids"].shape == (8, 2) and batch["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(16).reshape(8, 2))


def test_launcher_passes_the_mesh_on():
    from launch.env import module_args

    assert module_args(["--steps=3"], "data=2,fsdp=2") == ["--steps=3", "--mesh=data=2,fsdp=2"]
    assert module_args(["--steps=3"], None) == ["--steps=3"]
    with pytest.raises(ValueError, match="give it once"):
        module_args(["--mesh=data=2"], "data=4")
    done = subprocess.run([sys.executable, "-m", "launch", "--mode=tpu", "--tpu_name=p", "--zone=z", "--dry_run",
                           "--steps=run", "--mesh=data=-1", "--module=experiments.finetune", "--", "--method=lora"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("launch.worker experiments.finetune --method=lora --mesh=data=-1'")


@pytest.mark.slow
def test_tensor_parallel_and_fsdp_in_one_process_train_the_same_adapter(runs, tmp_path):
    """`fsdp=2,tensor=4` on this process's 8 devices against the 1-device run."""
    FLAGS.unparse_flags()
    FLAGS(["finetune", *COMMON, f"--data_dir={os.path.dirname(runs['one'])}/tfds", f"--out_dir={tmp_path / 'out'}",
           f"--export_hf={tmp_path / 'out' / 'hf'}", "--mesh=fsdp=2,tensor=4"])
    out = finetune.train()
    q = dict(leaves_with_paths(out["params"], is_leaf=is_adapter))["layers_0/mlp/up_proj/kernel"]
    assert q.base.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # (512, 1376): 1376 on fsdp
    want, got = adapter(runs["one"]), adapter(str(tmp_path / "out"))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics(str(tmp_path / "out"))[0], metrics(runs["one"])[0], atol=1e-5, rtol=0)
