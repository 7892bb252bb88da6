"""Expected run time of a study on this machine, before running it: the study's
stage graph (every distinct teacher, distilled set, stored labels and
post-evaluation, as ``run`` would plan them) turned into images pushed through
each network, times the seconds per image measured here for that network,
batch size and input size (a few real training steps or forward passes with the
job's thread count, NHWC as the jobs run).

It needs no data (dataset sizes are the public releases' split sizes) and writes
nothing. What it leaves out: data loading and augmentation (small next to the
networks on the device-resident sets; ImageNet-scale JPEG decoding is not),
Ray's start and per-epoch host work. The seconds per image are those of the
machine's state while it measures: on these CPUs, whose speed drifts 3-4x, the
estimate is good to that factor. The per-stage table says where the time goes.

    python bench/study_cost.py studies/rd3_cifar10.yaml            # about 1-3 min of measuring
    python bench/study_cost.py studies/protocol_ablation.yaml --quick

The last line is one JSON object: {"study", "cells", "job_hours", "wall_hours",
"slots", "per_stage_hours", "device"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.study.expand import expand, trial_cell, tuned_cells  # noqa: E402
from orchestrator.study.tuning import first_values  # noqa: E402
from orchestrator.execution.plan import STAGES, assign_resources, build_plan  # noqa: E402
from orchestrator.study.spec import load_study, search_domains  # noqa: E402
from rd3core.artifacts import ArtifactStore  # noqa: E402
from rd3core.data import dataset_info  # noqa: E402
from rd3core.loop import Runtime  # noqa: E402
from rd3core.models import create_model  # noqa: E402
from rd3core.config import build  # noqa: E402
from rd3core.protocol import Protocol, batch_size_for  # noqa: E402

# (train, test) images of each public release (digits: the project's fixed 80/20 split).
SPLIT_SIZES = {"digits": (1437, 360), "cifar10": (50000, 10000), "cifar100": (50000, 10000),
               "tinyimagenet": (100000, 10000), "imagenet1k": (1281167, 50000),
               "imagenette": (9469, 3925), "imagewoof": (9025, 3929)}
# Measure at most this batch (64 images at 32 px, fewer at larger sizes): seconds per
# image barely change beyond it, and a 224-px step on a CPU takes long enough.
MAX_PIXELS = 64 * 32 * 32


class Timer:
    """Seconds per image of one network (train step or forward), measured once per
    (arch, train, batch, threads) and reused."""

    def __init__(self, info, runtime: Runtime, reps: int):
        self.info, self.runtime, self.reps = info, runtime, reps
        self.cache: dict[tuple, float] = {}

    def per_image(self, arch: str, train: bool, batch: int, threads: int) -> float:
        batch = max(1, min(batch, MAX_PIXELS // (self.info.size * self.info.size) or 4))
        key = (arch, train, batch, threads)
        if key not in self.cache:
            torch.set_num_threads(threads)
            info = self.info
            model = self.runtime.place(create_model(arch, info.num_classes, info.channels, info.size))
            device = self.runtime.device
            x = torch.randn(batch, info.channels, info.size, info.size, device=device)
            x = x.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else x
            y = torch.randint(0, info.num_classes, (batch,), device=device)
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            model.train(train)

            def once():
                if train:
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                else:
                    with torch.inference_mode():
                        model(x)
            once()  # first call allocates
            t0 = time.perf_counter()
            for _ in range(self.reps):
                once()
            self.cache[key] = (time.perf_counter() - t0) / (self.reps * batch)
        return self.cache[key]


def node_work(node, info, sizes) -> list[tuple[str, bool, int, int]]:
    """(arch, train?, batch, images) pushed through networks by one job."""
    n_train, n_test = sizes
    p = node.payload
    if node.stage == "teacher":
        t = p["teacher"]
        if "source" in p:  # weights made elsewhere: loaded, then one test evaluation
            return [(t["arch"], False, 500, n_test)]
        return [(t["arch"], True, t["batch_size"], t["epochs"] * n_train), (t["arch"], False, 500, n_test)]
    teacher = (p.get("teacher") or {}).get("payload", {}).get("teacher", {}).get("arch")
    if node.stage == "synth":
        m = p["method"]
        ipc, name = m.get("ipc", 10), m["name"]
        if name in ("sre2l", "cda"):  # optimise ipc*C images through the teacher (forward + backward)
            n = ipc * info.num_classes
            return [(teacher, True, min(m.get("batch_size", 100), n), m.get("iterations", 1000) * n)]
        if name == "rded":  # score every crop of the candidates
            per_class = m.get("candidates_per_class", 300) * m.get("crops_per_image", 5)
            return [(teacher, False, 256, per_class * info.num_classes)]
        if name == "herding":  # teacher features of the candidates
            cands = m.get("candidates_per_class")
            return [(teacher, False, 256, cands * info.num_classes if cands else n_train)]
        return []  # random_real, full_real, external: indexing only
    protocol = build(Protocol, p["protocol"])
    ipc = p.get("ipc") or 10
    n = ipc * info.num_classes
    batch = batch_size_for(protocol, ipc, info.num_classes, info.family)
    teachers = [t["payload"]["teacher"]["arch"] for t in p["teachers"].values()]
    names = list(protocol.labels.teachers) or teachers[:1]
    if node.stage == "labels":
        return [(a, False, batch, protocol.epochs * n) for a in names]
    work = [(protocol.student, True, batch, protocol.epochs * n)]
    mode = protocol.labels.mode
    if mode == "epochwise":
        work += [(a, False, batch, protocol.epochs * n // max(1, protocol.labels.refresh_every)) for a in names]
    elif mode == "static":
        work += [(a, False, batch, n) for a in names]
    evals = 1 + (protocol.epochs // protocol.eval.interval if protocol.eval.interval else 0)
    return work + [(protocol.student, False, protocol.eval.batch_size, evals * n_test)]


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def search_cells(study) -> list:
    """A tuned design's trials (every one trained to the end: the upper bound of
    its budget) and its chosen recipes' cells, each at the first value of every
    searched domain (the cost of one trial hardly depends on the values)."""
    tuning = study.spec.design.tuning
    values = first_values(search_domains(study.spec))
    if tuning.budget.kind != "trials":  # its hours are the budget's: the estimate counts no trial
        return tuned_cells(study, {m.label: (values, "estimate") for m in study.methods})
    trials = [trial_cell(study, m.label, i, values) for m in study.methods for i in range(int(tuning.budget.amount))]
    return trials + tuned_cells(study, {m.label: (values, "estimate") for m in study.methods})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per network (default 3)")
    ap.add_argument("--quick", action="store_true", help="one timed step per network (a smoke run)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPUs of the machine to estimate for (default: this one's)")
    args = ap.parse_args(argv)
    for name in SPLIT_SIZES:  # the estimate needs no data: any existing path satisfies validation
        os.environ.setdefault(f"RD3_DATA_{name.upper()}", tempfile.gettempdir())
    study = load_study(args.study)
    if study.spec.dataset.name not in SPLIT_SIZES:
        sys.exit(f"error: {args.study}: dataset {study.spec.dataset.name!r}: its split sizes are not known here "
                 f"(known: {', '.join(SPLIT_SIZES)})")
    cells = expand(study)
    searched = search_cells(study) if study.spec.design.kind == "tuned" else []
    cells += searched
    with tempfile.TemporaryDirectory() as tmp:
        plan = assign_resources(build_plan(cells, ArtifactStore(Path(tmp))), study.spec.resources)
    info = dataset_info(study.spec.dataset.name)
    runtime = Runtime.auto()
    gpu = runtime.device.startswith("cuda")
    timer = Timer(info, runtime, 1 if args.quick else args.reps)
    per_stage: dict[str, float] = defaultdict(float)
    jobs: dict[str, int] = defaultdict(int)
    wall_by_stage: dict[str, float] = defaultdict(float)
    for node in plan.nodes.values():
        threads = min(node.resources.threads, args.cpus)
        seconds = sum(timer.per_image(arch, train, batch, threads) * images
                      for arch, train, batch, images in node_work(node, info, SPLIT_SIZES[info.name]))
        per_stage[node.stage] += seconds
        jobs[node.stage] += 1
        # Jobs of a stage share the machine: as many at once as their CPUs allow.
        slots = 1 if gpu else max(1, args.cpus // max(1, int(node.resources.cpus)))
        wall_by_stage[node.stage] += seconds / slots
    total = sum(per_stage.values())
    wall = sum(wall_by_stage.values())
    device = torch.cuda.get_device_name() if gpu else f"cpu x{args.cpus}"
    print(f"{study.name}: {len(cells)} cells on {device} (seconds per image measured here; NHWC; "
          f"dataset splits {SPLIT_SIZES[info.name]})")
    for stage in sorted(per_stage, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)):
        print(f"  {stage:9s} {jobs[stage]:4d} job(s)  {human(per_stage[stage]):>8s} of job time  "
              f"~{human(wall_by_stage[stage])} wall")
    if searched:
        print(f"  ({len(searched)} of the cells are the tuned design's search and chosen recipes, counted as if "
              "no trial were stopped early: an upper bound)")
    print(f"  total: {human(total)} of job time, ~{human(wall)} wall on this machine (network compute only: "
          f"data loading, augmentation, Ray's start and host work are not counted)")
    def hours(seconds: float) -> float:  # 4 significant digits: a stage of seconds is not 0.0 hours
        return float(f"{seconds / 3600:.4g}")

    figures = {"study": study.name, "cells": len(cells), "job_hours": hours(total), "wall_hours": hours(wall),
               "slots": args.cpus, "per_stage_hours": {k: hours(v) for k, v in per_stage.items()}, "device": device}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
