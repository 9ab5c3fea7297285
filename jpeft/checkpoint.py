"""Orbax checkpoints (DESIGN.md §7).

- `save_adapters` / `load_adapters`: adapter-only export (the adapters' trainable arrays, buffers
  and state — not the frozen base, which `Method.rebuild_base` recreates from the original
  weights) with the spec and method versions in `jpeft.json` beside the arrays, so a checkpoint
  restores onto the base model without the script that made it.
- `TrainCheckpointer`: full training state (adapters, optimizer state, step, RNG, data-iterator
  state) with `ocp.CheckpointManager`; resuming continues bit-identically.

A save writes into a temporary folder and renames it into place only when complete, so a crash
mid-save never leaves a checkpoint that restores as valid, and nothing already saved is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import check_fits, init
from jpeft.errors import SpecError
from jpeft.paths import leaves_with_paths
from jpeft.spec import Spec
from jpeft.views import rebuild_base

FORMAT = 1
META = "jpeft.json"
ARRAYS = "arrays"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


# ----------------------------------------------------------------------------- adapter arrays
def adapter_arrays(params: Any) -> dict[str, dict[str, Any]]:
    """`{path: {"train", "frozen", "state"[, "base"]}}` for every adapter node."""
    out = {}
    for path, node in leaves_with_paths(params, is_leaf=is_adapter):
        if isinstance(node, Adapter):
            entry = {"train": node.train, "frozen": node.frozen, "state": node.state}
            if node.method.checkpoint_base:
                entry["base"] = node.base
            out[path] = entry
    return out


def restore_adapters(base_params: Any, spec: Spec, arrays: dict[str, dict[str, Any]]) -> Any:
    """Rebuild the adapted tree from the base weights and saved adapter arrays, checking that
    every path, array name and shape agrees (the first difference is named)."""
    template = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), base_params, spec,
                                           calib=_zeros_calib(base_params)))
    expected = {p: n for p, n in leaves_with_paths(template, is_leaf=is_adapter) if isinstance(n, Adapter)}
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"the checkpoint's adapters do not match the spec on this model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    originals = dict(leaves_with_paths(base_params))
    nodes = {}
    for path, node in expected.items():
        saved = arrays[path]
        for part in ("train", "frozen", "state"):
            _check_same(f"{path}:{part}", getattr(node, part), saved.get(part, {}))
        base = saved["base"] if node.method.checkpoint_base else None
        rebuilt = node.method.node(base, saved["train"], saved.get("frozen", {}), saved.get("state", {}))
        rebuilt = rebuilt.replace(view=node.view)
        if base is None:
            rebuilt = rebuilt.replace(base=rebuild_base(rebuilt, jax.numpy.asarray(originals[path])))
        nodes[path] = jax.tree.map(lambda x, like: np.asarray(x).astype(like.dtype), rebuilt, node)
    leaves = [nodes.get(p, leaf) for p, leaf in leaves_with_paths(base_params)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base_params), leaves)


def _zeros_calib(base_params):
    return jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), base_params)


def _check_same(where: str, expected: Any, saved: Any) -> None:
    want = {p: np.shape(x) for p, x in leaves_with_paths(expected)}
    got = {p: np.shape(x) for p, x in leaves_with_paths(saved)}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise CheckpointError(f"{where}/{key}: the checkpoint has shape {got.get(key, 'nothing')}, "
                                  f"the spec on this model expects {want.get(key, 'nothing')}")


# ----------------------------------------------------------------------------- atomic folders
def _atomic_write(directory: str, write, overwrite: bool) -> None:
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise CheckpointError(f"{directory} exists; pass overwrite=True to replace it")
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if os.path.exists(directory):
            old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a complete jpeft checkpoint (no {META})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r} is not supported")
    return meta


def _restore_arrays(path: str) -> Any:
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{path}: the arrays cannot be restored (truncated or corrupted?): "
                              f"{str(e).splitlines()[0][:300]}") from e


def _raw_key(rng: jax.Array) -> jax.Array:
    return jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def _versions(spec: Spec) -> dict[str, int]:
    return {m.name: m.version for _, m in spec.rules}


# ----------------------------------------------------------------------------- adapter-only
def save_adapters(directory: str, params: Any, spec: Spec, *, overwrite: bool = False) -> None:
    """Write the adapters of `params` (not the base weights) and the spec to `directory`."""
    check_fits(params, spec)
    arrays = adapter_arrays(params)

    def write(tmp):
        os.makedirs(tmp)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, ARRAYS), arrays)
            ckpt.wait_until_finished()
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"format": FORMAT, "spec": spec.to_dict(), "versions": _versions(spec)}, f, indent=1)

    _atomic_write(directory, write, overwrite)


def load_adapters(directory: str, base_params: Any, spec: Spec | None = None) -> tuple[Any, Spec]:
    """`(adapted params, spec)` from `save_adapters`' folder, onto the original base weights.

    If `spec` is given it must equal the saved one (the first differing rule is named)."""
    meta = _read_meta(directory)
    saved = Spec.from_dict(meta["spec"])
    if spec is not None and spec != saved:
        diff = next(((a, b) for a, b in zip(spec.rules, saved.rules) if a != b), None)
        raise CheckpointError(f"{directory}: the spec differs from the saved one "
                              f"(first difference: given {diff[0] if diff else spec.rules}, "
                              f"saved {diff[1] if diff else saved.rules}; exclude {spec.exclude!r} vs {saved.exclude!r})")
    arrays = _restore_arrays(os.path.join(os.path.abspath(directory), ARRAYS))
    try:
        return restore_adapters(base_params, saved, arrays), saved
    except SpecError as e:
        raise CheckpointError(f"{directory}: the saved spec does not fit this model: {e}") from e


# ----------------------------------------------------------------------------- training state
class TrainCheckpointer:
    """Full training state under `directory/<step>` with `ocp.CheckpointManager`.

    Saved: the adapters (as in `save_adapters`), the optimizer state, the step, an RNG key and a
    JSON-serialisable data-iterator state (e.g. grain's `iterator.get_state()`).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, step: int, *, params: Any, spec: Spec, opt_state: Any, rng: jax.Array,
             data_state: Any = None) -> None:
        check_fits(params, spec)
        meta = {"format": FORMAT, "spec": spec.to_dict(), "versions": _versions(spec), "step": int(step),
                "data_state": data_state}
        state = {"adapters": adapter_arrays(params), "opt_state": opt_state, "rng": _raw_key(rng)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, base_params: Any, opt_state_like: Any, step: int | None = None) -> dict[str, Any]:
        """`{"params", "spec", "opt_state", "step", "rng", "data_state"}` of `step` (default: the
        latest); `rng` comes back as raw `uint32[2]` key data (a `jax.random.PRNGKey`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        folder = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            spec = Spec.from_dict(meta["spec"])
            template = {"adapters": adapter_arrays(jax.eval_shape(
                lambda: init(jax.random.PRNGKey(0), base_params, spec, calib=_zeros_calib(base_params)))),
                "opt_state": jax.eval_shape(lambda: opt_state_like), "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
            state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))["state"]
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{folder}: cannot restore (empty, truncated or corrupted step folder?): "
                                  f"{str(e).splitlines()[0][:300]}") from e
        return {"params": restore_adapters(base_params, spec, state["adapters"]), "spec": spec,
                "opt_state": state["opt_state"], "step": meta["step"], "rng": state["rng"],
                "data_state": meta["data_state"]}
