"""HuggingFace PEFT format, both ways (DESIGN.md §7): `adapter_config.json` +
`adapter_model.safetensors`, torch `(out, in)` layout, keys
`base_model.model.<module>.lora_A.weight` / `lora_B.weight` / `lora_magnitude_vector`.

Supported: LoRA (any init), rsLoRA and DoRA, on plain, viewed and stacked kernels (export);
`export_merged` writes the merged weights. Adapters whose init rewrote the base (PiSSA, OLoRA,
LoRA-GA) are exported as a plain LoRA of rank 2r on the *unmodified* base:
`s·(a@b − a₀@b₀) = s·[a | a₀] @ [b ; −b₀]` (METHODS.md §2.4 export note), so PEFT loads them on
the original model. torch is not needed: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jpeft.adapter import Adapter, is_adapter
from jpeft.checkpoint import atomic_write
from jpeft.core import check_fits, init, merge
from jpeft.errors import SpecError
from jpeft.methods.dora import DoRA
from jpeft.methods.lowrank import LoRA
from jpeft.paths import leaves_with_paths
from jpeft.spec import Spec

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def default_module_path(param_path: str) -> str:
    """`layers_0/self_attn/q_proj/kernel` → `layers.0.self_attn.q_proj` (Flax list names
    `name_N` become torch `name.N`)."""
    parts = param_path.split("/")
    if parts[-1] != "kernel":
        raise SpecError(f"{param_path}: HF PEFT export handles Dense kernels (paths ending in /kernel)")
    return ".".join(re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in parts[:-1])


def default_param_path(module_path: str) -> str:
    """Inverse of `default_module_path`."""
    out, parts = [], module_path.split(".")
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return "/".join(out) + "/kernel"


def default_slice_path(param_path: str, index: tuple[int, ...]) -> str:
    """The parameter path of one slice of a stacked kernel (a view with batch axes, e.g. an
    `nn.scan` stack): the indices join the first path component, `layers/q/kernel`, `(2,)` →
    `layers_2/q/kernel` (→ torch `layers.2.q`)."""
    head, _, rest = param_path.partition("/")
    return "/".join([head + "".join(f"_{i}" for i in index), rest] if rest else [head])


def _factors(node: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """`(a, b)` of a plain LoRA on the original base equal to this node's update (matrix view;
    batch axes in front for a stacked node)."""
    a = node.train["a"] if "a" in node.train else node.frozen["a"]
    b = node.train["b"]
    if "a0" in node.frozen:
        a = jnp.concatenate([a, node.frozen["a0"]], axis=-1)
        b = jnp.concatenate([b, -node.frozen["b0"]], axis=-2)
    return np.asarray(a, np.float32), np.asarray(b, np.float32)


def _modules(path: str, node: Adapter, module_path, slice_path):
    """`(module name, a, b, m)` per PEFT module: one for a plain or viewed kernel, one per slice
    of a stacked one. A viewed kernel's matrix (its input axes flattened row-major in the view's
    order, likewise its outputs) is the torch `Linear`'s `(out, in)` weight transposed."""
    a, b = _factors(node)
    m = np.asarray(node.train["m"], np.float32) if "m" in node.train else None
    batch = () if node.view is None else node.view.batch_shape(node.base.shape)
    if not batch:
        return [(module_path(path), a, b, m)]
    return [(module_path(slice_path(path, idx)), a[idx], b[idx], None if m is None else m[idx])
            for idx in np.ndindex(*batch)]


def _peft_config(method: LoRA, rank: int, targets: list[str], base_model: str, task_type: str | None) -> dict:
    converted = rank != method.rank
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": float(method.scale * rank) if converted else float(method.alpha),
        "use_rslora": bool(method.rslora and not converted), "use_dora": isinstance(method, DoRA),
        "target_modules": targets, "lora_dropout": float(method.dropout), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "inference_mode": True,
    }


