"""DESIGN.md's layering: rd3core imports none of orchestrator, db, ray; db
imports none of rd3core, orchestrator. Checked on the source (every import
statement) and at run time (what importing the package pulls in). No module
imports, even inside a function, one that imports it back (no circles)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"rd3core": {"orchestrator", "db", "ray"}, "db": {"rd3core", "orchestrator", "ray"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports_in_source(package):
    offenders = {}
    for file in (ROOT / package).rglob("*.py"):
        bad = imported_roots(file) & FORBIDDEN[package]
        if bad:
            offenders[str(file.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package} imports upward: {offenders}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_does_not_load_forbidden_modules(package):
    code = (f"import sys, {package}, importlib, pkgutil\n"
            f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
            f"    if 'migrations' not in m.name: importlib.import_module(m.name)\n"
            f"print(' '.join(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(FORBIDDEN[package])!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom orchestrator.spec import load_study\n")
    assert "orchestrator" in imported_roots(bad)


PACKAGES = ("rd3core", "orchestrator", "db")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the first-party modules it imports anywhere in its source (a
    function-level import counts: it is a circle that only hides until called)."""
    files = {module_name(f, root): f for p in packages for f in (root / p).rglob("*.py")
             if "migrations" not in f.parts}
    graph = {}
    for name, file in files.items():
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = (node.module or "") if node.level == 0 else ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_circle_checker_sees_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import other\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.sub.b"]]
