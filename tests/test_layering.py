"""DESIGN.md's layering: rd3core imports none of orchestrator, db, ray; db
imports none of rd3core, orchestrator. Checked on the source (every import
statement) and at run time (what importing the package pulls in)."""
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
