"""Post-evaluation speed and agreement: our kernel vs the field's way, side by side.

Work: CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz), 10 random real training
images per class, ConvNet-3 student (the field's: width 128, instance norm),
ConvNet-3 teacher, batch 50, RDED's CIFAR-10 recipe (ShufflePatches(1) +
RandomResizedCrop(scale 1/f..1 = 1..1) + flip + CutMix(beta 1), KL at T=20 on
epoch-wise labels, AdamW 1e-3 without decay on biases/norms, smoothed cosine
per epoch), a fixed number of epochs, final-epoch top-1 on the full test set.

(a) ours: ``rd3core.pipeline.posteval`` (tensors on the device, batched
    augmentation, teacher on the exact student batch).
(b) reference, written the way RDED's validation/main.py does it: a torch
    DataLoader over in-memory PIL images with per-sample torchvision transforms
    and 4 workers that start anew every epoch (no persistent workers; batches
    shared through files, as RDED sets it), CutMix on
    the batch with numpy's random state, teacher forward every step, a LambdaLR
    cosine stepped per epoch, and, as RDED does for its train accuracy, a
    student forward on the clean batch each step with the loss and accuracy
    read to the host every step (``.item()``). With the instance-norm ConvNet
    that forward changes no state, so both loops train identically.

Both runs share the distilled set, the student's initial weights and the
teacher for each seed, and they are interleaved epoch by epoch (the reference's
epoch runs in our loop's on_epoch callback), so CPU speed drift hits both alike.
Per epoch we also time a bare step (student forward + KL + backward + AdamW
step, plus a bare teacher forward, on a fixed normalised batch) as many times as
our epoch has steps: overhead_vs_bare = our epoch time / that bare time.

The teacher is trained once by this script on the real CIFAR-10 training split
through our kernel (hard labels, ``--teacher-epochs`` epochs) and cached under
RD3_CACHE (default ~/.cache/rd3bench) as bench-teacher-<hash>.pt, keyed by its
spec and the dataset fingerprint; reruns load it. ``--quick`` uses a small
teacher, student and test subset for a smoke run (the test suite calls it).

Prints per-seed and per-epoch timings, accuracies, and as its last line one
JSON object: {"speedup_vs_reference", "overhead_vs_bare", "acc_ours",
"acc_reference", "seeds"} (accuracies as fractions, means over seeds).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rd3core.config import stable_hash, to_dict  # noqa: E402
from rd3core.data import Dataset, cache_dir, load_dataset  # noqa: E402
from rd3core.loop import Runtime  # noqa: E402
from rd3core.pipeline import TeacherSpec, build_model, posteval, train_teacher  # noqa: E402
from rd3core.protocol import OptimSpec, resolve_protocol  # noqa: E402
from rd3core.synth import synthesize  # noqa: E402
from rd3core.synth.random_real import RandomRealParams  # noqa: E402

CANDIDATES = [ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
              ROOT.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"]


def find_cifar(given: str | None) -> Path:
    for path in ([Path(given)] if given else []) + ([Path(os.environ["RD3_DATA_CIFAR10"])]
                                                     if os.environ.get("RD3_DATA_CIFAR10") else []) + CANDIDATES:
        if path.exists():
            return path
    raise SystemExit("error: CIFAR-10 not found: pass --data PATH (../shared/data/cifar10-jpeg.tar.gz)")


def cached_teacher(data: Dataset, spec: TeacherSpec) -> tuple[torch.nn.Module, dict]:
    path = cache_dir() / f"bench-teacher-{stable_hash({'spec': to_dict(spec), 'data': data.fingerprint})}.pt"
    model = build_model(spec.arch, data, spec.seed)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["metrics"]
    print(f"training the teacher once ({spec.arch}, {spec.epochs} epochs on {len(data.train)} images); "
          f"cached at {path}", flush=True)
    result = train_teacher(data, spec)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": result.model.state_dict(), "metrics": result.metrics}, tmp)
    os.replace(tmp, path)
    return result.model.eval(), result.metrics


# --------------------------------------------------------------------------------------
# (b) the reference loop, RDED style
# --------------------------------------------------------------------------------------

class ShufflePatchesPerSample(torch.nn.Module):
    """RDED's per-image ShufflePatches on a CHW tensor (factor 1: one strip)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def _strips(self, img):
        w = img.shape[-1] // self.factor
        parts = [img[..., i * w:(i + 1) * w] for i in range(self.factor)]
        random.shuffle(parts)
        return torch.cat(parts, -1)

    def forward(self, img):
        return self._strips(self._strips(img).transpose(1, 2)).transpose(1, 2)


