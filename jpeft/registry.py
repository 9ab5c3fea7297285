"""Method registry: `jpeft.method(name, **cfg)` and `jpeft.methods()`.

A registry name is either a method class (`lora`, `dora`, ...) or an alias that fixes some of a
class's options (`pissa` is `lora` with `init="pissa"`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from jpeft.errors import OptionError, UnknownMethodError

if TYPE_CHECKING:
    from jpeft.methods.base import Method

_M = TypeVar("_M", bound="type[Method]")

_CLASSES: dict[str, type[Method]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}
_ALIAS_PAPERS: dict[str, str] = {}


def register(cls: _M) -> _M:
    """Class decorator: make a method config reachable by its `name`."""
    if cls.name in _CLASSES or cls.name in _ALIASES:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    if not vars(cls).get("paper"):
        raise ValueError(f"method {cls.name!r}: set the class attribute `paper` (the paper it implements)")
    _CLASSES[cls.name] = cls
    return cls


def register_alias(name: str, target: str, *, paper: str, **fixed: Any) -> None:
    """Register `name` as `target` with `fixed` options that callers may not override; `paper`
    cites the method the alias names (as `Method.paper` does for a class)."""
    if name in _CLASSES or name in _ALIASES:
        raise ValueError(f"method name {name!r} is registered twice")
    if not paper:
        raise ValueError(f"method alias {name!r}: give the paper it implements")
    _ALIASES[name] = (target, fixed)
    _ALIAS_PAPERS[name] = paper


def methods() -> list[str]:
    """All registry names, sorted."""
    return sorted([*_CLASSES, *_ALIASES])


def resolve(name: str) -> tuple[type[Method], dict[str, Any], str]:
    """`(method class, options the name fixes, paper)` of a registry name."""
    cls = _class_of(name)
    if name in _ALIASES:
        return cls, dict(_ALIASES[name][1]), _ALIAS_PAPERS[name]
    return cls, {}, cls.paper


def _class_of(name: str) -> type[Method]:
    target = _ALIASES[name][0] if name in _ALIASES else name
    if target not in _CLASSES:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(methods())}")
    return _CLASSES[target]


def options(name: str) -> set[str]:
    """The option names a registry name accepts (without building a config, which may need some)."""
    fixed = _ALIASES[name][1] if name in _ALIASES else {}
    return {f.name for f in dataclasses.fields(_class_of(name))} - set(fixed)


def method(name: str, **cfg: Any):
    """Build a method config by registry name, e.g. `method("lora", rank=8)`."""
    if name in _ALIASES:
        target, fixed = _ALIASES[name]
        clash = {k: v for k, v in cfg.items() if k in fixed and v != fixed[k]}
        if clash:
            raise OptionError(f"method {name!r} fixes {fixed}; cannot set {clash}")
        return method(target, **{**cfg, **fixed})
    cls = _class_of(name)
    fields = options(name)  # `name` is a class here: all of its fields
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise OptionError(f"method {name!r} has no option(s) {unknown}; options are {sorted(fields)}")
    return cls(**cfg)


def method_with_defaults(name: str, defaults: dict[str, Any], **cfg: Any):
    """`method(name, **cfg)` with run-level `defaults` (e.g. a launcher's `rank`, `alpha`,
    `total_step`) for the options this method has; `cfg` wins over `defaults`."""
    accepted = options(name)
    return method(name, **{**{k: v for k, v in defaults.items() if k in accepted}, **cfg})


def method_from_dict(d: dict[str, Any]):
    """Inverse of `Method.to_dict`."""
    cfg = dict(d)
    name = cfg.pop("method")
    return method(name, **cfg)
