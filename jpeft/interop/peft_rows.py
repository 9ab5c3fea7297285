"""Adapter-file rows for PEFT tuner types with one jpeft method each (`MethodRow`): which tensors
a module has, how they map to the method's train fields, and the type's config table.

LoRA / DoRA (embeddings, rank and alpha patterns, base-rewriting inits, `lora_bias`) is
`jpeft.interop.hf`'s own path; everything else about a folder (reading and checking it, biases and
`modules_to_save` as `jpeft.Full` leaves, the target check, the ModuleMap) is shared. A method
added later adds its row to `ROWS`; its key table must cover PEFT's config class
(`tests/interop/test_peft_interop.py` checks every table against the installed PEFT).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jpeft.adapter import Adapter
from jpeft.interop.peft_config import LORA_CHECKS, LORA_KEYS, Key, honoured, irrelevant, is_int, is_number, refused
from jpeft.methods.adaptive import AdaLoRA
from jpeft.methods.bank import RandLoRA
from jpeft.methods.block import GraLoRA
from jpeft.methods.vb_lora import VBLoRA


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One PEFT tuner type ↔ one jpeft method class.

    `read(parts, config, (in, out), module)` → `(method, train, state or None)` from one module's
    tensors (`parts`: kind → array, torch layout), the checked config and the torch module name;
    raises `ValueError` with the reason. `write(node)` → `{kind: array}` for one 2-D node.
    `config(method)` → the type's config values. `checks`: `{key: (predicate, expected)}` on top of the
    LoRA ones. `shared`: tensors of the whole model (`{file key: (field of the config's shared state,
    file → jpeft layout, jpeft → file layout)}`, e.g. VB-LoRA's vector bank), held by the config's owner node
    (`jpeft.shared`). `copies`: per-module tensors that
    repeat a model-wide one (`{kind: file key}`): checked equal on import, written on export."""

    peft_type: str
    method: type
    keys: dict[str, Key]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    read: Callable[[dict, dict, tuple, str], tuple]
    write: Callable[[Adapter], dict]
    config: Callable[[Any], dict]
    checks: dict = dataclasses.field(default_factory=dict)
    shared: dict = dataclasses.field(default_factory=dict)
    copies: dict = dataclasses.field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.required + self.optional + tuple(self.copies)


def _shape(parts, kind, want):
    if tuple(parts[kind].shape) != tuple(want):
        raise ValueError(f"{kind} has shape {tuple(parts[kind].shape)}; the model needs {tuple(want)}")


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _same(x):
    return x


# ------------------------------------------------------------------------------------------ AdaLoRA


def _adalora_read(parts, config, shape, module):
    """`lora_A` (r, in) = aᵀ, `lora_E` (r, 1) = e, `lora_B` (out, r) = bᵀ. After PEFT's final
    allocation the file holds the kept triplets and `rank_pattern` their positions among `init_r`;
    the others become zero triplets with `keep` false (the same outputs)."""
    for key, inert in (("lora_dropout", 0.0), ("use_rslora", False), ("lora_bias", False)):
        if config[key] != inert:
            raise ValueError(f"{key}={config[key]!r}: jpeft.AdaLoRA has no such option")
    if config["init_lora_weights"] not in (True, False):
        raise ValueError(f"init_lora_weights={config['init_lora_weights']!r} with AdaLoRA")
    (n, m), r0 = shape, config["init_r"]
    keep = np.asarray(_module_pattern(config, module) or [True] * r0, bool)
    if len(keep) != r0:
        raise ValueError(f"rank_pattern has {len(keep)} entries; init_r={r0}")
    k = int(keep.sum())
    _shape(parts, "lora_A", (k, n))
    _shape(parts, "lora_E", (k, 1))
    _shape(parts, "lora_B", (m, k))
    a, e, b = np.zeros((n, r0), np.float32), np.zeros((r0,), np.float32), np.zeros((r0, m), np.float32)
    a[:, keep], e[keep], b[keep] = parts["lora_A"].T, parts["lora_E"][:, 0], parts["lora_B"].T
    method = AdaLoRA(init_r=r0, target_r=config["target_r"], alpha=float(config["lora_alpha"]),
                     total_step=config["total_step"], tinit=config["tinit"], tfinal=config["tfinal"],
                     delta_t=config["deltaT"], beta1=float(config["beta1"]), beta2=float(config["beta2"]),
                     orth_reg_weight=float(config["orth_reg_weight"]))
    return method, {"a": a, "e": e, "b": b}, {"keep": keep}


