"""bench/orchestrator_overhead.py --quick runs end to end: a real study through
the driver and Ray, its timing log, and the JSON line with the issue's keys."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_bench_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "orchestrator_overhead.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["cells"] == 10 and figures["expand_cells"] == 10_000 and figures["slots"] == 2
    assert 0 <= figures["overhead_share"] < 1 and figures["ideal_share"] <= figures["overhead_share"] + 0.05
    assert 0 < figures["inside_jobs_s"] < figures["wall_s"] * figures["slots"]
    assert 0 < figures["expand_10k_s"] < 30
    assert figures["workers"] <= figures["slots"]  # no extra worker started behind the scheduler's back
