"""The static import rules (scripts/check_imports.py, run by scripts/lint.sh) catch what they
promise on planted trees, and the library's declared dependencies are the ones the rules allow."""

import importlib.util
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def plant(tmp_path, files: dict[str, str]) -> list[str]:
    for name, text in {"jpeft/__init__.py": "", "pallas_kernels/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return check_imports.check(tmp_path)


def test_the_repository_follows_the_rules():
    assert check_imports.check(ROOT) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    got = plant(tmp_path, {
        "jpeft/a.py": "from jpeft.b import g\n",
        "jpeft/b.py": "def g():\n    from jpeft import a\n    return a\n",
        "jpeft/c.py": "from jpeft.a import *\n",
    })
    assert got == ["import cycle: jpeft.a -> jpeft.b -> jpeft.a"]


def test_relative_and_package_imports_resolve_to_the_module(tmp_path):
    got = plant(tmp_path, {
        "jpeft/m/__init__.py": "from .x import f\n",
        "jpeft/m/x.py": "from jpeft.m import y\n",
        "jpeft/m/y.py": "from ..m import x\n",
    })
    assert got == ["import cycle: jpeft.m.x -> jpeft.m.y -> jpeft.m.x"]


def test_private_names_across_modules_are_found_imported_or_as_attributes(tmp_path):
    got = plant(tmp_path, {
        "jpeft/a.py": "_hidden = 1\n__version__ = '1'\n",
        "jpeft/b.py": "from jpeft.a import _hidden, __version__\n",
        "jpeft/c.py": "from jpeft import a\nimport jpeft.a as aa\nx = a._hidden + aa._hidden + len(a.__name__)\n",
        "jpeft/d.py": "import numpy as np\ny = np._private\n",  # not ours: not our rule
    })
    assert got == ["jpeft/b.py:1: imports the private name _hidden of jpeft.a",
                   "jpeft/c.py:3: uses the private name _hidden of jpeft.a",
                   "jpeft/c.py:3: uses the private name _hidden of jpeft.a"]


def test_third_party_imports_are_declared_dependencies(tmp_path):
    got = plant(tmp_path, {
        "jpeft/a.py": "import os, numpy\nimport tensorflow_datasets\n",
        "jpeft/models/__init__.py": "",
        "jpeft/models/m.py": "import gguf\nfrom tokenizers import Tokenizer\nimport torch\n",
        "pallas_kernels/k.py": "def f():\n    import matplotlib\n",
    })
    assert got == ["jpeft/a.py:2: imports tensorflow_datasets, which is not a dependency of jpeft",
                   "jpeft/models/m.py:3: imports torch, which is not a dependency of jpeft[models]",
                   "pallas_kernels/k.py:2: imports matplotlib, which is not a dependency of jpeft"]


def test_pyproject_declares_exactly_the_allowed_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()  # noqa: E731
    import_name = {"orbax-checkpoint": "orbax"}
    assert {import_name.get(name(r), name(r)) for r in project["dependencies"]} == check_imports.LIBRARY
    assert {name(r) for r in project["optional-dependencies"]["models"]} == check_imports.MODELS
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert packages["include"] == ["jpeft*", "pallas_kernels*"]


def test_nothing_points_outside_the_repository():
    """Docs, docstrings and comments cite the repo's own `docs/`, never a spec file beside it."""
    outside = re.compile("(" + r"\.\./shared" + "|" + r"\b(METHODS[A-Z_0-9]*|DESIGN|OFFLINE)" + r"\.md\b)")
    suffixes = {".py", ".md", ".toml", ".sh", ".txt", ".cfg"}
    files = [p for p in ROOT.rglob("*") if p.suffix in suffixes and p.is_file()
             and not {".venv", ".git", "out", "runs", ".mypy_cache", ".ruff_cache"} & set(p.relative_to(ROOT).parts)]
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in files
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert found == []
