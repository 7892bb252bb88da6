"""Orchestrator overhead: how much of a study's wall time is not spent inside
its jobs, and how long a 10,000-cell study takes to validate and expand.

1. ``overhead_share``: a 50-cell study of tiny jobs (digits, random_real with
   5 images per class, a width-16 ConvNet-3 student, hard labels, about 200
   epochs: 10 seeds x 5 epoch levels, i.e. 10 synth jobs + 50 post-evaluations)
   runs through the real driver and the Ray executor, exactly as a user runs it
   (``python -m orchestrator run STUDY --num-cpus 2``, in a fresh process). The
   driver writes ``OUT/<study>/last_run.json``: its wall time and, per job, the
   time spent inside the job on its worker (``run_node``'s own wall time: not
   the worker's start and imports, not Ray's dispatch, not the driver's DB
   writes). Then

       overhead_share = 1 - sum(time inside jobs) / (wall_s x slots)

   where ``slots`` is how many jobs can run at once (the Ray instance's CPUs /
   CPUs per job) and ``wall_s`` runs from the moment ``run`` starts (before
   Ray is started) to the last result committed; the summary tables and plots
   printed after it are reporting and not counted. Everything else counts
   against the orchestrator: reading the study and the DB setup, starting Ray
   and its workers (each imports torch), dispatch, moving results back,
   committing them, and slots left idle while the few synth jobs run or at the
   end. Much of it is a fixed cost, so the share falls as jobs grow: the
   breakdown printed (startup, first job, gaps between jobs on a worker, tail)
   says where the time went; ``--epochs`` changes the job size.
   ``ideal_share`` is the same share for a perfect scheduler: the measured job
   times list-scheduled on the same slots in dependency order, with no gaps.

2. ``expand_10k_s``: ``load_study`` (parse and validate) plus ``expand`` of a
   10,000-cell study (10 x 10 x 10 factor levels x 10 seeds), in-process,
   the median of three.

Targets: overhead_share < 0.10, expand_10k_s < 2. Timings on a shared machine
drift; the load average is printed with the figures.

    python bench/orchestrator_overhead.py            # 50 cells
    python bench/orchestrator_overhead.py --quick    # 10 cells, fewer epochs (the test suite)

The last line is one JSON object: {"overhead_share": ..., "expand_10k_s": ...,
...}.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDY = """\
name: overhead
dataset: {{name: digits}}
methods:
  - {{name: random_real, ipc: 5}}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, augment: {{flip: false}}, labels: {{mode: hard}}}}
factors:
  protocol.epochs: {epochs}
seeds: {seeds}
"""

BIG = """\
name: big
dataset: {name: digits}
methods:
  - {name: random_real, ipc: 5}
protocol:
  preset: rd3
  overrides: {student: convnet3-w16, augment: {flip: false}}
factors:
  protocol.batch_size: [8, 16, 24, 32, 40, 48, 56, 64, 72, 80]
  protocol.optim.lr: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01]
  protocol.epochs: [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""


def expand_seconds(folder: Path, repeats: int = 3) -> tuple[float, int]:
    from orchestrator.study.expand import expand
    from orchestrator.study.spec import load_study

    path = folder / "big.yaml"
    path.write_text(BIG)
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(expand(load_study(path)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def ideal_makespan(jobs: list[dict], slots: int) -> float:
    """The measured job times on ``slots`` with no gaps: every synth first
    (the post-evaluations need them), then the post-evaluations, each on the
    slot that frees first."""
    free = [0.0] * slots
    synth_done = 0.0
    for stage in ("synth", "posteval"):
        for job in sorted((j for j in jobs if j["stage"] == stage), key=lambda j: -j["wall_s"]):
            start = max(heapq.heappop(free), synth_done if stage == "posteval" else 0.0)
            heapq.heappush(free, start + job["wall_s"])
        if stage == "synth":
            synth_done = max(free)
    return max(free)


def breakdown(log: dict, slots: int) -> dict[str, float]:
    """Where the wall time went, from the driver's and the workers' clocks (one machine)."""
    jobs = log["jobs"]
    t0 = log["started"]
    first = min(j["start"] for j in jobs) - t0
    last_end = max(j["end"] for j in jobs) - t0
    gaps = []
    for pid in {j["pid"] for j in jobs}:
        mine = sorted((j for j in jobs if j["pid"] == pid), key=lambda j: j["start"])
        gaps += [b["start"] - a["end"] for a, b in zip(mine, mine[1:])]
    wrapper = [(j["end"] - j["start"]) - j["wall_s"] for j in jobs]  # worker-side time around run_node
    return {"startup_s": log["startup_s"], "executor_start_s": log["executor_start_s"], "first_job_start_s": first,
            "median_gap_between_jobs_s": statistics.median(gaps) if gaps else 0.0,
            "median_worker_wrapper_s": statistics.median(wrapper), "max_worker_wrapper_s": max(wrapper),
            "workers": len({j["pid"] for j in jobs}),
            "after_last_job_s": log["wall_s"] - last_end}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 cells of fewer epochs: a smoke run")
    parser.add_argument("--epochs", type=int, help="epochs of each post-evaluation (default 200; --quick 60)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray instance (default 2)")
    args = parser.parse_args()
    epochs = args.epochs or (60 if args.quick else 200)
    seeds = list(range(2 if args.quick else 10))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rd3-overhead-") as tmp:
        folder = Path(tmp)
        expand_s, n_big = expand_seconds(folder)
        print(f"validate + expand: {n_big} cells in {expand_s:.2f} s (median of 3)", flush=True)
        study = folder / "overhead.yaml"
        study.write_text(STUDY.format(epochs=[epochs + i for i in range(5)], seeds=seeds))
        out = folder / "out"
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(study), "--out", str(out),
                               "--num-cpus", str(args.num_cpus)], cwd=ROOT, env=env, capture_output=True, text=True)
        command_s = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"the study failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        log = json.loads((out / "overhead" / "last_run.json").read_text())
    slots = int(log["slots"]["CPU"])  # one CPU per job: the study asks for the default
    jobs = log["jobs"]
    inside = sum(j["wall_s"] for j in jobs)
    share = 1 - inside / (log["wall_s"] * slots)
    ideal = ideal_makespan(jobs, slots)
    ideal_share = 1 - inside / (ideal * slots)
    parts = breakdown(log, slots)
    cells = sum(j["stage"] == "posteval" for j in jobs)
    print(f"{cells} cells, {len(jobs)} jobs on {slots} slots (load average before: {load[0]:.2f})")
    print(f"run wall {log['wall_s']:.1f} s to the last result ({command_s:.1f} s with the summary and plots); "
          f"inside jobs {inside:.1f} s (median post-evaluation "
          f"{statistics.median(j['wall_s'] for j in jobs if j['stage'] == 'posteval'):.2f} s)")
    print(f"overhead share {share:.3f} (ideal schedule of the same jobs: {ideal_share:.3f}, makespan {ideal:.1f} s)")
    print("where the rest went: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in parts.items()))
    print(json.dumps({"overhead_share": round(share, 4), "expand_10k_s": round(expand_s, 3),
                      "ideal_share": round(ideal_share, 4), "wall_s": round(log["wall_s"], 2),
                      "inside_jobs_s": round(inside, 2), "slots": slots, "cells": cells, "epochs": epochs,
                      "expand_cells": n_big, "load_avg": round(load[0], 2),
                      **{k: round(v, 3) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
