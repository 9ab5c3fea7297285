"""Orbax checkpoints (docs/design.md §7).

- `save_adapters` / `load_adapters`: adapter-only export (the adapters' trainable arrays, buffers
  and state — not the frozen base, which `Method.rebuild_base` recreates from the original
  weights) with the spec and method versions in `jpeft.json` beside the arrays, so a checkpoint
  restores onto the base model without the script that made it.
- `TrainCheckpointer`: full training state (adapters, optimizer state, step, RNG, data-iterator
  state) with `ocp.CheckpointManager`; resuming continues bit-identically.

A save writes into a temporary folder and swaps it into place only when complete
(`atomic_write`), so at every instant the path is the complete old or the complete new
checkpoint. The metadata carries SHA-256 checksums of the spec and of every saved array; any
corruption found on load is a `CheckpointError` naming the file or array.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
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
from jpeft.quant import is_leaf_node, is_quantized
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
    originals = dict(leaves_with_paths(base_params, is_leaf=is_leaf_node))   # a quantised leaf whole
    nodes = {}
    for path, node in expected.items():
        saved = arrays[path]
        for part in ("train", "frozen", "state"):
            _check_same(f"{path}:{part}", getattr(node, part), saved.get(part, {}))
        base = saved["base"] if node.method.checkpoint_base else None
        rebuilt = node.method.node(base, saved["train"], saved.get("frozen", {}), saved.get("state", {}))
        rebuilt = rebuilt.replace(view=node.view)
        if base is None:
            original = originals[path]   # a quantised one is the base itself (base-rewriting inits refuse it)
            rebuilt = rebuilt.replace(base=original if is_quantized(original) else
                                      rebuild_base(rebuilt, jax.numpy.asarray(original)))
        nodes[path] = jax.tree.map(lambda x, like: np.asarray(x).astype(like.dtype), rebuilt, node)
    leaves = [nodes.get(p, leaf) for p, leaf in leaves_with_paths(base_params, is_leaf=is_leaf_node)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base_params, is_leaf=is_leaf_node), leaves)


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
_RENAME_EXCHANGE = 2   # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux `renameat2(RENAME_EXCHANGE)`); False where the kernel, C
    library or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _strays(directory: str) -> list[str]:
    """Leftovers of interrupted saves beside `directory` (`<dir>.tmp-*`, `<dir>.old-*`)."""
    parent, name = os.path.split(directory)
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, f) for f in os.listdir(parent)
                  if f.startswith(f"{name}.tmp-") or f.startswith(f"{name}.old-"))


def atomic_write(directory: str, write, overwrite: bool) -> None:
    """Write a folder so that, at every instant, `directory` is either absent (first save), the
    complete old folder or the complete new one. `write(tmp)` fills a temporary sibling; it is
    then swapped in with one `renameat2(RENAME_EXCHANGE)` (Linux) and the old contents deleted.
    Where the exchange is unavailable, `directory` is a symlink to a versioned sibling
    (`<dir>.v-<id>`) and the symlink is replaced atomically. Leftovers of interrupted saves are
    removed first; a failed write (a full disk) is a `CheckpointError` and leaves the old
    folder as it was."""
    directory = os.path.abspath(directory)
    if os.path.lexists(directory) and not overwrite:
        raise CheckpointError(f"{directory} exists; pass overwrite=True to replace it")
    for stray in _strays(directory):
        shutil.rmtree(stray, ignore_errors=True)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        try:
            write(tmp)
        except OSError as e:
            raise CheckpointError(f"{directory}: writing the new checkpoint failed ({e}); the previous one, if "
                                  f"any, is unchanged") from e
        if not os.path.lexists(directory):
            os.rename(tmp, directory)
        elif not os.path.islink(directory) and _exchange(tmp, directory):
            shutil.rmtree(tmp)          # now holds the old contents
        else:
            _swap_symlink(directory, tmp)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _swap_symlink(directory: str, tmp: str) -> None:
    """The fallback layout: `directory` → `<dir>.v-<id>`, replaced by one atomic `os.replace`."""
    if not os.path.islink(directory):   # a plain folder: the one non-atomic step, converting it
        legacy = f"{directory}.v-{uuid.uuid4().hex[:8]}"
        os.rename(directory, legacy)
        os.symlink(os.path.basename(legacy), directory)
    old = os.path.join(os.path.dirname(directory), os.readlink(directory))
    target = f"{directory}.v-{uuid.uuid4().hex[:8]}"
    os.rename(tmp, target)
    link = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.basename(target), link)
    os.replace(link, directory)
    shutil.rmtree(old, ignore_errors=True)


def _spec_checksum(spec_dict: dict) -> str:
    return hashlib.sha256(json.dumps(spec_dict, sort_keys=True).encode()).hexdigest()


def _array_checksums(tree: Any) -> dict[str, str]:
    """SHA-256 per array. Arrays this process cannot see whole (sharded over several processes)
    are left out: their bytes are Orbax's per-process shards."""
    return {p: hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()
            for p, x in leaves_with_paths(tree) if getattr(x, "is_fully_addressable", True)}


