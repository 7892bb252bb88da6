"""The whole flow for real: study YAML -> Ray (a real local instance) -> rd3core
-> SQLite -> summary and plot; then a rerun runs nothing and the in-process
executor reproduces the numbers exactly."""
import sqlite3

import pandas as pd

from conftest import run_cli


def results(db_path):
    with sqlite3.connect(db_path) as con:
        return pd.read_sql(
            "SELECT c.cell_key, c.seed, json_extract(c.factors, '$.\"protocol.labels.mode\"') AS mode, m.value AS top1 "
            "FROM cell c JOIN metric m ON m.cell_id = c.id WHERE m.name = 'top1' ORDER BY c.cell_key", con)


def test_tiny_study_through_ray_then_resume_then_local(tiny_study, tmp_path):
    study = tiny_study("e2e")
    out = tmp_path / "out"
    proc = run_cli("run", str(study), "--out", str(out), "--num-cpus", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    frame = results(out / "rd3.sqlite")
    assert len(frame) == 4 and frame.cell_key.is_unique  # one row per cell
    assert frame.top1.between(0, 1).all()
    # Soft labels from the teacher clearly beat chance (10 classes).
    assert (frame[frame["mode"] == "epochwise"].top1 > 0.5).all()
    assert (out / "e2e" / "main_effects.png").stat().st_size > 10_000
    assert "mean" in proc.stdout and "protocol.labels.mode" in proc.stdout
    assert (out / "artifacts" / "teacher").is_dir()

    again = run_cli("run", str(study), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "0 to run" in again.stdout
    pd.testing.assert_frame_equal(results(out / "rd3.sqlite"), frame)

    local_out = tmp_path / "local"
    local = run_cli("run", str(study), "--out", str(local_out), "--executor", "local")
    assert local.returncode == 0, local.stderr
    # Same code, seeds and thread count: identical numbers, to the last digit.
    pd.testing.assert_frame_equal(results(local_out / "rd3.sqlite"), frame)


def test_resume_runs_only_missing_cells(tiny_study, tmp_path):
    study = tiny_study("resume")
    out = tmp_path / "out"
    assert run_cli("run", str(study), "--out", str(out), "--executor", "local").returncode == 0
    with sqlite3.connect(out / "rd3.sqlite") as con:  # simulate a crash that lost two results
        con.execute("PRAGMA foreign_keys=ON")
        # Two cells that need the teacher, so the rerun must find it cached (which
        # cells sort first by key changes whenever the config schema does).
        doomed = [r[0] for r in con.execute("SELECT id FROM cell WHERE factors LIKE '%epochwise%' "
                                            "ORDER BY cell_key LIMIT 2")]
        con.execute(f"DELETE FROM metric WHERE cell_id IN ({doomed[0]}, {doomed[1]})")
        con.execute(f"UPDATE cell SET status = 'running' WHERE id IN ({doomed[0]}, {doomed[1]})")
    proc = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert proc.returncode == 0, proc.stderr
    assert "2 to run" in proc.stdout
    assert "teacher      0 to run,    1 cached" in proc.stdout
    assert len(results(out / "rd3.sqlite")) == 4
