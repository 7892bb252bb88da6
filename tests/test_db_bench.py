"""bench/db_scale.py runs (quick) and ends with its figures as one JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_db_scale_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "db_scale.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures) >= {"inserts_per_s", "results_frame_s", "cells"} and figures["cells"] == 2000
    assert figures["inserts_per_s"] > 0 and 0 < figures["results_frame_s"] < 60
    assert "sqlite: 2000 cells" in proc.stdout