def _verify(where: str, meta: dict, arrays: Any) -> None:
    """Every array matches the checksum written with it (the spec's is checked by `_saved_spec`)."""
    want = meta.get("sha256")
    if want is None:
        return
    got = _array_checksums(arrays)
    present = {p for p, _ in leaves_with_paths(arrays)}
    for path in sorted(want):
        if path not in present:
            raise CheckpointError(f"{where}: array {path} is missing")
        if path in got and want[path] != got[path]:
            raise CheckpointError(f"{where}: array {path} does not match its checksum (corrupted data files)")


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isdir(directory):
        strays = _strays(os.path.abspath(directory))
        hint = f" (leftovers of an interrupted save: {strays})" if strays else ""
        raise CheckpointError(f"{directory}: no such checkpoint{hint}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a complete jpeft checkpoint (no {META})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupted (not a JSON object)")
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


def _saved_spec(where: str, meta: dict) -> Spec:
    try:
        spec_dict = meta["spec"]
        if meta.get("spec_sha256") is not None and meta["spec_sha256"] != _spec_checksum(spec_dict):
            raise CheckpointError(f"{where}: the spec does not match its checksum (the file was modified or corrupted)")
        return Spec.from_dict(spec_dict)
    except KeyError as e:
        raise CheckpointError(f"{where}: corrupted (no {e} entry)") from e
    except SpecError as e:
        raise CheckpointError(f"{where}: corrupted spec ({e})") from e


def spec_difference(given: Spec, saved: Spec) -> str:
    """The first difference between two specs, down to the option: which rule, which option,
    both values."""
    for k, (a, b) in enumerate(zip(given.rules, saved.rules)):
        if a == b:
            continue
        (pa, ma), (pb, mb) = a, b
        if pa != pb:
            return f"rule #{k} pattern {pa!r} vs saved {pb!r}"
        if ma.name != mb.name:
            return f"rule #{k} ({pa!r}): method {ma.name!r} vs saved {mb.name!r}"
        da, db = ma.to_dict(), mb.to_dict()
        opts = [f"{o}={da.get(o)!r} (saved {db.get(o)!r})" for o in sorted(set(da) | set(db)) if da.get(o) != db.get(o)]
        return f"rule #{k} ({pa!r}) {ma.name}: " + ", ".join(opts)
    if len(given.rules) != len(saved.rules):
        return f"{len(given.rules)} rules vs saved {len(saved.rules)}"
    if given.exclude != saved.exclude:
        return f"exclude {given.exclude!r} vs saved {saved.exclude!r}"
    if given.views != saved.views:
        return f"views {given.views!r} vs saved {saved.views!r}"
    return f"adapter_dtype {given.adapter_dtype!r} vs saved {saved.adapter_dtype!r}"


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
        meta = {"format": FORMAT, "spec": spec.to_dict(), "versions": _versions(spec),
                "spec_sha256": _spec_checksum(spec.to_dict()), "sha256": _array_checksums(arrays)}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(directory, write, overwrite)


def load_adapters(directory: str, base_params: Any, spec: Spec | None = None) -> tuple[Any, Spec]:
    """`(adapted params, spec)` from `save_adapters`' folder, onto the original base weights.

    If `spec` is given it must equal the saved one (the first differing rule is named)."""
    meta = _read_meta(directory)
    where = os.path.join(directory, META)
    saved = _saved_spec(where, meta)
    if spec is not None and spec != saved:
        raise CheckpointError(f"{directory}: the spec differs from the saved one: {spec_difference(spec, saved)}")
    arrays = _restore_arrays(os.path.join(os.path.abspath(directory), ARRAYS))
    _verify(where, meta, arrays)
    try:
        return restore_adapters(base_params, saved, arrays), saved
    except SpecError as e:
        raise CheckpointError(f"{directory}: the saved spec does not fit this model: {e}") from e


