"""`jpeft.Spec`: ordered `{regex: method}` rules over `/`-joined leaf paths (DESIGN.md §1)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jpeft.errors import SpecError
from jpeft.methods.base import Method
from jpeft.paths import closest_paths
from jpeft.registry import method_from_dict

FORMAT_VERSION = 1


class Spec:
    """Which leaves get which method.

    Each rule's regex is `re.fullmatch`ed against a leaf's path; the first matching rule wins and
    `exclude` wins over every rule. A rule that matches no leaf is an error, and so is a rule
    whose every leaf is taken by an earlier rule with a different method (its intent is
    ambiguous: it would never apply).
    """

    def __init__(self, rules: Mapping[str, Method] | Sequence[tuple[str, Method]], exclude: str | None = None):
        pairs = list(rules.items()) if isinstance(rules, Mapping) else [tuple(p) for p in rules]
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

    # ---------------------------------------------------------------- value semantics
    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Spec) and (self.rules, self.exclude) == (other.rules, other.exclude)

    def __hash__(self) -> int:
        return hash((self.rules, self.exclude))

    def __repr__(self) -> str:
        rules = ", ".join(f"{p!r}: {m!r}" for p, m in self.rules)
        return f"Spec({{{rules}}}, exclude={self.exclude!r})"

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION,
                "rules": [{"pattern": p, **m.to_dict(), "version": m.version} for p, m in self.rules],
                "exclude": self.exclude}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> "Spec":
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
        return cls(pairs, exclude=d.get("exclude"))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
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