def _exported_method(methods: set) -> LoRA:
    if len(methods) != 1 or type(next(iter(methods))) not in (LoRA, DoRA):
        raise SpecError(f"HF PEFT export needs one LoRA or DoRA config on every adapted leaf; got "
                        f"{sorted({m.name for m in methods})} with {len(methods)} distinct configs")
    method = next(iter(methods))
    if method.base_quant is not None:
        raise SpecError(f"{method!r}: init='loftq' trains over the quantised base it chose; a PEFT adapter file "
                        "applies to the original weights, so it is not exported (use export_merged)")
    return method


def check_exportable(spec: Spec) -> None:
    """The `SpecError` `export_peft` would raise for `spec`'s methods, before any training."""
    _exported_method({m for _, m in spec.rules})


def export_peft(directory: str, params: Any, spec: Spec, *, module_path: Callable[[str], str] = default_module_path,
                slice_path: Callable[[str, tuple[int, ...]], str] = default_slice_path,
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                overwrite: bool = False) -> None:
    """Write `params`' adapters as a HuggingFace PEFT LoRA/DoRA adapter folder. Viewed kernels
    (`jpeft.View`) export their matrix view; a stacked kernel (batch axes) exports one module per
    slice, named `module_path(slice_path(path, index))`."""
    check_fits(params, spec)
    nodes = [(p, n) for p, n in leaves_with_paths(params, is_leaf=is_adapter) if isinstance(n, Adapter)]
    method = _exported_method({n.method for _, n in nodes})
    tensors, ranks, targets = {}, set(), []
    for path, node in nodes:
        for module, a, b, m in _modules(path, node, module_path, slice_path):
            key = PREFIX + module
            if f"{key}.lora_A.weight" in tensors:
                raise SpecError(f"{path}: HF PEFT module name {module!r} is already taken by another kernel "
                                f"(module_path / slice_path must give each kernel slice its own name)")
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.T)
            if m is not None:
                tensors[f"{key}.lora_magnitude_vector"] = m
            ranks.add(a.shape[-1])
            targets.append(module)
    config = _peft_config(method, ranks.pop(), sorted(targets), base_model_name_or_path, task_type)

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


def import_peft(directory: str, base_params: Any, *,
                param_path: Callable[[str], str] = default_param_path) -> tuple[Any, Spec]:
    """`(adapted params, spec)` from a HuggingFace PEFT LoRA/DoRA adapter folder."""
    with open(os.path.join(directory, CONFIG)) as f:
        config = json.load(f)
    unsupported = {k: config.get(k) for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    if config.get("peft_type") != "LORA" or config.get("fan_in_fan_out") or unsupported:
        raise SpecError(f"{directory}: only plain LoRA/DoRA adapters (peft_type LORA, fan_in_fan_out false, no "
                        f"rank/alpha patterns) can be imported; got peft_type={config.get('peft_type')!r}, "
                        f"fan_in_fan_out={config.get('fan_in_fan_out')!r}, {unsupported}")
    tensors = load_file(os.path.join(directory, WEIGHTS))
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    cls = DoRA if config.get("use_dora") else LoRA
    method = cls(rank=int(config["r"]), alpha=float(config["lora_alpha"]), rslora=bool(config.get("use_rslora")))
    spec = Spec({"|".join(re.escape(param_path(m)) for m in modules): method})
    tree = init(jax.random.PRNGKey(0), base_params, spec)
    by_module = {param_path(m): m for m in modules}

    def load(path, node):
        key = PREFIX + by_module[path]
        train = {"a": jnp.asarray(tensors[f"{key}.lora_A.weight"].T), "b": jnp.asarray(tensors[f"{key}.lora_B.weight"].T)}
        if cls is DoRA:
            train["m"] = jnp.asarray(tensors[f"{key}.lora_magnitude_vector"])
        for k, v in train.items():
            if v.shape != node.train[k].shape:
                raise SpecError(f"{path}: PEFT tensor {k} has shape {v.shape}, the model expects {node.train[k].shape}")
        return node.replace(train={k: v.astype(node.train[k].dtype) for k, v in train.items()})

    leaves = [load(p, n) if isinstance(n, Adapter) else n for p, n in leaves_with_paths(tree, is_leaf=is_adapter)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree, is_leaf=is_adapter), leaves), spec
