"""The study-cost estimator and the GPU check run as they are (--quick, on the CPU)
and end with their JSON figures."""
import json
import subprocess
import sys

from conftest import ROOT


def run_bench(*args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-W", "ignore", *args], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_study_cost_estimates_every_stage_of_the_default_study():
    figures, out = run_bench(str(ROOT / "bench" / "study_cost.py"), "studies/protocol_ablation.yaml", "--quick")
    assert figures["study"] == "protocol_ablation" and figures["cells"] == 84
    assert set(figures["per_stage_hours"]) == {"teacher", "synth", "posteval"}
    # Post-evaluation dominates this study (84 students vs one teacher and nine small syntheses).
    stages = figures["per_stage_hours"]
    assert stages["posteval"] > stages["teacher"] > 0 and stages["posteval"] > stages["synth"]
    assert 0 < figures["wall_hours"] <= figures["job_hours"] and figures["device"].startswith("cpu")
    assert "84 job(s)" in out


def test_gpu_check_runs_on_the_cpu():
    figures, _ = run_bench(str(ROOT / "bench" / "gpu_check.py"), "--quick")
    assert figures["device"] == "cpu" and figures["channels_last"] and not figures["bf16"]
    assert figures["train_images_per_s"] > 0 and figures["label_images_per_s"] > 0
    assert figures["cells_per_gpu"] >= 1 and all(v > 0 for v in figures["aggregate_images_per_s"].values())


def test_inference_calibration_quick_reports_its_figures():
    figures, out = run_bench(str(ROOT / "bench" / "inference_calibration.py"), "--quick")
    for key in ("fpr_paired_3", "fpr_paired_5", "fpr_paired_10", "coverage_shares", "power_1pt_10"):
        assert 0.0 <= figures[key] <= 1.0, key
    # Even a smoke run's few replicates separate a calibrated verdict from a broken one.
    assert max(figures[f"fpr_paired_{n}"] for n in (3, 5, 10)) <= 0.06
    assert figures["coverage_shares"] >= 0.9 and figures["power_1pt_10"] >= 0.5
    assert "called significant after Holm" in out
