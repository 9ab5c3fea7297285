"""Reading HF PEFT adapter folders onto a jpeft tree: every tensor of the file is placed or the
import fails naming it (`jpeft.interop.hf` is the public entry; docs/interop.md)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.flax import load_file as load_flax_file

from jpeft.adapter import Adapter, is_adapter
from jpeft.core import init
from jpeft.errors import SpecError
from jpeft.interop.modules import DEFAULT_MAP, ModuleMap, split_leaf
from jpeft.interop.peft_config import (
    RERUN_INITS,
    check_config,
    pattern_value,
    targets_module,
)
from jpeft.interop.peft_format import (
    ADAPTER_KINDS,
    CONFIG,
    EXPERTS_VIEW,
    HEADS,
    PREFIX,
    TENSOR_KEY,
    WEIGHTS,
    default_slice_path,
    expert_factors,
    to_numpy,
)
from jpeft.interop.peft_rows import CHECKS, ROWS, TABLES, MethodRow
from jpeft.methods.dora import DoRA
from jpeft.methods.full import Full
from jpeft.methods.lowrank import LoRA, lora_scale
from jpeft.paths import closest_paths, leaves_with_paths
from jpeft.quant import is_leaf_node
from jpeft.shared import SHARED
from jpeft.spec import Spec
from jpeft.views import View


def read_folder(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """`(checked config, tensors)` of a PEFT LoRA folder; every failure is a `SpecError` naming the
    file."""
    for name in (CONFIG, WEIGHTS):
        if not os.path.isfile(os.path.join(directory, name)):
            raise SpecError(f"{directory}: no {name} (a PEFT adapter folder has {CONFIG} and {WEIGHTS})")
    try:
        with open(os.path.join(directory, CONFIG)) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise SpecError(f"{directory}/{CONFIG}: not valid JSON ({e})") from None
    config = check_config(config, directory, TABLES, CHECKS)
    try:   # the flax loader reads bfloat16 (PEFT saves in the model's dtype); numpy's does not
        loaded = load_flax_file(os.path.join(directory, WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise SpecError(f"{directory}/{WEIGHTS}: not a readable safetensors file ({e})") from None
    tensors = {}
    for key, value in loaded.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise SpecError(f"{directory}: tensor {key!r} has dtype {value.dtype}; expected a floating-point dtype")
        # half-precision files are widened (exactly) to float32; the leaves get their own dtype on placement
        tensors[key] = np.asarray(value, np.float32 if value.dtype.itemsize < 4 else value.dtype)
    return config, tensors


def _parse(directory: str, tensors: dict, row: MethodRow | None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """`({torch module: {tensor kind: array}}, {shared-state field: array})`; a key of another form
    (or the shared tensor of another type) is an error naming it."""
    out: dict[str, dict] = collections.defaultdict(dict)
    shared = {}
    for key, value in tensors.items():
        if row is not None and key in row.shared:
            field, to_jpeft, _ = row.shared[key]
            shared[field] = to_jpeft(value)
            continue
        match = TENSOR_KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match is None:
            raise SpecError(f"{directory}: tensor {key!r} is not a PEFT LoRA tensor name "
                            f"({PREFIX}<module>.lora_A.weight, ...); refusing to drop it")
        out[match["module"]][match["kind"]] = value
    missing = sorted(k for k, (field, _, _) in (row.shared if row else {}).items() if field not in shared)
    if missing:
        peft_type = cast(MethodRow, row).peft_type  # only a row's shared tensors can be missing
        raise SpecError(f"{directory}: tensor {missing[0]!r} is missing (the {peft_type} adapters share it)")
    return out, shared


def _param(directory, module, leaf_names, modules: ModuleMap, flat: dict, what: str) -> str:
    """The parameter path of `module`'s leaf (the first of `leaf_names` the model has)."""
    try:
        mpath = modules.to_flax(module)
    except SpecError as e:
        raise SpecError(f"{directory}: {what} of torch module {module!r}: {e}") from None
    for leaf in leaf_names:
        if f"{mpath}/{leaf}" in flat:
            return f"{mpath}/{leaf}"
    raise SpecError(f"{directory}: {what} of torch module {module!r} has no parameter {mpath}/{leaf_names[0]} in "
                    f"the model (a renamed module, the wrong ModuleMap, or a stacked kernel: pass views=); "
                    f"closest: {closest_paths(mpath, list(flat), 3)}")