class InMemory(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        from PIL import Image
        self.samples = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.samples[i]), self.labels[i]


def rand_bbox(h, w, lam):
    cut = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    cx, cy = np.random.randint(w), np.random.randint(h)
    return (np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h),
            np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w))


def _file_system_sharing(worker_id: int) -> None:
    torch.multiprocessing.set_sharing_strategy("file_system")


class Reference:
    def __init__(self, distilled, data, protocol, teacher, student, seed, workers):
        import torchvision.transforms as T
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        aug, info = protocol.augment, data.info
        transform = T.Compose([T.ToTensor(), ShufflePatchesPerSample(aug.shuffle_patches),
                               T.RandomResizedCrop(info.size, scale=tuple(aug.scale), antialias=True),
                               T.RandomHorizontalFlip(), T.Normalize(info.mean, info.std)])
        # RDED passes batches from workers through files (sharing strategy
        # "file_system", also set in every worker).
        torch.multiprocessing.set_sharing_strategy("file_system")
        self.loader = torch.utils.data.DataLoader(InMemory(distilled.images, distilled.labels, transform),
                                                  batch_size=50, shuffle=True, num_workers=workers,
                                                  worker_init_fn=_file_system_sharing)
        # Its own copy of the teacher: our kernel re-lays the shared one out in
        # NHWC, while the field's code runs the default NCHW layout.
        self.teacher, self.student = copy.deepcopy(teacher).eval(), student.train()
        decay = [p for p in student.parameters() if p.ndim > 1]
        rest = [p for p in student.parameters() if p.ndim <= 1]
        o = protocol.optim
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=o.lr,
                                           betas=o.betas, weight_decay=o.weight_decay)
        epochs = protocol.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs / 2)) if e <= epochs else 0)
        self.temperature, self.beta = protocol.loss.temperature, aug.mix_alpha
        self.kl = torch.nn.KLDivLoss(reduction="batchmean")
        self.meters: list[tuple[float, float]] = []  # RDED's AverageMeters, per step

    def epoch(self) -> float:
        t0 = time.perf_counter()
        for images, labels in self.loader:
            with torch.no_grad():
                lam = np.random.beta(self.beta, self.beta)
                index = torch.randperm(images.shape[0])
                y0, y1, x0, x1 = rand_bbox(images.shape[2], images.shape[3], lam)
                mixed = images.clone()
                mixed[:, :, y0:y1, x0:x1] = images[index, :, y0:y1, x0:x1]
                pred_clean = self.student(images)  # RDED's train-accuracy forward on the clean batch
                soft = F.softmax(self.teacher(mixed) / self.temperature, dim=1)
            self.optimizer.zero_grad()
            loss = self.kl(F.log_softmax(self.student(mixed) / self.temperature, dim=1), soft)
            loss.backward()
            self.optimizer.step()
            self.meters.append((loss.item(), (pred_clean.argmax(1) == labels).float().mean().item()))
        self.scheduler.step()
        return time.perf_counter() - t0


