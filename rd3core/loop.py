"""The one training kernel. Teacher pretraining (hard labels on real data) and
student post-evaluation (soft labels on a distilled set) both run through
:func:`train`.

The hot loop is: index the device-resident tensors, augment the batch, ask the
label source for targets, forward, loss, backward, step. No host sync per step:
losses are summed on the device and read once per epoch.
"""
from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import augment as aug
from .data import DatasetInfo, Split, as_float
from .losses import distill_loss
from .protocol import OptimSpec, Protocol
from .seeding import generator


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN/inf loss). Deterministic: retrying will not help."""


@dataclass(frozen=True)
class Runtime:
    """How to run, not what to compute: never part of a cell's identity."""

    device: str = "cpu"
    amp: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False

    @classmethod
    def auto(cls) -> "Runtime":
        if torch.cuda.is_available():
            return cls(device="cuda", amp=True, channels_last=True)
        return cls()


@dataclass
class TrainResult:
    model: nn.Module  # the weights that were evaluated (EMA when enabled)
    metrics: dict[str, float]
    epochs: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


def make_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    if spec.no_decay_norm_bias:
        # Norm weights and biases are the 1-d parameters in every registered model.
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": spec.weight_decay}]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=False)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=spec.lr, betas=spec.betas)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, info: DatasetInfo, runtime: Runtime, batch_size: int = 500,
             flip_tta: bool = False) -> float:
    """Top-1 accuracy as a fraction."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    for i in range(0, len(split), batch_size):
        x = info.normalize(as_float(split.images[i:i + batch_size].to(runtime.device)))
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
            logits = model(x).float()
            if flip_tta:
                logits = logits + model(torch.flip(x, dims=[3])).float()
        correct += (logits.argmax(1) == split.labels[i:i + batch_size].to(runtime.device)).sum()
    model.train(was_training)
    return correct.item() / max(len(split), 1)


def _peak_memory_bytes(runtime: Runtime) -> int:
    if runtime.device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux; process-wide, so it includes the dataset.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(model: nn.Module, data: Split, info: DatasetInfo, protocol: Protocol, labeler, *, batch_size: int,
          seed: int, runtime: Runtime = Runtime(), test: Split | None = None, heldout: Split | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` under ``protocol`` with targets from ``labeler``.

    Returns the final-epoch test top-1 as ``metrics["top1"]`` (THE result), plus
    clearly named extras: ``top1_best_on_test`` (selected on the test set) and
    ``top1_heldout_selected`` (epoch chosen on held-out real training data).
    """
    device = runtime.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = model.to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    data = data.to(device)
    optimizer = make_optimizer(model, protocol.optim)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ema = copy.deepcopy(model).requires_grad_(False) if protocol.ema_decay else None

    n = len(data)
    steps = math.ceil(n / batch_size)
    epochs = protocol.epochs
    spec = protocol.augment
    refresh = protocol.labels.refresh_every
    h, w = data.images.shape[-2:]
    history: list[dict] = []
    t_train = t_eval = 0.0
    seen = 0

    def run_eval(epoch: int) -> dict:
        nonlocal t_eval
        t0 = time.perf_counter()
        target = ema if ema is not None else model
        row = {}
        if test is not None:
            row["test_top1"] = evaluate(target, test, info, runtime, protocol.eval.batch_size,
                                        protocol.eval.test_transform == "flip_tta")
        if heldout is not None:
            row["heldout_top1"] = evaluate(target, heldout, info, runtime, protocol.eval.batch_size,
                                           protocol.eval.test_transform == "flip_tta")
        t_eval += time.perf_counter() - t0
        return row

    for epoch in range(epochs):
        t0 = time.perf_counter()
        # Views are re-drawn every `refresh` epochs and replayed in between: the
        # epoch's generator is seeded by its block, so replays are exact.
        block = epoch // refresh
        gen = generator(seed, "loop", block)
        order = torch.randperm(n, generator=gen)
        temperature = protocol.loss.temperature_at(epoch / max(epochs - 1, 1))
        loss_sum = torch.zeros((), device=device)
        for step in range(steps):
            factor = protocol.schedule.factor(epoch + step / steps, epochs)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = as_float(data.images[idx.to(device)])
            params = aug.draw(spec, x.shape[0], h, w, gen)
            x = info.normalize(aug.apply(x, params, spec))
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = data.labels[idx.to(device)]
            y_b = y[params.mix_perm.to(device)] if params.mixed() else None
            with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
                targets = labeler(x, idx, params, block, step)
                logits = model(x).float()
            loss = distill_loss(logits, targets, y, y_b, params.mix_lam, protocol.loss, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(p, 1.0 - protocol.ema_decay)
                    for be, b in zip(ema.buffers(), model.buffers()):
                        be.copy_(b)
            loss_sum += loss.detach()
            seen += x.shape[0]
        mean_loss = (loss_sum / steps).item()  # the one host sync per epoch
        t_train += time.perf_counter() - t0
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"loss became {mean_loss} in epoch {epoch + 1}")
        row = {"epoch": epoch + 1, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
               "time_s": time.perf_counter() - t0}
        last = epoch + 1 == epochs
        if last or (protocol.eval.interval and (epoch + 1) % protocol.eval.interval == 0):
            row.update(run_eval(epoch + 1))
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)

    final = history[-1]
    metrics: dict[str, float] = {}
    if "test_top1" in final:
        metrics["top1"] = final["test_top1"]
    evaluated = [r for r in history if "test_top1" in r]
    if protocol.eval.record_best_on_test and evaluated:
        metrics["top1_best_on_test"] = max(r["test_top1"] for r in evaluated)
    if heldout is not None and evaluated:
        best = max(evaluated, key=lambda r: (r["heldout_top1"], r["epoch"]))
        metrics["top1_heldout_selected"] = best["test_top1"]
        metrics["heldout_selected_epoch"] = float(best["epoch"])
    metrics["final_loss"] = final["loss"]
    timing = {"train_s": t_train, "eval_s": t_eval, "images_per_s": seen / max(t_train, 1e-9),
              "peak_memory_bytes": float(_peak_memory_bytes(runtime))}
    return TrainResult(ema if ema is not None else model, metrics, history, timing)