def _check_shape(directory, module, name, got, want):
    if tuple(got) != tuple(want):
        raise SpecError(f"{directory}: {module}.{name} has shape {tuple(got)}; the model needs {tuple(want)}")


@dataclasses.dataclass
class _Placed:
    """Where one module's adapter tensors go: the leaf, its method, its train fields, and what
    else the file sets (the base PEFT loads for an embedding, a folded `lora_bias`, node state)."""

    path: str
    method: Any
    train: dict
    base: np.ndarray | None = None
    bias: np.ndarray | None = None
    state: dict | None = None
    index: tuple | None = None   # the slice of a stacked kernel these tensors fill
    view: View | None = None     # a view the leaf needs (PEFT target_parameters: per expert)


@dataclasses.dataclass(frozen=True)
class _Model:
    """The model an import places tensors into: its leaves, module names, views, and the slices
    of its stacked kernels (`{sliced path: (stacked path, index)}`, named by `slice_path` as
    `export_peft` names them)."""

    flat: dict
    modules: ModuleMap
    views: dict          # {path: View} of the leaves a view rule matches (first rule wins, as in a Spec)
    slices: dict

    @classmethod
    def of(cls, base_params, modules, views, slice_path) -> _Model:
        flat = dict(leaves_with_paths(base_params, is_leaf=is_leaf_node))
        rules = [(re.compile(rx), v) for rx, v in (views or {}).items()]
        viewed = {p: next(v for rx, v in rules if rx.fullmatch(p))
                  for p in flat if any(rx.fullmatch(p) for rx, _ in rules)}
        slices = {}
        for path, view in viewed.items():
            if view.batch:
                for index in np.ndindex(*view.batch_shape(flat[path].shape)):
                    slices[slice_path(path, index)] = (path, index)
        return cls(flat, modules, viewed, slices)

    def locate(self, directory, module, parts, names, leaf) -> tuple[str, tuple | None, tuple[int, int]]:
        """`(path, slice index or None, (in, out) of the matrix)` of `module`'s adapted `leaf`."""
        for n in names:
            if n not in parts:
                raise SpecError(f"{directory}: {PREFIX}{module}.{n} is missing (its module has the other factors)")
        try:
            sliced = f"{self.modules.to_flax(module)}/{leaf}"
        except SpecError as e:
            raise SpecError(f"{directory}: the adapter factors of torch module {module!r}: {e}") from None
        path, index = (sliced, None) if sliced in self.flat else self.slices.get(sliced, (None, None))
        if path is None:
            path = _param(directory, module, (leaf,), self.modules, self.flat, "the adapter factors")  # raises
        shape, view = tuple(self.flat[path].shape), self.views.get(path)
        if view is None and len(shape) != 2:
            raise SpecError(f"{directory}: {path} is {len(shape)}-D {shape}; pass views= (jpeft.View per kernel, as "
                            "for jpeft.Spec) to import onto it")
        if view is not None and view.batch and index is None:
            raise SpecError(f"{directory}: {path} is stacked ({view}); its torch modules are its slices "
                            f"({next(iter(self.slices), '?')}, ...)")
        return path, index, (view.matrix_shape(shape) if view is not None else shape)


