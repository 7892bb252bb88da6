"""Checkpoint overhead: the share of a post-evaluation job's time that in-job
checkpoints cost at the default interval (``resources.checkpoint_every``, 300 s).

Work: the post-evaluation job of the rd3 preset on digits (ResNet-18 student,
AdamW, epoch-wise labels from a small BN ConvNet teacher, CutMix), 10 images per
class from random_real, ``--epochs`` epochs; the checkpoint is a real file in the
artifact store's checkpoint area (temporary file, fsync, rename), as in a job.

A job of a few seconds on a CPU never reaches 300 s, so the default interval's
share is computed from what is measured, and the forced interval measures a
save in place:

- ``off_s``, ``default_s``: the job with checkpoints off and at the default
  interval (never due here: only the per-epoch ``due()`` check runs), medians
  of interleaved runs (off, default, forced, off, ...: the CPU's speed drifts).
- ``due_check_s``: one ``due()`` call, timed over 10^6 calls.
- ``forced_interval_s``: the job with a short interval, so that it saves
  several times (default: an eighth of the first timed run with checkpoints
  off). ``save_seconds``: the mean time of one save inside those runs
  (serialise the state, write, fsync, rename), ``checkpoint_bytes`` its size;
  ``forced_overhead_share``: the time inside the saves over the forced job's
  time (measured in place, immune to drift); ``forced_ab_share``: (forced - off)
  / off of the medians, which also counts indirect costs but carries the drift.
- ``overhead_share`` = save_seconds / interval_s + epochs_per_second x due_check_s:
  the extra time per second of job at the default interval.

Target: overhead_share < 0.02.

    python bench/checkpoint_overhead.py            # ResNet-18 student, 3 rounds
    python bench/checkpoint_overhead.py --quick    # a small student, one round (the test suite)

The last line is one JSON object with the keys above and ``rounds``, ``epochs``, ``student``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.study.resources import DEFAULT_CHECKPOINT_EVERY as DEFAULT_INTERVAL_S  # noqa: E402
from rd3core.artifacts import ArtifactStore  # noqa: E402
from rd3core.checkpoint import Checkpoint  # noqa: E402
from rd3core.config import build, merge, to_dict  # noqa: E402
from rd3core.data import load_dataset  # noqa: E402
from rd3core.pipeline import TeacherSpec, posteval, train_teacher  # noqa: E402
from rd3core.protocol import Protocol, resolve_protocol  # noqa: E402
from rd3core.synth import METHODS, synthesize  # noqa: E402


def due_check_seconds(calls: int = 1_000_000) -> float:
    hook = Checkpoint(None, DEFAULT_INTERVAL_S)
    t0 = time.perf_counter()
    for _ in range(calls):
        hook.due()
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small student, one round (smoke test)")
    parser.add_argument("--epochs", type=int, help="post-evaluation epochs (default 30; 8 with --quick)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of off/default/forced (default 3; 1 quick)")
    parser.add_argument("--forced-interval", type=float, help="seconds (default: an eighth of the first timed run)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    epochs = args.epochs or (8 if args.quick else 30)
    rounds = args.rounds or (1 if args.quick else 3)
    student = "convnet3-w16" if args.quick else "resnet18"
    torch.set_num_threads(args.threads)

    data = load_dataset("digits")
    teacher = train_teacher(data, build(TeacherSpec, {"arch": "convnet3-w32-bn", "epochs": 2})).model.eval()
    distilled = synthesize("random_real", data, None, build(METHODS.get("random_real").params, {"ipc": 10}), seed=0)
    preset = to_dict(resolve_protocol("rd3", "digits"))
    protocol = build(Protocol, merge(preset, {"student": student, "epochs": epochs}))

    def job(hook):
        return posteval(distilled, data, protocol, {"convnet3-w32-bn": teacher}, seed=0, checkpoint=hook)

    print(f"post-evaluation: digits, {student}, {epochs} epochs, {len(distilled.labels)} images, "
          f"{args.threads} threads; {rounds} round(s)", flush=True)
    job(None)  # warm-up (allocator, caches), not counted
    forced = args.forced_interval
    modes = ["off", "default", "forced"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    saves = save_s = forced_total = 0.0
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        for r in range(rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:  # each mode takes each place in turn
                if mode == "forced" and forced is None:  # the first round runs "off" first
                    forced = round(times["off"][0] / 8, 3)
                    print(f"forced interval: {forced} s", flush=True)
                slot = store.checkpoint("posteval", f"bench-{mode}-{r}")
                hook = None if mode == "off" else Checkpoint(slot, DEFAULT_INTERVAL_S if mode == "default" else forced)
                t0 = time.perf_counter()
                job(hook)
                times[mode].append(time.perf_counter() - t0)
                if mode == "forced":
                    saves += hook.saves
                    save_s += hook.save_s
                    forced_total += times[mode][-1]
                    size = slot.path.stat().st_size if slot.path.exists() else size
                print(f"round {r + 1} {mode:8s} {times[mode][-1]:7.2f} s"
                      + (f"  ({hook.saves} saves, {hook.save_s:.2f} s saving)" if hook is not None else ""), flush=True)
                slot.remove()
    off, default, forced_s = (statistics.median(times[m]) for m in ("off", "default", "forced"))
    due_s = due_check_seconds()
    save_seconds = save_s / saves if saves else float("nan")
    overhead = save_seconds / DEFAULT_INTERVAL_S + (epochs / off) * due_s
    print(f"medians: off {off:.2f} s, default {default:.2f} s ({100 * (default / off - 1):+.1f}%, never due: drift), "
          f"forced every {forced} s {forced_s:.2f} s ({100 * save_s / forced_total:.1f}% of it saving); "
          f"one save {save_seconds:.3f} s ({size / 1e6:.1f} MB); one due() {1e9 * due_s:.0f} ns", flush=True)
    print(json.dumps({"overhead_share": overhead, "save_seconds": save_seconds, "interval_s": DEFAULT_INTERVAL_S,
                      "due_check_s": due_s, "checkpoint_bytes": size, "off_s": off, "default_s": default,
                      "forced_interval_s": forced, "forced_s": forced_s, "forced_overhead_share": save_s / forced_total,
                      "forced_ab_share": forced_s / off - 1,
                      "forced_saves": saves / rounds, "rounds": rounds, "epochs": epochs, "student": student}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