class Bare:
    """The floor: student forward + KL + backward + AdamW step and a teacher
    forward on a fixed, already normalised batch; nothing else. Same device and
    memory layout as our kernel (``runtime``), so the ratio is our loop's overhead."""

    def __init__(self, batch, teacher, student, protocol, runtime: Runtime):
        self.teacher, self.student = runtime.place(copy.deepcopy(teacher)).eval(), runtime.place(student).train()
        self.x = batch.contiguous(memory_format=torch.channels_last) if runtime.channels_last else batch
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=protocol.optim.lr)
        self.t = protocol.loss.temperature

    def steps(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.inference_mode():
                target = self.teacher(self.x)
            loss = F.kl_div(F.log_softmax(self.student(self.x) / self.t, 1), F.log_softmax(target / self.t, 1),
                            reduction="batchmean", log_target=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - t0


@torch.inference_mode()
def accuracy(model, split, info) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split), 500):
        x = info.normalize(split.images[i:i + 500].float() / 255)
        correct += int((model(x).argmax(1) == split.labels[i:i + 500]).sum())
    return correct / len(split)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="CIFAR-10 ImageFolder tarball (default: ../shared/data/cifar10-jpeg.tar.gz)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="reference DataLoader workers (RDED: 4)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of the main process, same for both (1 is steadier on a shared machine)")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: small models, 2 epochs, 1 seed, 1k test images")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("cifar10", str(find_cifar(args.data)))
    if args.quick:
        args.epochs, args.seeds, args.teacher_epochs = 2, 1, 1
        student_arch, teacher_spec = "convnet3-w16", TeacherSpec(arch="convnet3-w16-bn", epochs=1, batch_size=128)
        data = Dataset(data.info, data.train.subset(torch.arange(0, 50000, 10)),
                       data.test.subset(torch.arange(0, 10000, 10)), data.classes, data.record)
    else:
        student_arch = "convnet3"
        teacher_spec = TeacherSpec(arch="convnet3", epochs=args.teacher_epochs, batch_size=128,
                                   optim=OptimSpec(name="sgd", lr=0.05, weight_decay=5e-4))
    teacher, teacher_metrics = cached_teacher(data, teacher_spec)
    print(f"teacher {teacher_spec.arch}: test top-1 {teacher_metrics['top1']:.4f}")
    protocol = resolve_protocol("rded", "cifar", {"student": student_arch, "epochs": args.epochs, "batch_size": 50,
                                                  "eval": {"interval": 0, "record_best_on_test": False}})
    print(f"student {student_arch}, {args.epochs} epochs, batch 50, seeds {args.seeds}, torch threads {args.threads}, "
          f"reference workers {args.workers}")
    runtime = Runtime()  # what a job on this machine's CPU uses (Runtime.auto without a GPU)
    ours_t, ref_t, bare_t, acc_ours, acc_ref = [], [], [], [], []
    for seed in range(args.seeds):
        distilled = synthesize("random_real", data, None, RandomRealParams(ipc=10), seed=seed)
        ref = Reference(distilled, data, protocol, teacher, build_model(student_arch, data, seed), seed, args.workers)
        batch = data.info.normalize(distilled.images[:50].float() / 255)
        bare = Bare(batch, teacher, build_model(student_arch, data, seed + 1000), protocol, runtime)
        steps = math.ceil(len(distilled.labels) / 50)
        bare.steps(1)  # warm-up: first calls allocate

        def interleave(row):
            # Bare steps right after our epoch (same machine state), then the
            # reference epoch, whose worker processes are gone when it returns.
            ours_t.append(row["time_s"])
            bare_t.append(bare.steps(steps))
            ref_t.append(ref.epoch())

        t0 = time.perf_counter()
        result = posteval(distilled, data, protocol, {teacher_spec.arch: teacher}, seed, runtime,
                          on_epoch=interleave)
        acc_ours.append(result["metrics"]["top1"])
        acc_ref.append(accuracy(ref.student, data.test, data.info))
        n = args.epochs
        print(f"seed {seed}: ours {statistics.median(ours_t[-n:]):.3f} s/epoch, reference "
              f"{statistics.median(ref_t[-n:]):.3f} s/epoch, bare {statistics.median(bare_t[-n:]):.3f} s/epoch; "
              f"top-1 ours {acc_ours[-1]:.4f} reference {acc_ref[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    ratios = [r / o for r, o in zip(ref_t, ours_t)]
    print(f"per-epoch time ratio reference/ours: median {statistics.median(ratios):.2f}, "
          f"min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} epochs")
    figures = {"speedup_vs_reference": round(sum(ref_t) / sum(ours_t), 3),
               "overhead_vs_bare": round(sum(ours_t) / sum(bare_t), 3),
               "acc_ours": round(statistics.mean(acc_ours), 4), "acc_reference": round(statistics.mean(acc_ref), 4),
               "seeds": args.seeds}
    print(f"targets: speedup >= 2 ({figures['speedup_vs_reference']}), overhead <= 1.2 "
          f"({figures['overhead_vs_bare']}), |acc diff| <= 0.015 "
          f"({abs(figures['acc_ours'] - figures['acc_reference']):.4f})")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
