"""`jpeft.Spec`: ordered `{regex: method}` rules over `/`-joined leaf paths (docs/design.md §1)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax.numpy as jnp
import numpy as np

from jpeft.errors import SpecError
from jpeft.methods.base import Method
from jpeft.paths import closest_paths
from jpeft.registry import method_from_dict
from jpeft.views import View

FORMAT_VERSION = 1


class Spec:
    """Which leaves get which method.

    Each rule's regex is `re.fullmatch`ed against a leaf's path; the first matching rule wins and
    `exclude` wins over every rule. A rule that matches no leaf is an error, and so is a rule
    whose every leaf is taken by an earlier rule with a different method (its intent is
    ambiguous: it would never apply).

    `views` (same form, `{regex: jpeft.View}`; first match wins) says how N-D kernels are seen as
    matrices (`jpeft.views`); a targeted leaf that is not 2-D needs one. A view rule that matches
    no leaf of the tree is an error, like a dead rule.

    `adapter_dtype` (e.g. `"float32"`) stores every adapter's floating-point arrays in that dtype
    (fp32 adapters on a bf16 base); the base keeps its own dtype and the factored path computes in
    the layer's dtype. None (the default) keeps each adapter in its base's dtype.
    """

    def __init__(self, rules: Mapping[str, Method] | Sequence[tuple[str, Method]], exclude: str | None = None,
                 views: Mapping[str, View] | Sequence[tuple[str, View]] | None = None,
                 adapter_dtype: str | None = None):
        pairs = list(rules.items()) if isinstance(rules, Mapping) else cast(list[tuple[str, Method]],
                                                                             [tuple(p) for p in rules])
        if not pairs:
            raise SpecError("a Spec needs at least one rule")
        for pattern, method in pairs:
            _compile(pattern, f"rule {pattern!r}")
            if not isinstance(method, Method):
                raise SpecError(f"rule {pattern!r}: expected a method config such as jpeft.LoRA(rank=8), "
                                f"got {type(method).__name__}")
        self.rules: tuple[tuple[str, Method], ...] = tuple(pairs)
        self.exclude = exclude
        self._compiled = [(_compile(p, f"rule {p!r}"), m) for p, m in pairs]
        self._exclude = _compile(exclude, "exclude") if exclude is not None else None
        view_pairs: list[tuple[str, View]] = [] if views is None else (
            list(views.items()) if isinstance(views, Mapping) else cast(list[tuple[str, View]],
                                                                        [tuple(p) for p in views]))
        for pattern, view in view_pairs:
            _compile(pattern, f"view rule {pattern!r}")
            if not isinstance(view, View):
                raise SpecError(f"view rule {pattern!r}: expected a jpeft.View, got {type(view).__name__}")
        self.views: tuple[tuple[str, View], ...] = tuple(view_pairs)
        if adapter_dtype is not None:
            try:
                dt = np.dtype(jnp.dtype(adapter_dtype))
            except TypeError as e:
                raise SpecError(f"adapter_dtype={adapter_dtype!r} is not a dtype: {e}") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise SpecError(f"adapter_dtype={adapter_dtype!r}: expected a floating-point dtype such as 'float32'")
            adapter_dtype = dt.name
        self.adapter_dtype: str | None = adapter_dtype
        self._compiled_views = [(_compile(p, f"view rule {p!r}"), v) for p, v in view_pairs]

    # ---------------------------------------------------------------- matching
    def matching_rules(self, path: str) -> list[int]:
        """Indices of the rules that match `path` (none if it is excluded)."""
        if self._exclude is not None and self._exclude.fullmatch(path):
            return []
        return [i for i, (rx, _) in enumerate(self._compiled) if rx.fullmatch(path)]

    def resolve(self, paths: Sequence[str]) -> dict[str, Method]:
        """`{path: method}` for the targeted paths; raises `SpecError` for dead or shadowed rules."""
        owner: dict[str, int] = {}
        hits: dict[int, list[str]] = {i: [] for i in range(len(self.rules))}
        for path in paths:
            matches = self.matching_rules(path)
            for i in matches:
                hits[i].append(path)
            if matches:
                owner[path] = matches[0]
        for i, (pattern, method) in enumerate(self.rules):
            if not hits[i]:
                near = ", ".join(closest_paths(pattern, list(paths))) or "(the tree has no leaves)"
                raise SpecError(f"rule {pattern!r} matches no leaf (after exclude={self.exclude!r}); "
                                f"closest paths: {near}")
            if i in {owner[p] for p in hits[i]}:
                continue
            clash = next((p for p in hits[i] if self.rules[owner[p]][1] != method), None)
            if clash is not None:
                raise SpecError(
                    f"rule {pattern!r} ({method.name}) is ambiguous: every leaf it matches is taken by an "
                    f"earlier rule, e.g. {clash!r} by {self.rules[owner[clash]][0]!r} "
                    f"({self.rules[owner[clash]][1].name}); reorder the rules or narrow one")
        return {path: self.rules[i][1] for path, i in owner.items()}

    def view_for(self, path: str) -> View | None:
        """The first view rule matching `path`, or None."""
        return next((v for rx, v in self._compiled_views if rx.fullmatch(path)), None)

    def resolve_views(self, paths: Sequence[str]) -> dict[str, View]:
        """`{path: View}` for the paths a view rule matches; a view rule matching nothing is an error."""
        out = {}
        used = set()
        for path in paths:
            for i, (rx, v) in enumerate(self._compiled_views):
                if rx.fullmatch(path):
                    out[path] = v
                    used.add(i)
                    break
        for i, (pattern, _) in enumerate(self.views):
            if i not in used and not any(self._compiled_views[i][0].fullmatch(p) for p in paths):
                near = ", ".join(closest_paths(pattern, list(paths))) or "(the tree has no leaves)"
                raise SpecError(f"view rule {pattern!r} matches no leaf; closest paths: {near}")
        return out

    # ---------------------------------------------------------------- value semantics
    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Spec) and (self.rules, self.exclude, self.views, self.adapter_dtype) == (
            other.rules, other.exclude, other.views, other.adapter_dtype)

    def __hash__(self) -> int:
        return hash((self.rules, self.exclude, self.views, self.adapter_dtype))

    def __repr__(self) -> str:
        rules = ", ".join(f"{p!r}: {m!r}" for p, m in self.rules)
        views = ", ".join(f"{p!r}: {v!r}" for p, v in self.views)
        dtype = f", adapter_dtype={self.adapter_dtype!r}" if self.adapter_dtype else ""
        return f"Spec({{{rules}}}, exclude={self.exclude!r}" + (f", views={{{views}}}" if views else "") + dtype + ")"

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION,
                "rules": [{"pattern": p, **m.to_dict(), "version": m.version} for p, m in self.rules],
                "exclude": self.exclude,
                **({"views": [{"pattern": p, **v.to_dict()} for p, v in self.views]} if self.views else {}),
                **({"adapter_dtype": self.adapter_dtype} if self.adapter_dtype else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> Spec:
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise SpecError("spec JSON must be an object with a 'rules' list")
        if d.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise SpecError(f"spec format {d.get('format')!r} is not supported (expected {FORMAT_VERSION})")
        pairs = []
        for k, rule in enumerate(d["rules"]):
            if not isinstance(rule, dict) or "pattern" not in rule or "method" not in rule:
                raise SpecError(f"spec JSON rule #{k} must be an object with 'pattern' and 'method'; got {rule!r}")
            cfg = {key: val for key, val in rule.items() if key not in ("pattern", "version")}
            try:
                method = method_from_dict(cfg)
            except (KeyError, TypeError, ValueError) as e:
                raise SpecError(f"spec JSON rule #{k} ({rule['pattern']!r}): {e}") from e
            if rule.get("version", method.version) != method.version:
                raise SpecError(f"spec JSON rule #{k} ({rule['pattern']!r}): {method.name} version "
                                f"{rule['version']} was saved; this jpeft implements version {method.version}")
            pairs.append((rule["pattern"], method))
        views = []
        for k, rule in enumerate(d.get("views", [])):
            try:
                views.append((rule["pattern"], View.from_dict(rule)))
            except (KeyError, TypeError, ValueError) as e:
                raise SpecError(f"spec JSON view #{k} ({rule!r}): {e}") from e
        return cls(pairs, exclude=d.get("exclude"), views=views or None, adapter_dtype=d.get("adapter_dtype"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"malformed spec JSON: {e}") from e
        return cls.from_dict(data)


def _compile(pattern: Any, what: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise SpecError(f"{what}: expected a regex string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SpecError(f"{what}: invalid regex: {e}") from e