def _row_module(directory, row: MethodRow, config, module, parts, tensors, model: _Model) -> _Placed:
    """A `MethodRow` type's module: its tensors read by the row."""
    path, index, shape = model.locate(directory, module, parts, row.required, "kernel")
    if index is not None or model.views.get(path) is not None:
        raise SpecError(f"{directory}: {row.peft_type} imports onto plain 2-D kernels; {path} has a view")
    if split_leaf(path)[0] in model.modules.conv1d:
        raise SpecError(f"{directory}: {row.peft_type} on the Conv1D module {module!r} is not supported")
    stray = sorted(k for k in parts if k in ADAPTER_KINDS and k not in row.kinds)
    if stray:
        raise SpecError(f"{directory}: {PREFIX}{module}.{stray[0]} is not a {row.peft_type} tensor")
    for kind, file_key in row.copies.items():
        if kind in parts and not np.array_equal(parts[kind], tensors[file_key]):
            raise SpecError(f"{directory}: {PREFIX}{module}.{kind} differs from {file_key}; PEFT keeps one copy "
                            "(the model-wide one is used)")
    try:
        method, train, state = row.read({k: parts[k] for k in row.kinds if k in parts}, config, shape, module)
    except ValueError as e:
        raise SpecError(f"{directory}: {row.peft_type} module {module!r}: {e}") from None
    return _Placed(path, method, train, state=state)


