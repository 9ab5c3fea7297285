"""Adapter methods, one module per family (each module's docstring names its family). Every module in this package is
imported here, which registers its methods: adding a method is one file (plus its conformance
row in tests/)."""

import importlib
import pkgutil

from jpeft.methods.base import Method
from jpeft.methods.dora import DoRA
from jpeft.methods.full import Full
from jpeft.methods.lowrank import FFALoRA, LoRA, LoRAGA, PeriodicLoRA, PiSSA

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "LoRA", "PiSSA", "LoRAGA", "FFALoRA", "PeriodicLoRA", "DoRA", "Full"]
