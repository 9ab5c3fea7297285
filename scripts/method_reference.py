"""Write `docs/methods.md`, the method reference, from the registry: every registry name with its
family module, paper, HF PEFT equivalent, options with their defaults, and the method's own
description (its class docstring: formula, init, defaults).

    python scripts/method_reference.py            # rewrite docs/methods.md
    python scripts/method_reference.py --check    # exit 1 if docs/methods.md is stale (lint.sh)
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import sys
import typing

import jpeft
from jpeft import registry
from jpeft.interop.hf import peft_type_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "methods.md"


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _type(t) -> str:
    return (t.__name__ if isinstance(t, type) else str(t)).replace("|", "\\|")


def _doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def reference() -> str:
    names = jpeft.methods()
    rows, sections = [], []
    for name in names:
        cls, fixed, paper = registry.resolve(name)
        peft = peft_type_of(cls)
        family = cls.__module__.removeprefix("jpeft.methods.")
        rows.append(f"| [`{name}`](#{name}) | `{family}` | {paper} | {peft or '—'} |")
        options = [f for f in dataclasses.fields(cls) if f.name not in fixed]
        body = [f"## {name}", "",
                f"`jpeft.method({name!r}, ...)` builds `{cls.__module__}.{cls.__name__}`"
                + (f" with {', '.join(f'{k}={v!r}' for k, v in fixed.items())} fixed" if fixed else "") + ".",
                f"Paper: {paper}. HF PEFT: {f'`{peft}`' if peft else 'none'}.", ""]
        if options:
            body += ["| option | type | default |", "|---|---|---|"]
            hints = typing.get_type_hints(cls)
            body += [f"| `{f.name}` | `{_type(hints[f.name])}` | {_default(f)} |" for f in options]
            body.append("")
        body += [_doc(cls), ""]
        sections.append("\n".join(body))
    head = ["# Method reference", "",
            "Generated from the registry by `python scripts/method_reference.py` (do not edit by hand;",
            "`scripts/lint.sh` fails when this page is stale). Kernel layout `K ∈ R^{in×out}`, `y = x @ K`;",
            "papers write the transpose. The HF PEFT column names the PEFT type `jpeft.interop.hf`",
            "reads and writes for that method with its default options (`docs/interop.md`).", "",
            "| name | family module | paper | HF PEFT |", "|---|---|---|---|", *rows, ""]
    return "\n".join(head) + "\n" + "\n".join(sections)


if __name__ == "__main__":
    text = reference()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/method_reference.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
