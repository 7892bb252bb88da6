"""DESIGN.md's layering: rd3core imports none of orchestrator, db, ray; db
imports none of rd3core, orchestrator. Checked on the source (every import
statement) and at run time (what importing the package pulls in). No module
imports, even inside a function, one that imports it back (no circles). Inside
orchestrator the rooms follow the flow: study <- analysis <- execution <- the CLI
on top (a room imports only rooms left of it)."""
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
    bad.write_text("import os\nfrom orchestrator.study.spec import load_study\n")
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


# orchestrator's rooms in import order: each may import the rooms before it, never one after.
ROOMS = ("study", "analysis", "execution")
TOP = {"orchestrator", "orchestrator.__main__", "orchestrator.cli", "orchestrator.query"}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def room_violations(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """module -> the orchestrator modules it imports against the rooms' order (the
    CLI counts as the last room; a module outside every room and the CLI is one too)."""
    order = {room: i for i, room in enumerate(ROOMS)}
    rank = lambda m: order[room_of(m)] if room_of(m) else len(ROOMS)  # noqa: E731
    bad = {}
    for module, imports in graph.items():
        if not module.startswith("orchestrator"):
            continue
        if room_of(module) is None and module not in TOP:
            bad[module] = ["(in no room)"]
            continue
        upward = sorted(m for m in imports if m.startswith("orchestrator.") and rank(m) > rank(module))
        if upward:
            bad[module] = upward
    return bad


def test_orchestrator_rooms_follow_the_flow():
    assert room_violations(import_graph()) == {}


def test_room_checker_sees_an_upward_import_and_a_stray_module(tmp_path):
    pkg = tmp_path / "orchestrator"
    for room in ROOMS:
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from .execution import driver\n")
    (pkg / "study" / "spec.py").write_text("def f():\n    from ..analysis import tables\n")
    (pkg / "analysis" / "tables.py").write_text("from ..study import spec\n")
    (pkg / "execution" / "driver.py").write_text("from ..analysis import tables\nfrom ..cli import main\n")
    (pkg / "stray.py").write_text("")
    bad = room_violations(import_graph(tmp_path, ("orchestrator",)))
    assert bad == {"orchestrator.study.spec": ["orchestrator.analysis.tables"],
                   "orchestrator.execution.driver": ["orchestrator.cli"],
                   "orchestrator.stray": ["(in no room)"]}


def readme_picture() -> list[str]:
    """The first path of each line of README.md's code picture (the block that
    starts with rd3core/)."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in text.split("```")[1::2] if b.lstrip("\n").startswith("rd3core/"))
    return [line.split()[0] for line in block.strip().splitlines()]


def test_readme_picture_matches_the_folders():
    shown = readme_picture()
    assert all((ROOT / p).exists() for p in shown), [p for p in shown if not (ROOT / p).exists()]
    rooms = {f"orchestrator/{room}/" for room in ROOMS}
    assert rooms | {"rd3core/", "db/"} <= set(shown)
