"""The import rules of `jpeft/` and `pallas_kernels/`, checked statically (run by scripts/lint.sh):

1. no import cycle between their modules, counting imports inside functions too (a function-level
   import hides a cycle from Python, not from this check);
2. no private name (`_x`, not a dunder) of one module used in another, either imported
   (`from jpeft.a import _x`) or reached as an attribute of an imported module (`a._x`);
3. third-party imports are the library's own dependencies (`LIBRARY`), plus the `[models]` extra's
   inside `jpeft/models/` (`MODELS`); pyproject.toml lists exactly these.

    python scripts/check_imports.py [root]      # exit 1 and one line per finding
"""

from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Iterator

PACKAGES = ("jpeft", "pallas_kernels")
LIBRARY = {"jax", "flax", "optax", "orbax", "safetensors", "numpy"}
MODELS = {"gguf", "tokenizers"}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """`{dotted module name: file}` of every module of `PACKAGES` under `root`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: pathlib.Path, known: set[str]) -> Iterator[tuple[str, str | None, int]]:
    """`(imported module, imported name or None, line)` for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from pkg import submodule`
                    yield sub, None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _bound_modules(tree: ast.AST, known: set[str]) -> dict[str, str]:
    """Local names bound to one of our modules by `import a.b as n` / `from a import b`."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _owner(module: str, known: set[str]) -> str:
    """The module of ours that `module` names (itself, or its closest known parent)."""
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module


def check(root: pathlib.Path) -> list[str]:
    """Every finding as `path:line: message`; empty when the rules hold."""
    found = modules(root)
    known = set(found)
    findings, graph = [], {m: set() for m in found}
    for module, path in found.items():
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(path))
        for target, name, line in imports(module, path, known):
            top = target.split(".")[0]
            if top in PACKAGES:
                owner = _owner(target, known)
                if not owner:
                    findings.append(f"{rel}:{line}: imports {target}, which is not a module here")
                    continue
                if owner != module:
                    graph[module].add(owner)
                    if name and _private(name):
                        findings.append(f"{rel}:{line}: imports the private name {name} of {owner}")
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                allowed = LIBRARY | (MODELS if module.startswith("jpeft.models") else set())
                if top not in allowed:
                    findings.append(f"{rel}:{line}: imports {top}, which is not a dependency of "
                                    f"{'jpeft[models]' if module.startswith('jpeft.models') else 'jpeft'}")
        bound = _bound_modules(tree, known)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != module and _private(node.attr)):
                findings.append(f"{rel}:{node.lineno}: uses the private name {node.attr} of {bound[node.value.id]}")
    findings += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return findings


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graphs here are small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(_closed_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), for the message."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


if __name__ == "__main__":
    problems = check(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent))
    print("\n".join(problems) or "imports ok")
    sys.exit(1 if problems else 0)
