"""Orbax checkpoints: adapter-only export/import for every conformance case, full training state
resume (bit-identical), and the clear errors (docs/design.md §7, docs/robustness.md)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.checkpoint import CheckpointError, TrainCheckpointer, load_adapters, save_adapters
from tests.conformance_table import CASES, adapted, base_params, inputs, loss, targets


def perturb(tree):
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 64))
    return jax.tree.map(lambda n: n.replace(train=jax.tree.map(
                            lambda v: v + 0.1 * jax.random.normal(next(keys), v.shape), n.train))
                        if isinstance(n, jpeft.Adapter) else n, tree, is_leaf=jpeft.is_adapter)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adapter_only_roundtrip_rebuilds_the_base(case, tmp_path):
    params, spec, tree = adapted(case)
    tree = perturb(tree)
    save_adapters(str(tmp_path / "a"), tree, spec)
    restored, saved_spec = load_adapters(str(tmp_path / "a"), params)
    assert saved_spec == spec
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, restored, tree)


def test_adapter_only_checkpoint_is_small_and_stores_no_base(tmp_path):
    big = {"w": jnp.ones((1024, 1024))}
    spec = jpeft.Spec({"w": jpeft.PiSSA(rank=4)})
    save_adapters(str(tmp_path / "a"), jpeft.init(jax.random.PRNGKey(0), big, spec), spec)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "a") for f in fs)
    assert size < 0.1 * 1024 * 1024 * 4  # the 4 MB base is rebuilt, not stored
    meta = json.load(open(tmp_path / "a" / "jpeft.json"))
    assert meta["versions"] == {"lora": 1} and meta["spec"]["rules"][0]["init"] == "pissa"


def test_mismatched_model_or_spec_names_the_first_difference(tmp_path):
    params, spec, tree = adapted(CASES[0])
    save_adapters(str(tmp_path / "a"), tree, spec)
    other = jax.tree.map(lambda x: x, params)
    other["blk"]["q_proj"]["kernel"] = jnp.ones((32, 50))
    with pytest.raises(CheckpointError,
                       match=r"blk/q_proj/kernel:train/b: the checkpoint has shape \(4, 48\), .* expects \(4, 50\)"):
        load_adapters(str(tmp_path / "a"), other)
    with pytest.raises(CheckpointError, match=r"the spec differs from the saved one: .*rank=8 \(saved 4\)"):
        load_adapters(str(tmp_path / "a"), params, jpeft.Spec({r"blk/(q_proj|v_proj)/kernel": jpeft.LoRA(rank=8)}))


def test_overwrite_is_explicit_and_atomic(tmp_path):
    params, spec, tree = adapted(CASES[0])
    path = str(tmp_path / "a")
    save_adapters(path, tree, spec)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        save_adapters(path, perturb(tree), spec)
    jax.tree.map(np.testing.assert_array_equal, load_adapters(path, params)[0], tree)

    def crash(*a, **k):
        raise RuntimeError("disk full")

    original = json.dump
    json.dump = crash  # the crash happens after the arrays are written, before the folder is complete
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            save_adapters(path, perturb(tree), spec, overwrite=True)
    finally:
        json.dump = original
    jax.tree.map(np.testing.assert_array_equal, load_adapters(path, params)[0], tree)  # old one intact
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no half-written folder left behind
    save_adapters(path, perturb(tree), spec, overwrite=True)
    jax.tree.map(np.testing.assert_array_equal, load_adapters(path, params)[0], perturb(tree))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_corrupted_and_incomplete_checkpoints_are_clear_errors(tmp_path):
    params, spec, tree = adapted(CASES[0])
    path = tmp_path / "a"
    save_adapters(str(path), tree, spec)
    (path / "jpeft.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="jpeft.json: corrupted"):
        load_adapters(str(path), params)
    (path / "jpeft.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete jpeft checkpoint"):
        load_adapters(str(path), params)
    save_adapters(str(tmp_path / "b"), tree, spec)
    for d, _, files in os.walk(tmp_path / "b" / "arrays"):
        for f in files:
            if os.path.basename(d) == "d":  # the OCDBT data files
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(d, f)) // 2)
    with pytest.raises(CheckpointError, match="cannot be restored|checkpoint has shape"):
        load_adapters(str(tmp_path / "b"), params)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_adapters(str(tmp_path / "missing"), params)


def _train(spec, params, steps, ckpt=None, start=None):
    """Adam steps with a per-step key and a toy 'data iterator' position; returns final params."""
    tx = optax.adam(1e-2)
    if start is None:
        tree, opt_state, rng, position = params, None, jax.random.PRNGKey(0), 0
        opt_state = tx.init(jpeft.split(tree)[0])
        first = 0
    else:
        tree, opt_state, rng, position, first = start["params"], start["opt_state"], start["rng"], \
            start["data_state"]["position"], start["step"]

    @jax.jit
    def step(trainable, frozen, opt_state, key):
        x = inputs() + 0.1 * jax.random.normal(key, inputs().shape)
        g = jax.grad(lambda t: loss(jpeft.apply(jpeft.combine(t, frozen), spec), x, targets()))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    trainable, frozen = jpeft.split(tree)
    for i in range(first, steps):
        rng, key = jax.random.split(rng)
        trainable, opt_state = step(trainable, frozen, opt_state, jax.random.fold_in(key, position))
        position += 1
        if ckpt is not None and i + 1 == ckpt[1]:
            ckpt[0].save(i + 1, params=jpeft.combine(trainable, frozen), spec=spec, opt_state=opt_state, rng=rng,
                         data_state={"position": position})
    return jpeft.combine(trainable, frozen), opt_state


def test_resume_is_bit_identical(tmp_path):
    _, spec, tree = adapted(CASES[0])
    straight, _ = _train(spec, tree, 12)
    with TrainCheckpointer(str(tmp_path / "run"), max_to_keep=2) as manager:
        _train(spec, tree, 5, ckpt=(manager, 5))
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        assert manager.latest_step() == 5
        like = optax.adam(1e-2).init(jpeft.split(tree)[0])
        resumed, _ = _train(spec, tree, 12, start=manager.restore(base_params(), like))
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_empty_step_folder_is_a_clear_error(tmp_path):
    _, spec, tree = adapted(CASES[0])
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            manager.restore(base_params(), None)
    os.makedirs(tmp_path / "run" / "7")
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        assert manager.latest_step() is None          # the incomplete step is skipped
        with pytest.raises(CheckpointError, match=r"run/7: cannot restore \(empty, truncated or corrupted"):
            manager.restore(base_params(), optax.adam(1e-2).init(jpeft.split(tree)[0]), step=7)


# ----------------------------------------------------------------------------- fault injection
_KILL_DURING_OVERWRITE = r"""
import os, sys, jax
sys.path.insert(0, {root!r})
from tests.conformance_table import CASES, adapted
from tests.test_checkpoint import perturb
import jpeft.checkpoint as ck
params, spec, tree = adapted(CASES[0])
real = ck._exchange if {stage!r} == "exchange" else ck.shutil.rmtree
def die(*a, **k):
    if {stage!r} == "exchange":
        real(*a, **k)        # the swap itself is atomic: die right after it
    os._exit(9)              # kill -9 equivalent: no cleanup, no finally
