"""How a Flax parameter tree names torch modules, for HF files (`jpeft.interop.hf`).

A parameter path is a module path plus a leaf name: `layers_0/self_attn/q_proj/kernel` is module
`layers_0/self_attn/q_proj`, leaf `kernel`. A `ModuleMap` maps module paths both ways
(`layers_0/self_attn/q_proj` ↔ `model.layers.0.self_attn.q_proj`); leaf names map by `LEAVES`
(`kernel` ↔ `weight`, transposed unless the module is a GPT-2-style `Conv1D` (`conv1d`), whose
weight is `(in, out)` already; `embedding`/`scale` ↔ `weight`; `bias` ↔ `bias`).

The shipped models carry their maps (`jpeft.models.llama.hf_module_map`,
`jpeft.models.bert.hf_module_map`), with the model's HF state-dict keys so that an export naming a
module the HF model lacks is refused instead of loading with missing keys. For other models pass
a `ModuleMap`; `DEFAULT_MAP` turns Flax list names `name_N` into torch `name.N` and back.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from jpeft.errors import SpecError

# Flax leaf name → torch parameter name. Only `kernel` is transposed (Dense (in, out) ↔ Linear (out, in)).
LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def flax_to_torch(module_path: str) -> str:
    """`layers_0/self_attn/q_proj` → `layers.0.self_attn.q_proj`."""
    return ".".join(re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in module_path.split("/"))


def torch_to_flax(module: str) -> str:
    """Inverse of `flax_to_torch`."""
    out: list[str] = []
    for p in module.split("."):
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return "/".join(out)


@dataclasses.dataclass(frozen=True)
class ModuleMap:
    """`to_torch(module_path) -> torch module name` and its inverse `to_flax`. `state_keys`: the
    HF model's state-dict keys (`model.layers.0.self_attn.q_proj.weight`, ...), or None when
    unknown; an export whose module has no such key is refused."""

    to_torch: Callable[[str], str] = flax_to_torch
    to_flax: Callable[[str], str] = torch_to_flax
    state_keys: frozenset | None = None

    tied: frozenset = frozenset()   # Flax module paths whose weight the model shares (tied embeddings)
    conv1d: frozenset = frozenset()  # Flax module paths whose torch weight is a Conv1D's (in, out) (GPT-2)
    # Flax module paths whose torch module has `is_transposed` (PEFT target_parameters: it then keeps
    # the expert stack's in/out order instead of swapping it)
    transposed_experts: frozenset = frozenset()

    @classmethod
    def from_table(cls, table: dict[str, str], state_keys, tied=frozenset(), conv1d=frozenset()) -> ModuleMap:
        """A map over a fixed set of modules, `{flax module path: torch module name}`; a name
        outside it is an error naming it."""
        inverse = {v: k for k, v in table.items()}

        def lookup(d, name, side):
            if name not in d:
                raise SpecError(f"{side} module {name!r} is not in this model (its {side} modules include "
                                f"{sorted(d)[:6]}...)")
            return d[name]

        return cls(lambda m: lookup(table, m, "Flax"), lambda m: lookup(inverse, m, "torch"),
                   frozenset(state_keys), frozenset(tied), frozenset(conv1d))

    def transposed(self, module_path: str, leaf: str) -> bool:
        """Whether a Flax leaf is the transpose of its torch parameter: a `kernel`, unless its
        module is a `Conv1D`."""
        return leaf == "kernel" and module_path not in self.conv1d

    def check(self, module: str, leaf: str, path: str) -> None:
        if self.state_keys is not None and f"{module}.{leaf}" not in self.state_keys:
            raise SpecError(f"{path}: exported as torch module {module!r}, but the HF model has no "
                            f"{module}.{leaf!s} (PEFT would load it with missing keys: no effect). Pass the "
                            "model's ModuleMap")


DEFAULT_MAP = ModuleMap()


def split_leaf(path: str) -> tuple[str, str]:
    """`(module path, leaf name)` of a parameter path whose leaf name is in `LEAVES`."""
    module, _, leaf = path.rpartition("/")
    if leaf not in LEAVES or not module:
        raise SpecError(f"{path}: HF files name parameters {sorted(LEAVES)} of a module; this path's leaf is "
                        f"{leaf!r}")
    return module, leaf
