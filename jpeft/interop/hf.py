"""HuggingFace PEFT adapter folders, both ways (docs/interop.md): `adapter_config.json` +
`adapter_model.safetensors`, torch `(out, in)` layout, keys `base_model.model.<module>.<tensor>`.

What maps to what (the config keys: `jpeft.interop.peft_config.LORA_KEYS`):

- `lora_A.weight` / `lora_B.weight` (+ `lora_magnitude_vector`): `jpeft.LoRA` / `jpeft.DoRA` on a
  `kernel`; `lora_embedding_A` / `lora_embedding_B`: `jpeft.LoRA` on an `embedding`. Per-module
  ranks and alphas are `rank_pattern` / `alpha_pattern` (one Spec rule per rank and alpha).
- AdaLoRA, GraLoRA, VB-LoRA and RandLoRA folders: their rows in `jpeft.interop.peft_rows` (one jpeft method each).
- `modules_to_save` (whole modules) and `bias="all"|"lora_only"` (biases): `jpeft.Full` leaves.
  `lora_bias` (a bias on `lora_B`) imports folded into the module's bias, a `jpeft.Full` leaf (the
  same outputs; it exports as that trained bias).
- `init_lora_weights="pissa"|"olora"`: PEFT reloads such a save by re-running the init on the
  original base; so does the import. Adapters whose init rewrote the base export as a plain LoRA of
  rank 2r on the *unmodified* base, `s·(a@b − a₀@b₀) = s·[a | a₀] @ [b ; −b₀]`.
- GPT-2-style `Conv1D` modules (`fan_in_fan_out`): the LoRA factors are the same as for a
  `Linear`; only whole weights (`modules_to_save`) keep their `(in, out)` layout. Which modules
  are `Conv1D` is the ModuleMap's `conv1d` (PEFT itself corrects the flag per module type).
- `task_type` CAUSAL_LM, SEQ_CLS (the `classifier` / `score` head is written as a module to
  save, as PEFT expects), FEATURE_EXTRACTION.

Import places every tensor of the file or fails naming it. torch is not needed: safetensors and
JSON only. Module names come from a `jpeft.interop.modules.ModuleMap` (the shipped models carry
theirs).
"""

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
from safetensors.numpy import save_file

from jpeft.adapter import Adapter, is_adapter
from jpeft.checkpoint import atomic_write
from jpeft.core import check_fits, init, merge
from jpeft.errors import SpecError
from jpeft.interop.modules import DEFAULT_MAP, LEAVES, ModuleMap, split_leaf
from jpeft.interop.peft_config import (
    LORA_KEYS,
    RERUN_INITS,
    TASK_TYPES,
    check_config,
    export_config,
    pattern_value,
    targets_module,
)
from jpeft.interop.peft_rows import BY_METHOD, CHECKS, ROWS, TABLES, MethodRow
from jpeft.methods.dora import DoRA
from jpeft.methods.full import Full
from jpeft.methods.lowrank import LoRA, lora_scale
from jpeft.paths import closest_paths, leaves_with_paths
from jpeft.quant import dequantize_array, is_leaf_node, is_quantized
from jpeft.shared import SHARED
from jpeft.spec import Spec
from jpeft.views import View

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEADS = ("classifier", "score")   # PEFT's SEQ_CLS heads (always modules to save)
LORA_KINDS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A",
              "lora_embedding_B")
ADAPTER_KINDS = frozenset(LORA_KINDS) | {k for row in ROWS.values() for k in row.kinds}
_BASE_KINDS = ("base_layer.weight", "base_layer.bias", "weight", "bias")
_KEY = re.compile(r"(?P<module>.+?)\.(?P<kind>" + "|".join(
    re.escape(k) for k in sorted(ADAPTER_KINDS | set(_BASE_KINDS), key=len, reverse=True)) + ")")


def default_slice_path(param_path: str, index: tuple[int, ...]) -> str:
    """The parameter path of one slice of a stacked kernel (a view with batch axes, e.g. an
    `nn.scan` stack): the indices join the first path component, `layers/q/kernel`, `(2,)` →
    `layers_2/q/kernel` (→ torch `layers.2.q`)."""
    head, _, rest = param_path.partition("/")
    return "/".join([head + "".join(f"_{i}" for i in index), rest] if rest else [head])


def _np(x) -> np.ndarray:
    return np.asarray(dequantize_array(x) if is_quantized(x) else x, np.float32)


