"""The post-evaluation benchmark runs (--quick) and ends with its JSON figures."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_posteval_bench_quick_prints_its_figures(cifar_tarball):
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "bench" / "posteval_vs_reference.py"), "--quick",
                           "--threads", "1", "--data", str(cifar_tarball)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(figures) == {"speedup_vs_reference", "overhead_vs_bare", "acc_ours", "acc_reference", "seeds"}
    assert figures["seeds"] == 1
    assert figures["speedup_vs_reference"] > 0 and figures["overhead_vs_bare"] > 0
    assert 0 <= figures["acc_ours"] <= 1 and 0 <= figures["acc_reference"] <= 1
    assert "per-epoch time ratio" in proc.stdout
