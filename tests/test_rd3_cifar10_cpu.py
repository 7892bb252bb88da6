"""The short version of studies/rd3_cifar10_cpu.yaml, on the real CIFAR-10 tarball:
the shipped study with a subset of the images, one seed and a few steps of everything,
through run, a rerun that does nothing, and the report."""
import re
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cifar_subset
from orchestrator.cli import main

SHORT_METHODS = {"sre2l": {"iterations": 3}, "cda": {"iterations": 3}, "rded": {"candidates_per_class": 12}}


def short_version(tmp_path: Path, data: Path) -> Path:
    spec = yaml.safe_load((ROOT / "studies" / "rd3_cifar10_cpu.yaml").read_text())
    spec["dataset"]["root"] = str(data)
    spec["teachers"][0]["epochs"] = 1
    for method in spec["methods"]:
        method.update(SHORT_METHODS.get(method["name"], {}))
    spec["protocol"]["common_overrides"]["epochs"] = 2
    spec["seeds"] = [0]
    path = tmp_path / "rd3_cifar10_cpu.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_the_cifar10_cpu_study_runs_end_to_end_on_real_cifar(cifar_tarball, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RD3_CACHE", str(tmp_path / "cache"))
    study = short_version(tmp_path, cifar_subset(cifar_tarball, tmp_path / "cifar", train=30, test=20))
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    assert "12 cells, 0 already done, 12 to run" in first
    assert len(re.findall(r"^\[\d+/12\] done ", first, re.M)) == 12

    with sqlite3.connect(out / "rd3.sqlite") as con:
        rows = con.execute("SELECT m.value FROM cell c JOIN metric m ON m.cell_id = c.id WHERE m.name = 'top1'").fetchall()
        recipes = {tuple(r) for r in con.execute(
            "SELECT a.value_str, b.value_str FROM cell_factor a JOIN cell_factor b ON a.cell_id = b.cell_id "
            "WHERE a.name = 'method' AND b.name = 'recipe'")}
    assert len(rows) == 12 and all(0.0 <= v <= 1.0 for (v,) in rows)
    # Each method under its native recipe and under rd3; random_real also under every other native recipe.
    for method in ("herding", "sre2l", "cda", "rded"):
        assert {(method, "rd3")} <= recipes and any(m == method and r != "rd3" for m, r in recipes)
    assert {("random_real", "sre2l"), ("random_real", "cda"), ("random_real", "rded")} <= recipes

    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 0
    assert "12 cells, 12 already done, 0 to run" in capsys.readouterr().out
    assert main(["report", "rd3_cifar10_cpu", "--out", str(out)]) == 0
    report = (out / "rd3_cifar10_cpu" / "report.md").read_text()
    assert "Against random_real under the same recipe" in report
