"""Writing HF PEFT adapter folders and merged weights (`jpeft.interop.hf` is the public entry;
what maps to what: its docstring and docs/interop.md)."""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jpeft.adapter import Adapter, is_adapter
from jpeft.checkpoint import atomic_write
from jpeft.core import check_fits, merge
from jpeft.errors import SpecError
from jpeft.interop.modules import DEFAULT_MAP, LEAVES, ModuleMap, split_leaf
from jpeft.interop.peft_config import (
    LORA_KEYS,
    TASK_TYPES,
    export_config,
)
from jpeft.interop.peft_format import (
    CONFIG,
    EXPERTS_VIEW,
    HEADS,
    PREFIX,
    WEIGHTS,
    default_slice_path,
    expert_factors,
    torch_layout,
)
from jpeft.interop.peft_rows import BY_METHOD, MethodRow
from jpeft.methods.dora import DoRA
from jpeft.methods.full import Full
from jpeft.methods.lowrank import LoRA
from jpeft.paths import leaves_with_paths
from jpeft.quant import is_leaf_node
from jpeft.shared import SHARED
from jpeft.spec import Spec


def _factors(node: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """`(a, b)` of a plain LoRA on the original base equal to this node's update (matrix view;
    batch axes in front for a stacked node)."""
    a = node.train["a"] if "a" in node.train else node.frozen["a"]
    b = node.train["b"]
    if "a0" in node.frozen:
        a = jnp.concatenate([a, node.frozen["a0"]], axis=-1)
        b = jnp.concatenate([b, -node.frozen["b0"]], axis=-2)
    return np.asarray(a, np.float32), np.asarray(b, np.float32)


def _exported_scale(method: LoRA, converted: bool, rank: int) -> tuple[int, float, bool]:
    """`(r, lora_alpha, use_rslora)` PEFT needs for this node's exported factors."""
    if converted:
        return rank, float(method.scale * rank), False
    return rank, float(method.alpha), bool(method.rslora)


def _exported_family(methods: set) -> type:
    kinds = {type(m) for m in methods}
    if not methods or not kinds <= {LoRA, DoRA, *BY_METHOD} or len(kinds) != 1:
        raise SpecError(f"HF PEFT export needs one of LoRA, DoRA, {', '.join(c.__name__ for c in BY_METHOD)} on every "
                        f"adapted kernel, plus optional jpeft.Full leaves; got {sorted({m.name for m in methods})}")
    if kinds <= set(BY_METHOD):
        if len(methods) != 1:
            raise SpecError(f"HF PEFT has one {next(iter(kinds)).__name__} config per adapter; the spec has "
                            f"{len(methods)}")
        return next(iter(kinds))
    for m in methods:
        if m.base_quant is not None:
            raise SpecError(f"{m!r}: init='loftq' trains over the quantised base it chose; a PEFT adapter file "
                            "applies to the original weights, so it is not exported (use export_merged)")
    dropouts = {m.dropout for m in methods}
    if len(dropouts) != 1:
        raise SpecError(f"HF PEFT has one lora_dropout per adapter; the spec's LoRA configs have {sorted(dropouts)}")
    return kinds.pop()


def peft_type_of(method_class: type) -> str | None:
    """The PEFT type (`"LORA"`, `"ADALORA"`, ...) that `export_peft` / `import_peft` use for a
    method class, or None where PEFT has no equivalent (some options of a class may still be
    refused: `check_exportable` says for a spec)."""
    if method_class in BY_METHOD:
        return BY_METHOD[method_class].peft_type
    return "LORA" if method_class in (LoRA, DoRA) else None


def check_exportable(spec: Spec) -> None:
    """The `SpecError` `export_peft` would raise for `spec`'s methods, before any training."""
    _exported_family({m for _, m in spec.rules if not isinstance(m, Full)})



def _parameter_tensors(path, node, modules: ModuleMap, tensors, scales, parameters):
    """LoRA on a raw `(E, d1, d2)` parameter (PEFT `target_parameters`: an MoE expert stack), one
    adapter per expert (`jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))`)."""
    mpath, _, name = path.rpartition("/")
    if type(node.method) is not LoRA or "a0" in node.frozen or node.method.dropout:
        raise SpecError(f"{path}: PEFT's target_parameters take plain LoRA (no DoRA, rewriting init or dropout); "
                        f"got {node.method!r}")
    if node.view != EXPERTS_VIEW or len(node.base.shape) != 3:
        raise SpecError(f"{path}: a parameter {tuple(node.base.shape)} exports as PEFT target_parameters only as "
                        f"a 3-D expert stack with view {EXPERTS_VIEW}; got {node.view}")
    a, b = _factors(node)
    (e, d1, r), d2 = a.shape, b.shape[-1]
    module = modules.to_torch(mpath)
    modules.check(module, name, path)
    key = PREFIX + module
    if key in scales:
        raise SpecError(f"{path}: module {module!r} already has an adapter; PEFT files hold one per module")
    big_a, big_b = expert_factors(mpath, modules, e, r, d1, d2)[3](a, b)
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(big_a)
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(big_b)
    scales[key] = _exported_scale(node.method, False, r)
    parameters.append(f"{module}.{name}")


def _lora_tensors(path, node, modules: ModuleMap, slice_path, tensors, scales, copies, parameters):
    """Writes one LoRA/DoRA node's tensors (one module per slice of a stacked node)."""
    if path.rpartition("/")[2] not in LEAVES:   # a raw parameter: PEFT target_parameters
        return _parameter_tensors(path, node, modules, tensors, scales, parameters)
    mpath, leaf = split_leaf(path)
    if leaf not in ("kernel", "embedding"):
        raise SpecError(f"{path}: HF PEFT puts LoRA on Linear weights (kernel) and embeddings; not on {leaf!r}")
    if mpath in modules.tied:
        raise SpecError(f"{path}: the model ties this weight to its output head; PEFT's adapter changes only the "
                        "input lookup, jpeft's changes both, so the export would not reproduce it")
    if type(node.method) in BY_METHOD:
        return _row_tensors(BY_METHOD[type(node.method)], path, node, modules, tensors, scales, copies)
    if leaf == "embedding" and ("m" in node.train or "a0" in node.frozen):
        raise SpecError(f"{path}: only plain LoRA (not DoRA, not a base-rewriting init) exports onto an embedding")
    a, b = _factors(node)
    m = np.asarray(node.train["m"], np.float32) if "m" in node.train else None
    batch = () if node.view is None else node.view.batch_shape(node.base.shape)
    slices = [((), path)] if not batch else [(idx, slice_path(path, idx)) for idx in np.ndindex(*batch)]
    for idx, sliced in slices:
        module = modules.to_torch(split_leaf(sliced)[0])
        modules.check(module, "weight", path)
        key = PREFIX + module
        if key in scales:
            raise SpecError(f"{path}: HF PEFT module name {module!r} is already taken by another kernel "
                            f"(the ModuleMap / slice_path must give each kernel slice its own name)")
        names = ("lora_embedding_A", "lora_embedding_B") if leaf == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{key}.{names[0]}"] = np.ascontiguousarray(a[idx].T)
        tensors[f"{key}.{names[1]}"] = np.ascontiguousarray(b[idx].T)
        if m is not None:
            tensors[f"{key}.lora_magnitude_vector"] = m[idx]
        scales[key] = _exported_scale(node.method, "a0" in node.frozen, a.shape[-1])


def _row_tensors(row: MethodRow, path, node, modules: ModuleMap, tensors, scales, copies):
    """A `MethodRow` method's tensors (plain 2-D kernels)."""
    if node.view is not None or split_leaf(path)[1] != "kernel" or split_leaf(path)[0] in modules.conv1d:
        raise SpecError(f"{path}: {row.peft_type} exports from plain 2-D kernels of Linear modules")
    module = modules.to_torch(split_leaf(path)[0])
    modules.check(module, "weight", path)
    key = PREFIX + module
    for kind, value in row.write(node).items():
        tensors[f"{key}.{kind}"] = np.ascontiguousarray(value)
    owned = {**node.frozen.get(SHARED, {}), **node.train.get(SHARED, {})}
    if owned:   # the config's owner node: the model-wide tensors (and their per-module copies)
        for file_key, (field, _, to_file) in row.shared.items():
            tensors[file_key] = np.ascontiguousarray(to_file(np.asarray(owned[field], np.float32)))
    for kind, file_key in row.copies.items():
        copies.append((f"{key}.{kind}", file_key))
    scales[key] = None


def _bias_mode(trained_bias: set, targets: set, all_biases: set) -> str:
    if not trained_bias:
        return "none"
    if trained_bias == {t for t in targets if t in all_biases}:
        return "lora_only"
    if trained_bias == all_biases:
        return "all"
    return "modules_to_save"


def _pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and `{escaped module: value}` for the others (PEFT's patterns)."""
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(k[len(PREFIX):]): v for k, v in sorted(values.items()) if v != common}


def export_peft(directory: str, params: Any, spec: Spec, *, modules: ModuleMap = DEFAULT_MAP,
                slice_path: Callable[[str, tuple[int, ...]], str] = default_slice_path,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                overwrite: bool = False) -> None:
    """Write `params`' adapters as a HuggingFace PEFT LoRA/DoRA adapter folder. Viewed kernels
    (`jpeft.View`) export their matrix view; a stacked kernel (batch axes) one module per slice,
    named from `slice_path(path, index)`. `jpeft.Full` leaves export as `bias="lora_only"` /
    `"all"` when they are exactly those biases, else as `modules_to_save` (whole modules)."""
    check_fits(params, spec)
    if task_type not in TASK_TYPES:
        raise SpecError(f"task_type={task_type!r}: expected one of {TASK_TYPES}")
    flat = leaves_with_paths(params, is_leaf=lambda x: is_adapter(x) or is_leaf_node(x))
    lora = [(p, n) for p, n in flat if isinstance(n, Adapter) and not isinstance(n.method, Full)]
    full = {p: n.train["w"] for p, n in flat if isinstance(n, Adapter) and isinstance(n.method, Full)}
    plain = {p: x for p, x in flat if not isinstance(x, Adapter)}
    family = _exported_family({n.method for _, n in lora})

    tensors: dict[str, np.ndarray] = {}
    scales: dict[str, tuple] = {}
    copies: list[tuple[str, str]] = []   # (per-module key, model-wide key it repeats)
    parameters: list[str] = []           # PEFT target_parameters ("<module>.<parameter>")
    for path, node in lora:
        _lora_tensors(path, node, modules, slice_path, tensors, scales, copies, parameters)
    for key, file_key in copies:
        tensors[key] = tensors[file_key]
    targets = {p.rpartition("/")[0] for p, _ in lora}

    # jpeft.Full leaves: trained biases, or whole modules (modules_to_save)
    by_module: dict[str, set] = collections.defaultdict(set)
    for path in full:
        by_module[split_leaf(path)[0]].add(split_leaf(path)[1])
    to_save = {m for m, leaves in by_module.items() if leaves != {"bias"}}
    if task_type == "SEQ_CLS":
        to_save |= {p.rpartition("/")[0] for p in [*full, *plain] if p.rpartition("/")[0].rpartition("/")[2] in HEADS}
    bias_paths = {p for p in [*full, *plain] if p.endswith("/bias") and split_leaf(p)[0] not in to_save}
    trained_bias = {m for m, leaves in by_module.items() if leaves == {"bias"} and m not in to_save}
    mode = _bias_mode(trained_bias, targets, {split_leaf(p)[0] for p in bias_paths})
    if mode == "modules_to_save":
        if trained_bias & targets:
            raise SpecError(f"trained biases {sorted(trained_bias)}: PEFT saves all biases (bias='all'), those of "
                            f"the LoRA targets (bias='lora_only') or whole modules other than the targets; this "
                            f"set is none of these")
        to_save |= trained_bias
        mode = "none"
    if to_save & targets:
        raise SpecError(f"modules {sorted(to_save & targets)}: a module is either LoRA-adapted or saved whole "
                        "(modules_to_save) in PEFT, not both")
    values = {**plain, **full}
    for path, x in values.items():
        mpath, _, leaf = path.rpartition("/")
        saved_whole = mpath in to_save
        if not (saved_whole or (mode != "none" and path in bias_paths and (mode == "all" or mpath in targets))):
            continue
        if leaf not in LEAVES:
            raise SpecError(f"{path}: module {mpath!r} is saved whole, but {leaf!r} has no torch parameter name")
        module = modules.to_torch(mpath)
        torch_leaf = LEAVES[leaf]
        modules.check(module, torch_leaf, path)
        inner = ".base_layer" if mpath in targets else ""
        try:
            tensors[f"{PREFIX}{module}{inner}.{torch_leaf}"] = torch_layout(x, modules.transposed(mpath, leaf))
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from None

    conv1d = any(p.rpartition("/")[0] in modules.conv1d for p, _ in lora)
    common = dict(task_type=task_type, base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=conv1d,
                  target_modules=sorted(k[len(PREFIX):] for k in scales
                                        if k[len(PREFIX):] not in {p.rpartition(".")[0] for p in parameters}),
                  bias=mode,
                  modules_to_save=sorted(modules.to_torch(m) for m in to_save) or None, inference_mode=True)
    if family in BY_METHOD:
        row = BY_METHOD[family]
        config = export_config(row.keys, row.peft_type, **common, **row.config(lora[0][1].method))
    else:
        if len({v[2] for v in scales.values()}) != 1:
            raise SpecError("HF PEFT has one use_rslora per adapter; the exported modules mix rsLoRA and plain "
                            "scales (a base-rewriting init exports with its scale folded into alpha)")
        rank, rank_pattern = _pattern({k: v[0] for k, v in scales.items()})
        alpha, alpha_pattern = _pattern({k: v[1] for k, v in scales.items()})
        if parameters:
            common["target_parameters"] = sorted(parameters)
        config = export_config(LORA_KEYS, "LORA", r=rank, lora_alpha=alpha, use_rslora=next(iter(scales.values()))[2],
                               use_dora=family is DoRA, lora_dropout=float(lora[0][1].method.dropout),
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **common)

    def write(tmp):
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=1)

    atomic_write(directory, write, overwrite)


def export_merged(directory: str, params: Any, spec: Spec, state_dict: Callable[[Any], dict[str, np.ndarray]],
                  *, config: dict | None = None, overwrite: bool = False) -> None:
    """Fold every adapter in (`jpeft.merge`) and write `model.safetensors` with the model's own
    name/layout mapping `state_dict(plain_params) -> {name: array}` (e.g.
    `jpeft.models.llama.to_hf_state_dict`), plus `config.json` when given, for `from_pretrained`."""
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_dict(merge(params, spec)).items()}

    def write(tmp):
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=1)

    atomic_write(directory, write, overwrite)
