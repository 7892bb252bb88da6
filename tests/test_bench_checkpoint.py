"""The checkpoint-overhead benchmark runs (--quick) and ends with its JSON figures."""
import json
import math
import subprocess
import sys


from conftest import ROOT


def test_checkpoint_bench_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "checkpoint_overhead.py"), "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"overhead_share", "save_seconds", "interval_s", "forced_interval_s", "forced_overhead_share",
            "due_check_s"} <= set(figures)
    assert figures["interval_s"] == 300.0 and figures["forced_saves"] >= 1 and figures["checkpoint_bytes"] > 0
    assert 0 < figures["save_seconds"] < 60 and 0 < figures["due_check_s"] < 1e-3
    assert math.isclose(figures["overhead_share"], figures["save_seconds"] / 300
                        + figures["epochs"] / figures["off_s"] * figures["due_check_s"])
    assert 0 < figures["forced_overhead_share"] < 1
    assert "medians: off" in proc.stdout