def _torch_layout(x, transposed: bool) -> np.ndarray:
    x = _np(x)
    if transposed and x.ndim != 2:
        raise SpecError(f"a {x.ndim}-D kernel {x.shape} has no torch Linear weight; only 2-D kernels are saved whole")
    return np.ascontiguousarray(x.T if transposed else x)


# ---------------------------------------------------------------------------------------------- export


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


EXPERTS_VIEW = View(inputs=(1,), outputs=(2,), batch=(0,))


def _expert_factors(module_path: str, modules: ModuleMap, e: int, r: int, d1: int, d2: int):
    """PEFT's `target_parameters` layout of a `(E, d1, d2)` expert stack, as
    `(lora_A shape, lora_B shape, (A, B) → (a, b), (a, b) → (A, B))` with jpeft's per-expert
    `a (E, d1, r)`, `b (E, r, d2)`, `ΔK_e = s·a_e@b_e`. PEFT swaps in/out for a 3-D parameter unless
    its module `is_transposed`: then `ΔK_e = s·B_eᵀ...` reads `A (E·r, d1)`, `B (d2, r·E)`; else
    `A (E·r, d2)`, `B (d1, r·E)` with `ΔK_e = s·B_e@A_e`."""
    if module_path in modules.transposed_experts:
        return ((e * r, d1), (d2, r * e),
                lambda A, B: (A.reshape(e, r, d1).transpose(0, 2, 1), B.reshape(d2, r, e).transpose(2, 1, 0)),
                lambda a, b: (a.transpose(0, 2, 1).reshape(e * r, d1), b.transpose(2, 1, 0).reshape(d2, r * e)))
    return ((e * r, d2), (d1, r * e),
            lambda A, B: (B.reshape(d1, r, e).transpose(2, 0, 1), A.reshape(e, r, d2)),
            lambda a, b: (b.reshape(e * r, d2), a.transpose(1, 2, 0).reshape(d1, r * e)))


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
    big_a, big_b = _expert_factors(mpath, modules, e, r, d1, d2)[3](a, b)
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
            tensors[f"{PREFIX}{module}{inner}.{torch_leaf}"] = _torch_layout(x, modules.transposed(mpath, leaf))
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


# ---------------------------------------------------------------------------------------------- import


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
        match = _KEY.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
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
    a_shape, b_shape, to_jpeft, _ = _expert_factors(mpath, model.modules, shape[0], rank, shape[1], shape[2])
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
            values[path] = {"w": _np(flat[path])}
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


# ------------------------------------------------------------------------------- several adapters

DEFAULT_ADAPTER = "default"


def export_peft_adapters(directory: str, adapters: dict[str, tuple[Any, Spec]], *, overwrite: bool = False,
                         **options) -> None:
    """Several named adapters of one base in PEFT's multi-adapter layout: `"default"` at the top of
    `directory`, every other name in its own sub-folder (`PeftModel.from_pretrained` loads the
    default; `load_adapter(f"{directory}/{name}", adapter_name=name)` the others). `adapters`:
    `{name: (params, spec)}`; `options` go to `export_peft`."""
    if DEFAULT_ADAPTER not in adapters:
        raise SpecError(f"PEFT's layout keeps the {DEFAULT_ADAPTER!r} adapter at the top of the folder; got names "
                        f"{sorted(adapters)}")
    for name in adapters:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (CONFIG, WEIGHTS) or name.startswith("."):
            raise SpecError(f"adapter name {name!r}: expected letters, digits, '_', '-' or '.' (it names a sub-folder)")

    def write(tmp):
        params, spec = adapters[DEFAULT_ADAPTER]
        export_peft(tmp, params, spec, **options)
        for name, (params, spec) in adapters.items():
            if name != DEFAULT_ADAPTER:
                export_peft(os.path.join(tmp, name), params, spec, **options)

    atomic_write(directory, write, overwrite)


def import_peft_adapters(directory: str, base_params: Any, **options) -> dict[str, tuple[Any, Spec]]:
    """`{name: (params, spec)}` of a PEFT multi-adapter folder: the top-level adapter as
    `"default"` and every sub-folder holding an adapter under its name (each via `import_peft`,
    with `options`). A sub-folder with only one of the two files is an error naming it."""
    out = {DEFAULT_ADAPTER: import_peft(directory, base_params, **options)}
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if not os.path.isdir(sub):
            continue
        present = [f for f in (CONFIG, WEIGHTS) if os.path.isfile(os.path.join(sub, f))]
        if present:
            out[name] = import_peft(sub, base_params, **options)   # a half folder fails there, named
    return out
