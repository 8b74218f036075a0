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

# package -> slicelm packages it must never import: exactly the README's "Where things are" statement.
# entrypoints → engine → models → layers → distributed, each importing only to its right (and the plain base
# modules); nothing imports entrypoints (its CLI reaches stack's and router's CLIs by module name at run time);
# the loader only produces configs, weights and tokenizers (for the engine and the entrypoints); slicing is plain
# Python that the engine and stack consume; stack (plan, up, supervisor) uses slicing and the loader, router reads
# stack's state; neither touches the engine, the models or torch.
ALL = {"entrypoints", "engine", "models", "layers", "distributed", "loader", "slicing", "stack", "router"}
MAY_IMPORT: dict[str, set[str]] = {
    "entrypoints": {"engine", "models", "layers", "distributed", "loader", "slicing"},
    "engine": {"models", "layers", "distributed", "loader", "slicing"},
    "models": {"layers", "distributed"},
    "layers": {"distributed"},
    "distributed": set(),
    "loader": set(),
    "slicing": set(),
    "stack": {"loader", "slicing"},
    "router": {"stack", "slicing"},
}
FORBIDDEN: dict[str, set[str]] = {pkg: ALL - allowed - {pkg} for pkg, allowed in MAY_IMPORT.items()}
FORBIDDEN[BASE] = set(ALL)  # config.py, sampling_params.py, pooling_params.py: importable from anywhere
FORBIDDEN[FACADE] = set()
NO_BASE = {"slicing", "stack", "router"}  # the base modules import torch (config.py): these never import them
NO_TORCH = {"slicing", "stack", "router"}  # no torch import anywhere in them, nor through what they import

ALLOWED_CYCLES: list[set[str]] = []  # none: keep it that way
# A module may name its owner's type under ``if TYPE_CHECKING:`` (a callback typed by the object it serves); such
# an import never runs. These are the only ones; any other cycle, type-only or not, fails.
TYPE_ONLY_CYCLES: list[set[str]] = [
    {"slicelm.loader.hub", "slicelm.loader.modelscope_hub"},
    {"slicelm.engine.core", "slicelm.engine.sleep_mode", "slicelm.engine.warmup"},
    {"slicelm.engine.request", "slicelm.engine.structured_output", "slicelm.engine.structured_output.manager"},
    {"slicelm.router.app", "slicelm.router.dashboard.routes", "slicelm.router.dashboard.sampler"},
    {"slicelm.layers.linear", "slicelm.layers.quantization", "slicelm.layers.quantization.awq",
     "slicelm.layers.quantization.base", "slicelm.layers.quantization.compressed_tensors",
     "slicelm.layers.quantization.fp8", "slicelm.layers.quantization.gptq", "slicelm.layers.quantization.int_weights",
     "slicelm.layers.quantization.unquantized"},
]


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


def _cycles(type_only: bool = False) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import that can run (and the
    ``TYPE_CHECKING`` ones too with ``type_only``)."""
    graph = {m: {t for imp in IMPORTS[m] if (type_only or not imp.type_only) and (t := _internal(imp.target))
                 and t != m} for m in MODULES}
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


def test_no_new_type_only_cycles():
    """Around ``TYPE_CHECKING`` too: only the owner-typed callbacks listed (stack/spec ↔ serve_args is gone)."""
    cycles = [c for c in _cycles(type_only=True) if c not in TYPE_ONLY_CYCLES]
    assert not cycles, "import cycles through TYPE_CHECKING imports: " + "; ".join(
        " ↔ ".join(sorted(c)) for c in cycles)


@pytest.mark.parametrize("pkg", sorted(NO_BASE))
def test_plain_packages_never_import_the_base_modules(pkg):
    bad = [f"{name}:{imp.line} imports {imp.target}" for name in MODULES if _package(name) == pkg
           for imp in IMPORTS[name] if (t := _internal(imp.target)) and _package(t) == BASE]
    assert not bad, "\n".join(bad)


def readme_rules() -> list[str]:
    """The rules as the README lists them, one line per package: ``pkg → what it may import`` (``base``: config.py,
    sampling_params.py, pooling_params.py)."""
    order = ["entrypoints", "engine", "models", "layers", "distributed", "loader", "slicing", "stack", "router"]
    lines = []
    for pkg in order:
        allowed = [p for p in order if p in MAY_IMPORT[pkg]] + ([] if pkg in NO_BASE else ["base"])
        lines.append(f"{pkg} → {', '.join(allowed) or 'nothing'}")
    return lines


def test_the_rules_are_the_readme_statement():
    """The README lists exactly the rules this test enforces; both change together."""
    readme = (ROOT.parent / "README.md").read_text()
    block = readme[readme.index("Layers import one way"):]
    missing = [line for line in readme_rules() if line not in block]
    assert not missing, "README's layering does not list these rules (copy them there):\n" + "\n".join(missing)



def test_the_checker_sees_real_edges():
    """Guards the test itself: known edges are found, so an empty result means something."""
    assert _internal("slicelm.slicing.spec") in {_internal(i.target) for i in IMPORTS["slicelm.engine.memory"]}
    assert "slicelm.loader.errors" in {_internal(i.target) for i in IMPORTS["slicelm.loader.gguf_loader"]}
    assert any(_imports_torch(i) and i.module_level for i in IMPORTS["slicelm.engine.memory"])
    assert "slicelm.slicing.hami_env" in _module_level_closure("slicelm.slicing.spec")
