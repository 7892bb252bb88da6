"""bench/stage_sharing.py --quick: the study of 3 methods x 2 protocols x 2 seeds
trains its teacher once, runs each synthesis once per key, and a rerun against
the same store builds nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stage_sharing_quick():
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stage_sharing.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["cells"] == 12 and figures["rerun_cells"] == 12
    assert figures["teacher_runs"] == 1
    assert figures["synth_keys"] == 6 and figures["synth_runs"] == 6  # 3 methods x 2 seeds, shared by protocols
    assert figures["rerun_stage_runs"] == 0 and figures["rerun_same_top1"] is True