if {stage!r} == "exchange":
    ck._exchange = die
else:
    ck.json.dump = lambda *a, **k: os._exit(9)   # mid-write of the new folder
ck.save_adapters({path!r}, perturb(tree), spec, overwrite=True)
"""


@pytest.mark.parametrize("stage", ["writing", "exchange"])
def test_kill_during_overwrite_leaves_a_complete_checkpoint(stage, tmp_path):
    """A process killed mid-overwrite: the path still loads, as the old or the new checkpoint."""
    import subprocess
    import sys

    params, spec, tree = adapted(CASES[0])
    path = str(tmp_path / "a")
    save_adapters(path, tree, spec)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _KILL_DURING_OVERWRITE.format(root=root, stage=stage, path=path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    loaded, _ = load_adapters(path, params)
    want = tree if stage == "writing" else perturb(tree)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    save_adapters(path, tree, spec, overwrite=True)          # the next save cleans the leftovers
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_full_disk_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    params, spec, tree = adapted(CASES[0])
    path = str(tmp_path / "a")
    save_adapters(path, tree, spec)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous one, if any, is unchanged"):
        save_adapters(path, perturb(tree), spec, overwrite=True)
    monkeypatch.undo()
    jax.tree.map(np.testing.assert_array_equal, load_adapters(path, params)[0], tree)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_byte_flips_in_arrays_or_spec_are_named(tmp_path):
    params, spec, tree = adapted(CASES[0])
    path = tmp_path / "a"
    save_adapters(str(path), perturb(tree), spec)
    flipped = 0
    for d, _, files in os.walk(path / "arrays"):
        for f in files:
            if os.path.basename(d) == "d":   # every OCDBT data file: one byte each
                full = os.path.join(d, f)
                data = bytearray(open(full, "rb").read())
                data[len(data) // 2] ^= 0x10
                open(full, "wb").write(bytes(data))
                flipped += 1
    assert flipped
    with pytest.raises(CheckpointError, match="does not match its checksum|cannot be restored"):
        load_adapters(str(path), params)
    save_adapters(str(tmp_path / "c"), tree, spec)
    meta = json.loads((tmp_path / "c" / "jpeft.json").read_text())
    first = sorted(meta["sha256"])[0]
    meta["sha256"][first] = "0" * 64       # the arrays no longer match what was written
    (tmp_path / "c" / "jpeft.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"array {re.escape(first)} does not match its checksum"):
        load_adapters(str(tmp_path / "c"), params)
    save_adapters(str(tmp_path / "b"), tree, spec)
    meta = json.loads((tmp_path / "b" / "jpeft.json").read_text())
    meta["spec"]["rules"][0]["rank"] = 2
    (tmp_path / "b" / "jpeft.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"jpeft.json: the spec does not match its checksum"):
        load_adapters(str(tmp_path / "b"), params)
    (tmp_path / "b" / "jpeft.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"jpeft.json: corrupted"):
        load_adapters(str(tmp_path / "b"), params)
    (tmp_path / "b" / "jpeft.json").write_bytes(b'{"format": 1, "spec": \xff\xfe}')   # not UTF-8
    with pytest.raises(CheckpointError, match=r"jpeft.json: corrupted"):
        load_adapters(str(tmp_path / "b"), params)


def test_resume_with_other_options_names_the_option(tmp_path):
    _, spec, tree = adapted(CASES[0])
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        _train(spec, tree, 2, ckpt=(manager, 2))
    method = spec.rules[0][1]
    other = jpeft.Spec([(p, jpeft.method(method.name, **{**{k: v for k, v in method.to_dict().items() if k != "method"},
                                                          "rank": method.rank + 2})) for p, _ in spec.rules])
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        like = optax.adam(1e-2).init(jpeft.split(tree)[0])
        with pytest.raises(CheckpointError, match=rf"rank={method.rank + 2} \(saved {method.rank}\)"):
            manager.restore(base_params(), like, spec=other)
        assert manager.restore(base_params(), like, spec=spec)["step"] == 2


def test_latest_step_skips_a_damaged_step(tmp_path):
    _, spec, tree = adapted(CASES[0])
    with TrainCheckpointer(str(tmp_path / "run"), max_to_keep=5) as manager:
        _train(spec, tree, 2, ckpt=(manager, 2))
    with TrainCheckpointer(str(tmp_path / "run"), max_to_keep=5) as manager:
        start = manager.restore(base_params(), optax.adam(1e-2).init(jpeft.split(tree)[0]))
        _train(spec, tree, 4, ckpt=(manager, 4), start=start)
    (tmp_path / "run" / "4" / "meta" / "commit_success.txt").unlink()
    with TrainCheckpointer(str(tmp_path / "run")) as manager:
        assert manager.latest_step() == 2