def _parameter_module(directory, config, module, name, parts, model: _Model, cls) -> _Placed:
    """LoRA factors on the raw parameter `name` of `module` (PEFT `target_parameters`): a 3-D
    `(E, d1, d2)` expert stack, one adapter per expert."""
    for n in ("lora_A.weight", "lora_B.weight"):
        if n not in parts:
            raise SpecError(f"{directory}: {PREFIX}{module}.{n} is missing (its module has the other factor)")
    stray = sorted(set(parts) - {"lora_A.weight", "lora_B.weight"})
    if stray or cls is not LoRA or config["lora_dropout"]:
        raise SpecError(f"{directory}: target parameter {module}.{name}: plain LoRA factors only (PEFT's "
                        f"ParamWrapper); got {stray or ('use_dora' if cls is not LoRA else 'lora_dropout')}")
    try:
        mpath = model.modules.to_flax(module)
    except SpecError as e:
        raise SpecError(f"{directory}: target parameter {module}.{name}: {e}") from None
    path = f"{mpath}/{name}"
    if path not in model.flat:
        raise SpecError(f"{directory}: target parameter {module}.{name} has no leaf {path} in the model; closest: "
                        f"{closest_paths(path, list(model.flat), 3)}")
    shape = tuple(model.flat[path].shape)
    if len(shape) != 3:
        raise SpecError(f"{directory}: target parameter {module}.{name} is {len(shape)}-D {shape}; jpeft imports "
                        "3-D expert stacks (E, d1, d2)")
    view = model.views.get(path, EXPERTS_VIEW)
    if view != EXPERTS_VIEW:
        raise SpecError(f"{directory}: {path} has view {view}; PEFT's target_parameters adapt each expert "
                        f"({EXPERTS_VIEW})")
    rank = pattern_value(config["rank_pattern"], module, config["r"])
    a_shape, b_shape, to_jpeft, _ = expert_factors(mpath, model.modules, shape[0], rank, shape[1], shape[2])
    _check_shape(directory, module, "lora_A.weight", parts["lora_A.weight"].shape, a_shape)
    _check_shape(directory, module, "lora_B.weight", parts["lora_B.weight"].shape, b_shape)
    a, b = to_jpeft(parts["lora_A.weight"], parts["lora_B.weight"])
    alpha = float(pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    return _Placed(path, LoRA(rank=rank, alpha=alpha, rslora=bool(config["use_rslora"])), {"a": a, "b": b},
                   view=EXPERTS_VIEW)


def _lora_module(directory, config, module, parts, model: _Model, cls, init_name) -> _Placed:
    """LoRA / DoRA on a kernel (plain, viewed or one slice of a stacked one), or LoRA on an
    embedding."""
    emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    names = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
    path, index, shape = model.locate(directory, module, parts, names, "embedding" if emb else "kernel")
    modules = model.modules
    if split_leaf(path)[0] in modules.tied:
        raise SpecError(f"{directory}: {path} is tied to the output head; PEFT's embedding LoRA changes only the "
                        "input lookup, jpeft's would change both")
    a, b = parts[names[0]].T, parts[names[1]].T
    rank = pattern_value(config["rank_pattern"], module, config["r"])
    if a.shape[1] != rank:
        raise SpecError(f"{directory}: {module}: the factors have rank {a.shape[1]}, the config says r={rank}")
    _check_shape(directory, module, names[0], a.T.shape, (rank, shape[0]))
    _check_shape(directory, module, names[1], b.T.shape, (shape[1], rank))
    alpha = float(pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    if emb and (cls is DoRA or init_name in RERUN_INITS):
        raise SpecError(f"{directory}: {module}: embedding LoRA with use_dora / init {init_name!r} is not supported")
    options = dict(rank=rank, alpha=alpha, rslora=bool(config["use_rslora"]), dropout=float(config["lora_dropout"]))
    if init_name in RERUN_INITS:
        options["init"] = init_name
    train = {"a": a, "b": b}
    if cls is DoRA:
        if "lora_magnitude_vector" not in parts:
            raise SpecError(f"{directory}: {PREFIX}{module}.lora_magnitude_vector is missing (use_dora=true)")
        train["m"] = parts["lora_magnitude_vector"]
    elif "lora_magnitude_vector" in parts:
        raise SpecError(f"{directory}: {PREFIX}{module}.lora_magnitude_vector with use_dora=false")
    new_base = None
    if "base_layer.weight" in parts:   # PEFT saves an adapted embedding's table; it loads it into the model
        if index is not None or model.views.get(path) is not None:
            raise SpecError(f"{directory}: {PREFIX}{module}.base_layer.weight onto the viewed kernel {path}")
        new_base = (parts["base_layer.weight"].T if modules.transposed(*path.rsplit("/", 1))
                    else parts["base_layer.weight"])
        _check_shape(directory, module, "base_layer.weight", new_base.shape, shape)
    folded = None
    if "lora_B.bias" in parts:
        if not config["lora_bias"]:
            raise SpecError(f"{directory}: {PREFIX}{module}.lora_B.bias with lora_bias=false")
        folded = lora_scale(rank, alpha, options["rslora"]) * parts["lora_B.bias"]
    if folded is not None and index is not None:
        raise SpecError(f"{directory}: {PREFIX}{module}.lora_B.bias onto a slice of the stacked kernel {path}")
    return _Placed(path, cls(**options), train, new_base, folded, index=index)


def _fill_slices(directory, path, node, slices: dict) -> Adapter:
    """A stacked node with the file's factors in the slices it has (the others keep the init)."""
    train = dict(node.train)
    for index, fields in slices.items():
        for k, v in fields.items():
            want = train[k].shape[len(index):]
            if tuple(v.shape) != tuple(want):
                raise SpecError(f"{directory}: {path} slice {index}: PEFT tensor {k} has shape {tuple(v.shape)}, "
                                f"the model expects {tuple(want)}")
            train[k] = train[k].at[index].set(jnp.asarray(v).astype(train[k].dtype))
    return node.replace(train=train)


def import_peft(directory: str, base_params: Any, *, modules: ModuleMap = DEFAULT_MAP, views: dict | None = None,
                slice_path: Callable[[str, tuple[int, ...]], str] = default_slice_path) -> tuple[Any, Spec]:
    """`(adapted params, spec)` from a HuggingFace PEFT adapter folder (LoRA / DoRA and the
    `jpeft.interop.peft_rows` types). Every tensor is placed (LoRA/DoRA factors, trained biases and
    modules as `jpeft.Full` leaves) or the import fails naming it; every config key is honoured or
    refused (`LORA_KEYS`). `views` (`{regex: jpeft.View}`, as for `jpeft.Spec`) lets LoRA/DoRA
    factors land on N-D kernels (their matrix view) and on stacked kernels (`nn.scan`): the torch
    module of slice `index` is named from `slice_path(path, index)`, as `export_peft` names it;
    slices the file has no factors for keep jpeft's init (no effect: `b = 0`)."""
    config, tensors = read_folder(directory)
    row = ROWS.get(config["peft_type"])
    parsed, shared = _parse(directory, tensors, row)
    model = _Model.of(base_params, modules, views, slice_path)
    flat = model.flat
    cls = DoRA if config.get("use_dora") else LoRA
    init_name = config.get("init_lora_weights")
    save_names = config["modules_to_save"] or []
    if config["task_type"] == "SEQ_CLS":
        save_names = [*save_names, *HEADS]
    saved_whole = lambda m: any(m == s or m.endswith(f".{s}") for s in save_names)  # noqa: E731

    rules: dict[Any, list[str]] = collections.defaultdict(list)
    values: dict[str, dict] = {}      # path -> train fields (or {"w": ...} for Full)
    bases: dict[str, np.ndarray] = {}
    folded: dict[str, np.ndarray] = {}
    states: dict[str, dict] = {}
    slice_values: dict[str, dict] = {}   # stacked path -> {index: train fields of that slice}
    target_parameters = [tuple(t.rsplit(".", 1)) for t in config.get("target_parameters") or []]
    if any(len(t) != 2 for t in target_parameters):
        raise SpecError(f"{directory}: target_parameters {config['target_parameters']}: expected "
                        "'<module>.<parameter>' names")
    added_views: dict[str, View] = {}
    methods: dict[str, Any] = {}
    lora_modules = set()
    for module, parts in parsed.items():
        if any(k in ADAPTER_KINDS for k in parts):
            parameter = next((n for m, n in target_parameters if module == m or module.endswith(f".{m}")), None)
            if parameter is not None:
                placed = _parameter_module(directory, config, module, parameter, parts, model, cls)
                added_views[re.escape(placed.path)] = cast(View, placed.view)  # set by _parameter_module
            elif row:
                placed = _row_module(directory, row, config, module, parts, tensors, model)
            else:
                placed = _lora_module(directory, config, module, parts, model, cls, init_name)
            if parameter is None and not targets_module(config, module):
                raise SpecError(f"{directory}: module {module!r} has adapter factors but target_modules / "
                                "layers_to_transform / exclude_modules do not select it")
            lora_modules.add(module)
            if placed.index is not None:   # one slice of a stacked kernel: one config for all its slices
                first = methods.setdefault(placed.path, placed.method)
                if first != placed.method:
                    raise SpecError(f"{directory}: module {module!r} needs {placed.method!r}, another slice of "
                                    f"{placed.path} {first!r}; a stacked kernel has one config")
                if placed.path not in slice_values:
                    rules[placed.method].append(placed.path)
                slice_values.setdefault(placed.path, {})[placed.index] = placed.train
            else:
                rules[placed.method].append(placed.path)
                values[placed.path] = placed.train
            if placed.base is not None:
                bases[placed.path] = placed.base
            if placed.bias is not None:
                folded[split_leaf(placed.path)[0] + "/bias"] = placed.bias
            if placed.state is not None:
                states[placed.path] = placed.state
        for kind in ("weight", "bias", "base_layer.bias"):
            if kind not in parts:
                continue
            whole = saved_whole(module) and kind != "base_layer.bias"
            allowed = whole or (kind != "weight" and (config["bias"] == "all" or
                                                      (config["bias"] == "lora_only" and module in lora_modules)))
            if not allowed:
                raise SpecError(f"{directory}: tensor {PREFIX}{module}.{kind} is neither in modules_to_save nor a bias "
                                f"that bias={config['bias']!r} saves; refusing to drop it")
            leaf_names = ("bias",) if kind != "weight" else ("kernel", "embedding", "scale")
            path = _param(directory, module, leaf_names, modules, flat, f"tensor {kind}")
            x = parts[kind].T if modules.transposed(*path.rsplit("/", 1)) else parts[kind]
            _check_shape(directory, module, kind, x.shape, flat[path].shape)
            rules[Full()].append(path)
            values[path] = {"w": x}
    for path, bias in folded.items():   # lora_bias: s·bias added to the module's (trained) bias
        if path not in flat:
            raise SpecError(f"{directory}: lora_B.bias of {path.rsplit('/', 1)[0]}: the model's module has no bias "
                            "to fold it into")
        if path not in values:
            rules[Full()].append(path)
            values[path] = {"w": to_numpy(flat[path])}
        values[path] = {"w": values[path]["w"] + bias}
    # every module target_modules selects in the model has its factors (stacked kernels may skip slices)
    for path, leaf in flat.items():
        mpath, _, name = path.rpartition("/")
        if name not in ("kernel", "embedding") or len(leaf.shape) != 2 or model.views.get(path) is not None:
            continue
        try:
            module = modules.to_torch(mpath)
        except SpecError:
            continue
        if module not in lora_modules and targets_module(config, module):
            raise SpecError(f"{directory}: target_modules selects {module!r} ({path}), but the file has no LoRA "
                            "tensors for it")
    for m, n in target_parameters:
        if not any(module == m or module.endswith(f".{m}") for module in parsed):
            raise SpecError(f"{directory}: target_parameters names {m}.{n}, but the file has no factors for it")
    for name in save_names:
        if name not in HEADS and not any(m == name or m.endswith(f".{name}") for m in parsed):
            raise SpecError(f"{directory}: modules_to_save names {name!r}, but the file has no tensors for it")
    if not rules:
        raise SpecError(f"{directory}: the file has no tensors")
    spec = Spec({"|".join(re.escape(p) for p in paths): method for method, paths in rules.items()},
                views={**(views or {}), **{rx: v for rx, v in added_views.items() if rx not in (views or {})}})
    tree = init(jax.random.PRNGKey(0), base_params, spec)

    def load(path, node):
        if not isinstance(node, Adapter):
            return node
        if path in slice_values:
            return _fill_slices(directory, path, node, slice_values[path])
        train = {k: jnp.asarray(v).astype(node.train[k].dtype) for k, v in values[path].items()}
        for k, v in train.items():
            if v.shape != node.train[k].shape:
                raise SpecError(f"{directory}: {path}: PEFT tensor {k} has shape {v.shape}, the model expects "
                                f"{node.train[k].shape}")
        node = node.replace(train={**node.train, **train})
        for side in ("train", "frozen"):   # the config's owner node holds the model-wide tensors
            owned = getattr(node, side).get(SHARED)
            if owned is None:
                continue
            for field, value in shared.items():
                if field in owned and value.shape != owned[field].shape:
                    raise SpecError(f"{directory}: the shared {field} has shape {value.shape}, the model's "
                                    f"adapters need {owned[field].shape}")
            placed = {f: jnp.asarray(v).astype(owned[f].dtype) for f, v in shared.items() if f in owned}
            node = node.replace(**{side: {**getattr(node, side), SHARED: {**owned, **placed}}})
        if path in bases:
            node = node.replace(base=jnp.asarray(bases[path]).astype(node.base.dtype))
        if path in states:
            node = node.replace(state={**node.state, **{k: jnp.asarray(v) for k, v in states[path].items()}})
        return node

    leaves = [load(p, n) for p, n in leaves_with_paths(tree, is_leaf=is_adapter)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree, is_leaf=is_adapter), leaves), spec
