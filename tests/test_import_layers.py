"""slicelm's import graph (read with ast, nothing is imported): layers only import downward, the plain
packages stay free of torch, and no two modules import each other (directly or around a cycle)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "slicelm"
BASE = "<base>"  # config.py, sampling_params.py, pooling_params.py
FACADE = "<facade>"  # slicelm/__init__.py: names the public API lazily, imports nothing at import time

# package -> slicelm packages it must never import (entrypoints → engine → models → layers → distributed; the
# loader only produces configs, weights and tokenizers; slicing is plain Python; stack and router never touch
# the engine).
FORBIDDEN: dict[str, set[str]] = {
    "entrypoints": set(),
    "engine": {"entrypoints", "stack", "router"},
    "models": {"entrypoints", "engine", "stack", "router", "slicing"},
    "layers": {"entrypoints", "engine", "models", "loader", "stack", "router", "slicing"},
    "distributed": {"entrypoints", "engine", "models", "layers", "loader", "stack", "router", "slicing"},
    "loader": {"entrypoints", "engine", "models", "layers", "stack", "router", "slicing"},
    "slicing": {"entrypoints", "engine", "models", "layers", "loader", "stack", "router"},
    "stack": {"engine", "models", "layers"},
    "router": {"engine", "models", "layers"},
    BASE: {"entrypoints", "engine", "models", "layers", "distributed", "loader", "stack", "router", "slicing"},
    FACADE: set(),
}
NO_TORCH = {"slicing", "stack", "router"}  # no torch import anywhere in them, nor through what they import

ALLOWED_CYCLES: list[set[str]] = []  # none: keep it that way


@dataclass(frozen=True)
class Import:
    target: str  # dotted name as written (resolved for relative imports)
    line: int
    module_level: bool  # runs at import time (not inside a function or an `if TYPE_CHECKING:` block)
    type_only: bool = False  # inside `if TYPE_CHECKING:`: never runs, so it cannot close a cycle


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str) -> list[Import]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_only: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            level = module_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            typing_block = type_only
            if isinstance(child, ast.If) and _is_type_checking(child):
                level, typing_block = False, True
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, module_level, type_only) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.append(Import(base, child.lineno, module_level, type_only))
                found.extend(Import(f"{base}.{a.name}", child.lineno, module_level, type_only) for a in child.names
                             if f"{base}.{a.name}" in MODULES)
            visit(child, level, typing_block)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _package(name: str) -> str:
    if name == "slicelm":
        return FACADE
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / parts[1]).is_dir() else BASE


def _internal(target: str) -> str | None:
    """The deepest slicelm module a dotted import name refers to."""
    while target and target.startswith("slicelm"):
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def test_every_package_has_a_rule():
    unknown = {_package(m) for m in MODULES} - set(FORBIDDEN)
    assert not unknown, f"new slicelm packages {sorted(unknown)}: add their import rule to FORBIDDEN"


def test_no_upward_imports():
    bad = []
    for name, imports in IMPORTS.items():
        pkg = _package(name)
        for imp in imports:
            target = _internal(imp.target)
            if target and _package(target) in FORBIDDEN[pkg]:
                bad.append(f"{MODULES[name].relative_to(ROOT.parent)}:{imp.line} ({pkg}) imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_facade_imports_lazily():
    eager = [f"slicelm/__init__.py:{i.line} imports {i.target}" for i in IMPORTS["slicelm"]
             if i.module_level and (_internal(i.target) not in (None, "slicelm") or _imports_torch(i))]
    assert not eager, "importing any slicelm package runs slicelm/__init__.py; keep it free of imports:\n" + \
        "\n".join(eager)


def _imports_torch(imp: Import) -> bool:
    return imp.target == "torch" or imp.target.startswith("torch.")


def _module_level_closure(name: str) -> set[str]:
    """Every slicelm module that runs when ``name`` is imported (parent packages included)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for m in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if m in MODULES and m not in seen:
                seen.add(m)
                todo.extend(t for imp in IMPORTS[m] if imp.module_level and (t := _internal(imp.target)))
    return seen


@pytest.mark.parametrize("pkg", sorted(NO_TORCH))
def test_plain_packages_never_import_torch(pkg):
    bad = []
    for name in (m for m in MODULES if _package(m) == pkg):
        bad += [f"{name}:{imp.line} imports {imp.target}" for imp in IMPORTS[name] if _imports_torch(imp)]
        for dep in _module_level_closure(name):
            bad += [f"{name} → {dep}:{imp.line} imports torch at import time" for imp in IMPORTS[dep]
                    if imp.module_level and _imports_torch(imp)]
    assert not bad, "\n".join(sorted(set(bad)))


def _cycles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import that can run."""
    graph = {m: {t for imp in IMPORTS[m] if not imp.type_only and (t := _internal(imp.target)) and t != m}
             for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            strongconnect(v)
    return out


def test_no_import_cycles():
    cycles = [c for c in _cycles() if c not in ALLOWED_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(sorted(c)) for c in cycles)


def test_the_checker_sees_real_edges():
    """Guards the test itself: known edges are found, so an empty result means something."""
    assert _internal("slicelm.slicing.spec") in {_internal(i.target) for i in IMPORTS["slicelm.engine.memory"]}
    assert "slicelm.loader.errors" in {_internal(i.target) for i in IMPORTS["slicelm.loader.gguf_loader"]}
    assert any(_imports_torch(i) and i.module_level for i in IMPORTS["slicelm.engine.memory"])
    assert "slicelm.slicing.hami_env" in _module_level_closure("slicelm.slicing.spec")
