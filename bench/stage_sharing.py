"""Stage sharing through the real orchestrator: a study of 3 methods x 2
protocols x 2 seeds on digits must train its teacher once, run each synthesis
once per distinct key, and a second run against the same artifact store (fresh
results DB, so every cell is post-evaluated again) must take every stage from
the cache.

Runs are counted from what actually executed: the driver's ``stages built``
line, summed from the jobs' own reports of what they computed; distinct synth
keys are counted in the store. Last line: one JSON object.

    python bench/stage_sharing.py [--quick] [--executor ray|local] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUDY = """\
name: stage_sharing
description: 3 methods x 2 protocols x 2 seeds; every stage must be shared.
dataset: {{name: digits}}
teachers:
  - arch: convnet3-w16-bn
    epochs: {teacher_epochs}
    augment: {{crop: pad, padding: 2, flip: false, mix: none}}
methods:
  - {{name: random_real, ipc: 2}}
  - {{name: rded, ipc: 2, candidates_per_class: 30}}
  - {{name: sre2l, ipc: 2, iterations: {iterations}, init: real}}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, epochs: {epochs}, augment: {{flip: false}}}}
factors:
  protocol.labels.mode: [hard, epochwise]
seeds: [0, 1]
resources: {{cpus: 1}}
"""


def run_cli(*args: str) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"orchestrator {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout, wall


def stages_built(stdout: str) -> dict[str, int]:
    found = re.search(r"^stages built: (.*)$", stdout, re.M)
    if found is None:
        sys.exit(f"no 'stages built' line in the driver's output:\n{stdout}")
    return json.loads(found.group(1))


def results(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT c.cell_key, m.value FROM cell c JOIN metric m ON m.cell_id = c.id "
                                "WHERE m.name = 'top1' AND c.status = 'done'"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    parser.add_argument("--executor", choices=["ray", "local"], help="default: ray (local with --quick)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    executor = args.executor or ("local" if args.quick else "ray")
    sizes = dict(teacher_epochs=2, iterations=5, epochs=2) if args.quick else \
        dict(teacher_epochs=10, iterations=100, epochs=30)
    work = args.keep or Path(tempfile.mkdtemp(prefix="rd3-stage-sharing-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        study = work / "stage_sharing.yaml"
        study.write_text(STUDY.format(**sizes))
        out = work / "out"
        common = ["--out", str(out), "--executor", executor] + (["--num-cpus", "2"] if executor == "ray" else [])
        first, first_s = run_cli("run", str(study), *common)
        built_first = stages_built(first)
        synth_keys = sum(1 for p in (out / "artifacts" / "synth").iterdir() if not p.name.startswith("."))
        # Same store, fresh DB: every cell runs again, every stage must come from the cache.
        second, second_s = run_cli("run", str(study), *common, "--db", f"sqlite:///{out / 'rerun.sqlite'}")
        built_second = stages_built(second)
        first_top1, second_top1 = results(out / "rd3.sqlite"), results(out / "rerun.sqlite")
        figures = {
            "cells": len(first_top1),
            "teacher_runs": built_first.get("teacher", 0),
            "synth_runs": built_first.get("synth", 0),
            "synth_keys": synth_keys,
            "rerun_stage_runs": sum(built_second.values()),
            "rerun_cells": len(second_top1),
            "rerun_same_top1": first_top1 == second_top1,
            "first_run_s": round(first_s, 1),
            "rerun_s": round(second_s, 1),
            "executor": executor,
        }
        print(f"first run ({first_s:.1f}s): stages built {built_first}; "
              f"rerun with a fresh DB ({second_s:.1f}s): stages built {built_second}")
        print(json.dumps(figures))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
