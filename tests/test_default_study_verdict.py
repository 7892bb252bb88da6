"""The shipped default study, run as `make run` runs it, then analysed: every
interval the analysis prints contains its point estimate; the report shows the
budget group (empty here), the power line, the baselines beside the methods,
the recipe-matched random subsets of the native arm, and label storage among
the costs, under the names the driver writes."""
import json
import math

import pytest

from conftest import ROOT, run_cli
from db.queries import results_frame
from db.session import make_engine, sqlite_url
from orchestrator.analysis.curves import COSTS

ESTIMATES = ("diff", "value", "spread", "mean", "share")


def intervals(node, path="$"):
    """(where, estimate, [lo, hi]) for every interval in an analysis JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_ci") and key[:-3] in node:
                yield f"{path}.{key}", node[key[:-3]], value
            elif key == "ci" and isinstance(value, list):
                base = next((k for k in ESTIMATES if k in node), None)
                if base is not None:
                    yield f"{path}.ci", node[base], value
            elif key == "ci" and isinstance(value, dict) and isinstance(node.get("means"), dict):
                for m, ci in value.items():  # the means table: per method
                    yield f"{path}.ci.{m}", node["means"][m], ci
            yield from intervals(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from intervals(value, f"{path}[{i}]")


@pytest.mark.slow
def test_default_study_verdict(tmp_path):
    out = tmp_path / "results"
    run = run_cli("run", str(ROOT / "studies" / "protocol_ablation.yaml"), "--out", str(out), timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = run_cli("report", "protocol_ablation", "--out", str(out))
    assert report.returncode == 0, report.stderr
    folder = out / "protocol_ablation"
    result = json.loads((folder / "analysis.json").read_text())

    found = list(intervals(result))
    assert len(found) > 100
    for where, estimate, (lo, hi) in found:
        if estimate is None or lo is None:
            continue
        assert lo - 1e-12 <= estimate <= hi + 1e-12, (where, estimate, lo, hi)

    assert result["design"]["methods"] == ["rded", "sre2l"] and result["design"]["baselines"] == ["random_real"]
    assert result["comparisons"]["methods"] == ["rded", "sre2l"]  # baselines beside, not inside
    assert all("random_real" in s["baselines"] for s in result["comparisons"]["settings"])
    assert {s["best"] for s in result["comparisons"]["spread"]} <= {"rded", "sre2l"}
    # The native arm compares sre2l with random_real under sre2l's own recipe (its twin cells).
    native = [r for r in result["comparisons"]["versus_baselines"]["random_real"]["rows"]
              if r["setting"].startswith("protocol=native") and r["method"] == "sre2l"]
    assert len(native) == 4 and all(r["seeds"] == 3 for r in native)
    frame = results_frame(make_engine(sqlite_url(out / "rd3.sqlite")), "protocol_ablation")
    twins = frame[(frame["method"] == "random_real") & (frame["protocol"] == "native") & (frame["recipe"] == "sre2l")]
    assert len(twins) == 12
    twin_mean = twins[(twins["protocol.labels.mode"] == "hard") & (twins["protocol.epochs"] == 40)]["top1"].mean()
    row = next(r for r in native if r["setting"].endswith("protocol.labels.mode=hard, protocol.epochs=40"))
    assert row["baseline_mean"] == pytest.approx(twin_mean)

    assert result["shares"]["budget"] == 0.0 and "budget" in result["attribution"]["empty_groups"]
    md = (folder / "report.md").read_text()
    assert "budget factors (IPC, label storage) none vary" in md
    assert "budget (IPC, label storage) | none varies" in md
    assert result["power"]["seeds"] == 3 and math.isfinite(result["power"]["detectable"])
    assert "Power: with 3 seeds" in md and "The closest pair" in md
    assert "cannot go below p = 0.25" in md
    assert "Each method against random_real under the same recipe" in md
    assert "random_real (baseline)" in md
    # Costs under the names the driver records, the cost plot's axes among them.
    for name in ("labels_storage_bytes", "gpu_hours", "cpu_hours", "synth_wall_s", "time_train_s"):
        assert name in frame and name in COSTS, name
    assert (frame["labels_storage_bytes"] == 0).all() and (frame["gpu_hours"] == 0).all()
    assert (frame["cpu_hours"] > 0).all()
    assert (folder / "accuracy_vs_cost.png").is_file()
    costs = {c["method"]: c for c in result["costs"]}
    assert set(costs) == {"random_real", "rded", "sre2l"} and costs["random_real"]["role"] == "baseline"
    assert costs["sre2l"]["labels_storage_bytes"] == 0 and costs["sre2l"]["cpu_hours"] > 0
    assert "Costs per method" in md and "stored soft labels (bytes)" in md
