"""Every key of HF PEFT's `LoraConfig`, in one table: what jpeft does with it.

- `honoured`: read on import and written on export (`jpeft.interop.hf`).
- `irrelevant`: carries nothing jpeft needs; the reason says why. Read and ignored on import,
  written with PEFT's default on export.
- `refused`: a feature jpeft does not reproduce. Its inert value (PEFT's default) is accepted; any
  other value is an error naming the key.

The other tuner types' tables are in `jpeft.interop.peft_rows`. `tests/interop/test_peft_interop.py`
fails when the installed PEFT's config classes have a key these tables lack (or a table a key
PEFT dropped), so a PEFT upgrade cannot add a silently ignored option.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jpeft.errors import SpecError

TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
BIAS = ("none", "all", "lora_only")
# init_lora_weights values whose saved factors apply to the untouched base weights.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# ... whose saves PEFT reloads by re-running the deterministic init on the original base (jpeft
# does the same: `jpeft.LoRA(init=...)`).
RERUN_INITS = ("pissa", "olora")


@dataclasses.dataclass(frozen=True)
class Key:
    handling: str            # "honoured" | "irrelevant" | "refused"
    why: str
    default: Any = None      # PEFT's default: written on export; for "refused", the accepted inert value


def honoured(why, default=None) -> Key:
    return Key("honoured", why, default)


def irrelevant(why, default=None) -> Key:
    return Key("irrelevant", why, default)


def refused(why, default=None) -> Key:
    return Key("refused", why, default)


_CONVERTED = "save it with PEFT's `path_initial_model_for_weight_conversion` (a plain LoRA of rank 2r) and import that"

LORA_KEYS: dict[str, Key] = {
    "task_type": honoured(f"one of {TASK_TYPES}; SEQ_CLS puts the classifier head in modules_to_save"),
    "peft_type": honoured("LORA"),
    "auto_mapping": irrelevant("the transformers class PEFT wrapped; jpeft's caller passes the model"),
    "peft_version": irrelevant("informational"),
    "base_model_name_or_path": irrelevant("where PEFT fetches the base; jpeft's caller passes the base "
                                          "(written on export when given)"),
    "revision": irrelevant("a hub revision of the base model; jpeft's caller passes the base"),
    "inference_mode": irrelevant("PEFT's requires_grad switch; in jpeft what trains is `jpeft.split`'s choice", True),
    "r": honoured("the rank (checked against every module's tensors)", 8),
    "target_modules": honoured("checked: every module it selects in the model has its tensors in the file"),
    "exclude_modules": honoured("part of the target check"),
    "lora_alpha": honoured("the scale's alpha", 8),
    "lora_dropout": honoured("the adapter-branch dropout (jpeft.LoRA(dropout=...))", 0.0),
    "fan_in_fan_out": honoured("GPT-2-style Conv1D weights stored (in, out): the ModuleMap's `conv1d` says "
                               "which modules they are (PEFT corrects the flag per module type likewise); "
                               "written true when a target is one",
                               False),
    "bias": honoured(f"one of {BIAS}: the saved biases become jpeft.Full leaves", "none"),
    "use_rslora": honoured("the α/√r scale", False),
    "modules_to_save": honoured("whole modules trained and saved: jpeft.Full leaves"),
    "init_lora_weights": honoured(f"{PLAIN_INITS} load as saved; {RERUN_INITS} re-run the init on the original base "
                            "as PEFT does; the others are refused", True),
    "layers_to_transform": honoured("part of the target check"),
    "layers_pattern": honoured("part of the target check"),
    "rank_pattern": honoured("per-module ranks (one jpeft Spec rule per rank and alpha)", {}),
    "alpha_pattern": honoured("per-module alphas", {}),
    "megatron_config": refused("Megatron tensor-parallel layers"),
    "megatron_core": irrelevant("the Megatron module name, used only with megatron_config", "megatron.core"),
    "trainable_token_indices": refused("trainable token rows of an embedding (PEFT's TrainableTokens)"),
    "loftq_config": refused(f"LoftQ's base is torch's quantiser output; {_CONVERTED}", {}),
    "eva_config": irrelevant("EVA's init options: the saved factors apply to the untouched base"),
    "corda_config": refused(f"CorDA rewrites the base from calibration data; {_CONVERTED}"),
    "lora_ga_config": refused(f"LoRA-GA rewrites the base from gradients; {_CONVERTED}"),
    "use_dora": honoured("DoRA (jpeft.DoRA)", False),
    "velora_config": refused("VeLoRA's compressed activations"),
    "alora_invocation_tokens": refused("activated LoRA (input-dependent activation)"),
    "use_qalora": refused("QA-LoRA's pooled inputs", False),
    "qalora_group_size": irrelevant("used only with use_qalora", 16),
    "monteclora_config": refused("MonteCLoRA's stochastic factors"),
    "layer_replication": refused("PEFT's layer replication (the model's depth changes)"),
    "runtime_config": irrelevant("PEFT runtime options (GPU offload); PEFT does not save it"),
    "lora_bias": honoured("the bias on lora_B: folded into the module's bias, a jpeft.Full leaf", False),
    "target_parameters": honoured("LoRA on raw 3-D parameters (MoE expert stacks `<module>.<parameter>`): one adapter "
                            "per expert through jpeft.View(inputs=(1,), outputs=(2,), batch=(0,))"),
    "use_bdlora": refused("block-diagonal LoRA"),
    "arrow_config": refused("Arrow routing over several adapters"),
    "kasa_config": refused("PEFT's KaSA layer (jpeft's `kasa` method has its own files)"),
    "ensure_weight_tying": refused("tied adapters on tied embeddings", False),
}


def _fail(directory: str, key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"{directory}/adapter_config.json: {key}={value!r}: expected {expected}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


LORA_CHECKS = {
    "r": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (is_number, "a number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bias": (lambda v: v in BIAS, f"one of {BIAS}"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "task_type": (lambda v: v in TASK_TYPES, f"one of {TASK_TYPES}"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _str_list(v), "a list of names or a regex"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _str_list(v), "a list of names or a regex"),
    "modules_to_save": (lambda v: v is None or _str_list(v), "null or a list of module names"),
    "target_parameters": (lambda v: v is None or _str_list(v), "null or a list of '<module>.<parameter>' names"),
    "layers_to_transform": (lambda v: v is None or is_int(v) or (isinstance(v, list) and all(map(is_int, v))),
                            "null, a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _str_list(v), "null, a name or a list of names"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(is_int(x) and x > 0 for x in v.values()),
                     "a {pattern: positive integer} object"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(map(is_number, v.values())),
                      "a {pattern: number} object"),
}


def check_config(config: Any, directory: str, tables: dict[str, dict[str, Key]], checks: dict[str, dict]) -> dict:
    """`config` (a parsed `adapter_config.json`) checked key by key against its `peft_type`'s
    table (`tables`, with value checks `checks`); returns it with PEFT's defaults filled in for
    absent keys. Raises `SpecError` naming the first key that is unknown, malformed or set to a
    refused feature."""
    if not isinstance(config, dict):
        raise SpecError(f"{directory}/adapter_config.json: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    table = tables.get(peft_type) if isinstance(peft_type, str) else None
    if table is None:
        raise SpecError(f"{directory}: peft_type={config.get('peft_type')!r}; jpeft imports {sorted(tables)} "
                        "adapter folders")
    checks = checks[config["peft_type"]]
    for key, value in config.items():
        entry = table.get(key)
        if entry is None:
            raise SpecError(f"{directory}/adapter_config.json: key {key!r} is not in jpeft's {config['peft_type']} "
                            f"config table (jpeft.interop.peft_rows.TABLES); refusing to ignore it")
        if entry.handling == "refused" and value not in (entry.default, None, {}, []):
            raise SpecError(f"{directory}/adapter_config.json: {key}={value!r} is not supported: {entry.why}")
        check = checks.get(key)
        if check is not None and not check[0](value):
            raise _fail(directory, key, value, check[1])
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS + RERUN_INITS:
        hint = _CONVERTED if isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+|loftq|corda|lora_ga", init) \
            else "a value PEFT documents"
        raise _fail(directory, "init_lora_weights", init,
                    f"one of {PLAIN_INITS + RERUN_INITS} ({init!r} depends on torch's generator, quantiser or data: "
                    f"{hint})" if hint == _CONVERTED else f"one of {PLAIN_INITS + RERUN_INITS}")
    return {**{k: e.default for k, e in table.items() if k != "runtime_config"}, **config}


def export_config(table: dict[str, Key], peft_type: str, **values) -> dict:
    """A complete `adapter_config.json` object of `peft_type`: PEFT's defaults for every key of its
    `table`, overridden by `values` (which must be table keys)."""
    unknown = set(values) - set(table)
    if unknown:
        raise KeyError(f"not {peft_type} config keys: {sorted(unknown)}")
    return {**{k: e.default for k, e in table.items() if k != "runtime_config"}, "peft_type": peft_type, **values}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first pattern `p` with
    `re.match(rf"(.*\\.)?({p})$", module)`, else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def targets_module(config: dict, module: str) -> bool:
    """Whether PEFT's `target_modules` / `exclude_modules` / `modules_to_save` /
    `layers_to_transform` / `layers_pattern` select `module` (PEFT's `check_target_module_exists`)."""
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, module) if isinstance(exclude, str)
                    else module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or ()):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    return match is not None and int(match["idx"]) in layers