def _adalora_write(node):
    """Every `init_r` triplet, masked ones with `e = 0`, and no `rank_pattern`: PEFT loads them
    unresized, with the same outputs."""
    return {"lora_A": _f32(node.train["a"]).T, "lora_E": _f32(node.train["e"])[:, None],
            "lora_B": _f32(node.train["b"]).T}


def _adalora_config(m: AdaLoRA) -> dict:
    return dict(init_r=m.init_r, r=m.init_r, target_r=m.target_r, lora_alpha=float(m.alpha), total_step=m.total_step,
                tinit=m.tinit, tfinal=m.tfinal, deltaT=m.delta_t, beta1=m.beta1, beta2=m.beta2,
                orth_reg_weight=m.orth_reg_weight, rank_pattern=None)


ADALORA_KEYS: dict[str, Key] = {   # `AdaLoraConfig` extends `LoraConfig`
    **LORA_KEYS,
    "r": irrelevant("AdaLoRA's rank is init_r", 8),
    "rank_pattern": honoured("the final allocation {module: [kept?] * init_r}; the saved tensors hold the kept "
                             "triplets (the others import as zero triplets, masked)"),
    "alpha_pattern": refused("per-module alphas (PEFT's AdaLoRA ignores them)", {}),
    "use_dora": refused("DoRA (PEFT refuses it with AdaLoRA)", False),
    "target_r": honoured("AdaLoRA target_r", 8),
    "init_r": honoured("AdaLoRA init_r", 12),
    "tinit": honoured("AdaLoRA tinit", 0),
    "tfinal": honoured("AdaLoRA tfinal", 0),
    "deltaT": honoured("AdaLoRA delta_t", 1),
    "beta1": honoured("AdaLoRA beta1", 0.85),
    "beta2": honoured("AdaLoRA beta2", 0.85),
    "orth_reg_weight": honoured("AdaLoRA orth_reg_weight", 0.5),
    "total_step": honoured("AdaLoRA total_step"),
}

_ADALORA_CHECKS = {
    **{k: (lambda v: is_int(v) and v >= 0, "an integer >= 0") for k in ("target_r", "tinit", "tfinal")},
    "init_r": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "deltaT": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "total_step": (lambda v: is_int(v) and v > 0, "a positive integer (the number of training steps)"),
    **{k: (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)") for k in ("beta1", "beta2")},
    "orth_reg_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "r": (lambda v: True, ""),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(m, list) and all(isinstance(b, bool) for b in m) for m in v.values())),
        "null or a {module: [true/false per triplet]} object"),
}


def _module_pattern(config: dict, module: str):
    """AdaLoRA's `rank_pattern` entry of `module` (its keys end in `.lora_E` or `.lora_E.default`)."""
    pattern = {re.sub(r"\.lora_E(\.default)?$", "", k): v for k, v in (config.get("rank_pattern") or {}).items()}
    return pattern.get(module)


# ------------------------------------------------------------------------------------------ GraLoRA