# ----------------------------------------------------------------------------- training state
def _matching_spec(folder: str, meta: dict, spec: Spec | None) -> Spec:
    """The spec saved in a step's `meta`; with `spec`, an error naming the first difference."""
    saved = _saved_spec(os.path.join(folder, "meta", "metadata"), meta)
    if spec is not None and spec != saved:
        raise CheckpointError(f"{folder}: the run's spec differs from the checkpoint's: {spec_difference(spec, saved)}")
    return saved


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
        state = {"adapters": adapter_arrays(params), "opt_state": opt_state, "rng": _raw_key(rng)}
        meta = {"format": FORMAT, "spec": spec.to_dict(), "versions": _versions(spec), "step": int(step),
                "data_state": data_state, "spec_sha256": _spec_checksum(spec.to_dict()),
                "sha256": _array_checksums(state)}
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"{self.directory}/{step}: saving failed ({e}); earlier steps are unchanged") from e

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest step whose folder is complete (both items committed and the metadata
        readable); incomplete or damaged steps are skipped."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if self._complete(step):
                return step
        return None

    def _complete(self, step: int) -> bool:
        folder = os.path.join(self.directory, str(step))
        if not all(os.path.exists(os.path.join(folder, item, "commit_success.txt")) for item in ("meta", "state")):
            return False
        try:
            with open(os.path.join(folder, "meta", "metadata")) as f:
                return isinstance(json.load(f), dict)
        except (OSError, ValueError):
            return False

    def _meta(self, step: int | None) -> tuple[int, str, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        folder = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{folder}: cannot restore (empty, truncated or corrupted step folder?): "
                                  f"{str(e).splitlines()[0][:300]}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{os.path.join(folder, 'meta', 'metadata')}: corrupted (not a JSON object)")
        return step, folder, meta

    def check_spec(self, spec: Spec, step: int | None = None) -> Spec:
        """The spec saved at `step` (default: the latest complete one); an error naming the
        differing option when it is not `spec`. Reads only the metadata: call it before loading
        anything else."""
        _, folder, meta = self._meta(step)
        return _matching_spec(folder, meta, spec)

    def restore(self, base_params: Any, opt_state_like: Any, step: int | None = None,
                spec: Spec | None = None, sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
        """`{"params", "spec", "opt_state", "step", "rng", "data_state"}` of `step` (default: the
        latest complete one); `rng` comes back as raw `uint32[2]` key data (a `jax.random.PRNGKey`).
        With `spec`, a run resumed with other options is an error naming the differing option.
        `sharding` (e.g. replicated on the run's mesh) is where every restored array is placed:
        a checkpoint written by any number of processes restores on any mesh; move the arrays to
        their training shardings afterwards. Default: this process's first device (one process)."""
        if sharding is None:
            if jax.process_count() > 1:
                raise CheckpointError(f"{self.directory}: restoring in a {jax.process_count()}-process job needs "
                                      "sharding= (e.g. replicated on the job's mesh)")
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        step, folder, meta = self._meta(step)
        saved = _matching_spec(folder, meta, spec)
        like = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), t)  # noqa: E731
        try:
            spec = saved
            template = like({"adapters": adapter_arrays(jax.eval_shape(
                lambda: init(jax.random.PRNGKey(0), base_params, spec, calib=_zeros_calib(base_params)))),
                "opt_state": jax.eval_shape(lambda: opt_state_like), "rng": jax.ShapeDtypeStruct((2,), np.uint32)})
            state = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template)))["state"]
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{folder}: cannot restore (empty, truncated or corrupted step folder?): "
                                  f"{str(e).splitlines()[0][:300]}") from e
        _verify(os.path.join(folder, "state"), meta, state)
        return {"params": restore_adapters(base_params, spec, state["adapters"]), "spec": spec,
                "opt_state": state["opt_state"], "step": meta["step"], "rng": state["rng"],
                "data_state": meta["data_state"]}
