"""GPU path check: one CIFAR-10 post-evaluation cell with channels-last and
bf16 autocast, and how many such cells share one GPU.

What it measures (all on the same GPU, in one run):
- student training images/s: ``rd3core.pipeline.posteval`` on a random-real
  IPC-50 CIFAR-10 set under the rd3 protocol (ResNet-18 student and teacher,
  CutMix, epoch-wise teacher labels), read from its own timing;
- teacher labelling images/s: the teacher's forward alone on augmented
  batches of the same size, under inference mode;
- peak GPU memory of that cell (torch.cuda.max_memory_allocated);
- cells per GPU: k cells at once as Ray tasks with num_gpus = 1/k (the
  fractional resources a study sets with `resources: {posteval: {gpus: 1/k}}`)
  for k = 1, 2, 4, 8, ...: aggregate images/s per k, and the largest k before
  aggregate throughput stops growing by 5% or a cell runs out of memory.

The teacher is trained here for a few epochs (its accuracy does not matter
for speed). ``--quick`` runs the same code on the CPU with digits and tiny
models, so the test suite keeps the script working where there is no GPU.
Last line: one JSON object with the figures.

    python bench/gpu_check.py --data ../shared/data/cifar10-jpeg.tar.gz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rd3core import augment as aug  # noqa: E402
from rd3core.data import as_float, load_dataset  # noqa: E402
from rd3core.loop import Runtime  # noqa: E402
from rd3core.pipeline import TeacherSpec, posteval, train_teacher  # noqa: E402
from rd3core.protocol import resolve_protocol  # noqa: E402
from rd3core.seeding import generator  # noqa: E402
from rd3core.synth import synthesize  # noqa: E402
from rd3core.synth.random_real import RandomRealParams  # noqa: E402


def setting(quick: bool, data: str | None) -> dict:
    if quick:
        return {"dataset": "digits", "root": None, "arch": "convnet3-w32", "ipc": 10, "epochs": 3,
                "teacher_epochs": 1, "batch": 50, "ks": [1, 2]}
    return {"dataset": "cifar10", "root": data, "arch": "resnet18", "ipc": 50, "epochs": 20,
            "teacher_epochs": 2, "batch": 50, "ks": [1, 2, 4, 8, 16]}


def one_cell(cfg: dict, teacher_state: dict, runtime: Runtime, seed: int = 0) -> dict:
    """Post-evaluate one cell; returns its throughput and memory."""
    data = load_dataset(cfg["dataset"], cfg["root"])
    protocol = resolve_protocol("rd3", data.info.family, {"student": cfg["arch"], "epochs": cfg["epochs"],
                                                          "batch_size": cfg["batch"]})
    teacher = build_teacher(cfg, data, teacher_state, runtime)
    distilled = synthesize("random_real", data, None, RandomRealParams(ipc=cfg["ipc"]), seed)
    if runtime.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = posteval(distilled, data, protocol, {cfg["arch"]: teacher}, seed, runtime)
    return {"images_per_s": result["timing"]["images_per_s"], "top1": result["metrics"]["top1"],
            "peak_memory_bytes": result["timing"]["peak_memory_bytes"]}


def build_teacher(cfg: dict, data, state: dict, runtime: Runtime) -> torch.nn.Module:
    from rd3core.pipeline import build_model

    model = build_model(cfg["arch"], data, 0)
    model.load_state_dict(state)
    model = model.to(runtime.device).eval()
    return model.to(memory_format=torch.channels_last) if runtime.channels_last else model


@torch.inference_mode()
def labelling_rate(cfg: dict, teacher: torch.nn.Module, data, runtime: Runtime, steps: int = 50) -> float:
    spec = resolve_protocol("rd3", data.info.family).augment
    x = as_float(data.train.images[: cfg["batch"]]).to(runtime.device)
    gen = generator(0, "gpu_check")
    batches = [data.info.normalize(aug.augment(x, spec, gen)[0]) for _ in range(4)]
    if runtime.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]

    def run(n: int) -> None:
        for i in range(n):
            with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
                teacher(batches[i % 4])

    run(5)  # warm-up (cuDNN autotuning, allocator)
    sync(runtime)
    t0 = time.perf_counter()
    run(steps)
    sync(runtime)
    return steps * cfg["batch"] / (time.perf_counter() - t0)


def sync(runtime: Runtime) -> None:
    if runtime.device.startswith("cuda"):
        torch.cuda.synchronize()


def concurrency(cfg: dict, teacher_state: dict, gpu: bool) -> tuple[dict[int, float], int]:
    """Aggregate images/s of k cells run at once as Ray tasks sharing one GPU."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(cfg["ks"]) + 1, num_gpus=1 if gpu else 0, include_dashboard=False,
             logging_level="ERROR")
    state_ref = ray.put(teacher_state)
    rates: dict[int, float] = {}
    fit = 0
    try:
        @ray.remote
        def cell(cfg, state, seed):
            torch.set_num_threads(1)
            return one_cell(cfg, state, Runtime.auto(), seed)

        for k in cfg["ks"]:
            task = cell.options(num_gpus=1 / k if gpu else 0, num_cpus=1)
            t0 = time.perf_counter()
            try:
                results = ray.get([task.remote(cfg, state_ref, seed) for seed in range(k)])
            except Exception as exc:  # out of memory (or any failure): k cells do not fit
                print(f"  k={k}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                break
            wall = time.perf_counter() - t0
            images = sum(r["images_per_s"] for r in results)  # per-cell rates while sharing
            rates[k] = images
            print(f"  k={k}: aggregate {images:,.0f} img/s over {wall:.1f}s wall, "
                  f"peak {max(r['peak_memory_bytes'] for r in results) / 2**30:.2f} GiB per cell")
            if fit and images < 1.05 * rates[fit]:
                break
            fit = k
    finally:
        ray.shutdown()
    return rates, fit


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("RD3_DATA_CIFAR10"),
                    help="CIFAR-10 (ImageFolder, tarball or torchvision folder); default $RD3_DATA_CIFAR10")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run on digits")
    args = ap.parse_args(argv)
    cfg = setting(args.quick, args.data)
    if not args.quick and not cfg["root"]:
        ap.error("--data (or RD3_DATA_CIFAR10) is required without --quick")
    gpu = torch.cuda.is_available() and not args.quick
    runtime = Runtime.auto() if gpu else Runtime()
    data = load_dataset(cfg["dataset"], cfg["root"])
    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}; dataset {cfg['dataset']}; "
          f"student/teacher {cfg['arch']}; IPC {cfg['ipc']}; {cfg['epochs']} epochs; batch {cfg['batch']}")
    t0 = time.perf_counter()
    teacher = train_teacher(data, TeacherSpec(arch=cfg["arch"], epochs=cfg["teacher_epochs"]), runtime)
    print(f"teacher: {cfg['teacher_epochs']} epochs in {time.perf_counter() - t0:.1f}s, "
          f"top1 {100 * teacher.metrics['top1']:.1f}%")
    state = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}
    cell = one_cell(cfg, state, runtime)
    label_rate = labelling_rate(cfg, build_teacher(cfg, data, state, runtime), data, runtime)
    print(f"one cell: student training {cell['images_per_s']:,.0f} img/s, teacher labelling "
          f"{label_rate:,.0f} img/s, peak memory {cell['peak_memory_bytes'] / 2**30:.2f} GiB, "
          f"top1 {100 * cell['top1']:.1f}%")
    rates, fit = concurrency(cfg, state, gpu)
    figures = {"device": torch.cuda.get_device_name() if gpu else "cpu", "channels_last": runtime.channels_last,
               "bf16": runtime.amp, "train_images_per_s": round(cell["images_per_s"], 1),
               "label_images_per_s": round(label_rate, 1),
               "peak_memory_gib": round(cell["peak_memory_bytes"] / 2**30, 3),
               "aggregate_images_per_s": {str(k): round(v, 1) for k, v in rates.items()}, "cells_per_gpu": fit}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