def _gralora_read(parts, config, shape, module):
    """`gralora_A` (k, in/k, r) = a and `gralora_B` (k, r, out/k) = b (jpeft keeps PEFT's layout);
    the hybrid branch `gralora_A_general.weight` (r_h, in) = haᵀ, `gralora_B_general.weight`
    (out, r_h) = hbᵀ."""
    (n, m), r, k, hr = shape, config["r"], config["gralora_k"], config["hybrid_r"]
    if n % k or m % k:
        raise ValueError(f"gralora_k={k} must divide in={n} and out={m}")
    _shape(parts, "gralora_A", (k, n // k, r))
    _shape(parts, "gralora_B", (k, r, m // k))
    train = {"a": parts["gralora_A"], "b": parts["gralora_B"]}
    hybrid = ("gralora_A_general.weight", "gralora_B_general.weight")
    if hr:
        for kind in hybrid:
            if kind not in parts:
                raise ValueError(f"{kind} is missing (hybrid_r={hr})")
        _shape(parts, hybrid[0], (hr, n))
        _shape(parts, hybrid[1], (m, hr))
        train |= {"ha": parts[hybrid[0]].T, "hb": parts[hybrid[1]].T}
    elif any(kind in parts for kind in hybrid):
        raise ValueError("hybrid factors with hybrid_r=0")
    return GraLoRA(rank=r, alpha=float(config["alpha"]), k=k, hybrid_rank=hr), train, None


def _gralora_write(node):
    out = {"gralora_A": _f32(node.train["a"]), "gralora_B": _f32(node.train["b"])}
    if "ha" in node.train:
        out |= {"gralora_A_general.weight": _f32(node.train["ha"]).T,
                "gralora_B_general.weight": _f32(node.train["hb"]).T}
    return out


def _gralora_config(m: GraLoRA) -> dict:
    return dict(r=m.rank, alpha=float(m.alpha), gralora_k=m.k, hybrid_r=m.hybrid_rank)


_COMMON = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
           "inference_mode", "target_modules", "fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform",
           "layers_pattern")
GRALORA_KEYS: dict[str, Key] = {
    **{k: LORA_KEYS[k] for k in _COMMON},
    "r": honoured("GraLoRA rank", 32),
    "hybrid_r": honoured("GraLoRA hybrid_rank", 0),
    "alpha": honoured("GraLoRA alpha", 64),
    "gralora_dropout": refused("adapter dropout (jpeft.GraLoRA has none)", 0.0),
    "gralora_k": honoured("GraLoRA k", 2),
    "init_weights": irrelevant("the saved factors carry the values; the init does not touch the base", True),
}
_GRALORA_CHECKS = {
    "hybrid_r": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "gralora_k": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "alpha": (is_number, "a number"),
}

# ------------------------------------------------------------------------------------------ VB-LoRA


def _vblora_read(parts, config, shape, module):
    """`vblora_logits_A` (r, in/b, h) and `vblora_logits_B` (out/b, r, h): jpeft keeps PEFT's
    layout; the bank `base_model.vblora_vector_bank` (h, b) is the shared state."""
    (n, m), r, h, b = shape, config["r"], config["num_vectors"], config["vector_length"]
    if n % b or m % b:
        raise ValueError(f"vector_length={b} must divide in={n} and out={m}")
    _shape(parts, "vblora_logits_A", (r, n // b, h))
    _shape(parts, "vblora_logits_B", (m // b, r, h))
    method = VBLoRA(rank=r, num_vectors=h, vector_length=b, topk=config["topk"],
                    init_bank_bound=float(config["init_vector_bank_bound"]),
                    init_logits_std=float(config["init_logits_std"]))
    return method, {"logits_a": parts["vblora_logits_A"], "logits_b": parts["vblora_logits_B"]}, None


def _vblora_write(node):
    return {"vblora_logits_A": _f32(node.train["logits_a"]), "vblora_logits_B": _f32(node.train["logits_b"])}


def _vblora_config(m: VBLoRA) -> dict:
    return dict(r=m.rank, num_vectors=m.num_vectors, vector_length=m.vector_length, topk=m.topk,
                init_vector_bank_bound=m.init_bank_bound, init_logits_std=m.init_logits_std)


VBLORA_KEYS: dict[str, Key] = {
    **{k: LORA_KEYS[k] for k in _COMMON + ("exclude_modules",)},
    "r": honoured("VB-LoRA rank", 4),
    "num_vectors": honoured("VB-LoRA num_vectors (the bank's rows)", 256),
    "vector_length": honoured("VB-LoRA vector_length", 256),
    "topk": honoured("VB-LoRA topk", 2),
    "save_only_topk_weights": refused("the top-k-only save (inference only; jpeft.methods.vb_lora.vblora_topk_export)",
                                      False),
    "vblora_dropout": refused("adapter dropout (jpeft.VBLoRA has none)", 0.0),
    "init_vector_bank_bound": honoured("VB-LoRA init_bank_bound", 0.02),
    "init_logits_std": honoured("VB-LoRA init_logits_std", 0.1),
}
_VBLORA_CHECKS = {k: (lambda v: is_int(v) and v > 0, "a positive integer")
                  for k in ("num_vectors", "vector_length", "topk")}

# ----------------------------------------------------------------------------------------- RandLoRA


def _randlora_read(parts, config, shape, module):
    """`randlora_lambda` (r, N) = λ and `randlora_gamma` (N, d) = γ; the frozen bases are
    model-wide (`base_model.randlora_A` (r, 1, d_max): A, `base_model.randlora_B`
    (D_max, N_max, r): B)."""
    r, d = config["r"], min(shape)
    nb = -(-d // r)
    _shape(parts, "randlora_lambda", (r, nb))
    _shape(parts, "randlora_gamma", (nb, d))
    basis = "very_sparse" if config["very_sparse"] else "sparse" if config["sparse"] else "dense"
    method = RandLoRA(rank=r, alpha=float(config["randlora_alpha"]), basis=basis)
    return method, {"lam": parts["randlora_lambda"], "gamma": parts["randlora_gamma"]}, None


def _randlora_write(node):
    return {"randlora_lambda": _f32(node.train["lam"]), "randlora_gamma": _f32(node.train["gamma"])}


def _randlora_config(m: RandLoRA) -> dict:
    return dict(r=m.rank, randlora_alpha=m.alpha, sparse=m.basis == "sparse", very_sparse=m.basis == "very_sparse",
                save_projection=True)


RANDLORA_KEYS: dict[str, Key] = {
    **{k: LORA_KEYS[k] for k in _COMMON},
    "r": honoured("RandLoRA rank", 32),
    "projection_prng_key": irrelevant("the seed of PEFT's torch-generated bases; the file carries the bases "
                              "(save_projection)", 0),
    "save_projection": refused("a file without the random bases (PEFT regenerates them with torch's generator, which "
                          "jpeft does not reproduce); save with save_projection=True", True),
    "sparse": honoured("RandLoRA basis='sparse'", False),
    "very_sparse": honoured("RandLoRA basis='very_sparse'", False),
    "randlora_dropout": refused("adapter dropout (jpeft.RandLoRA has none)", 0.0),
    "randlora_alpha": honoured("RandLoRA alpha", 640),
    "init_weights": irrelevant("the saved λ, γ carry the values; the init does not touch the base", True),
}
_RANDLORA_CHECKS = {"randlora_alpha": (is_number, "a number"),
                    "sparse": (lambda v: isinstance(v, bool), "true or false"),
                    "very_sparse": (lambda v: isinstance(v, bool), "true or false")}

ROWS: dict[str, MethodRow] = {
    "ADALORA": MethodRow("ADALORA", AdaLoRA, ADALORA_KEYS, ("lora_A", "lora_E", "lora_B"), (), _adalora_read,
                         _adalora_write, _adalora_config, _ADALORA_CHECKS),
    "GRALORA": MethodRow("GRALORA", GraLoRA, GRALORA_KEYS, ("gralora_A", "gralora_B"),
                         ("gralora_A_general.weight", "gralora_B_general.weight"), _gralora_read, _gralora_write,
                         _gralora_config, _GRALORA_CHECKS),
    "VBLORA": MethodRow("VBLORA", VBLoRA, VBLORA_KEYS, ("vblora_logits_A", "vblora_logits_B"), (), _vblora_read,
                        _vblora_write, _vblora_config, _VBLORA_CHECKS,
                        shared={"base_model.vblora_vector_bank": ("bank", _same, _same)}),
    "RANDLORA": MethodRow("RANDLORA", RandLoRA, RANDLORA_KEYS, ("randlora_lambda", "randlora_gamma"), (),
                          _randlora_read, _randlora_write, _randlora_config, _RANDLORA_CHECKS,
                          shared={"base_model.randlora_A": ("a", lambda x: x[:, 0, :], lambda x: x[:, None, :]),
                                  "base_model.randlora_B": ("b", _same, _same)},
                          copies={"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}),
}
BY_METHOD: dict[type, MethodRow] = {row.method: row for row in ROWS.values()}
TABLES: dict[str, dict[str, Key]] = {"LORA": LORA_KEYS, **{t: row.keys for t, row in ROWS.items()}}
CHECKS: dict[str, dict] = {"LORA": LORA_CHECKS, **{t: {**LORA_CHECKS, **row.checks} for t, row in ROWS.items()}}
