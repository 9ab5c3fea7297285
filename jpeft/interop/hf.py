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

import os
import re
from typing import Any

from jpeft.checkpoint import atomic_write
from jpeft.errors import SpecError
from jpeft.interop.hf_export import check_exportable, export_merged, export_peft, peft_type_of
from jpeft.interop.hf_import import import_peft, read_folder
from jpeft.interop.peft_format import CONFIG, WEIGHTS, default_slice_path
from jpeft.spec import Spec

__all__ = ["DEFAULT_ADAPTER", "check_exportable", "default_slice_path", "export_merged", "export_peft",
           "export_peft_adapters", "import_peft", "import_peft_adapters", "peft_type_of", "read_folder"]


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
