"""The one training kernel. Teacher pretraining (hard labels on real data) and
student post-evaluation (soft labels on a distilled set) both run through
:func:`train`.

The hot loop is: index the device-resident tensors (or take the next streamed
batch), augment the batch, ask the label source for targets, forward, loss,
backward, step. No host sync per step: losses are summed on the device and
read once per epoch, and every random choice of an epoch is drawn up front on
the CPU (:func:`draw_views`), which is also what stored labels record.
"""
from __future__ import annotations

import copy
import math
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from . import augment as aug
from .checkpoint import Checkpoint
from .data import DatasetInfo, Split, as_float
from .losses import distill_loss
from .protocol import OptimSpec, Protocol
from .seeding import generator


# A long loop's optional progress report: progress(done, total, unit, **metrics),
# e.g. (3, 10, "epoch", loss=0.9, train_top1=0.7). Called with done=0 when the
# loop starts (the ETA is timed from then) and after each unit; metrics are
# numbers or 0-d tensors, which the receiver reads only when it passes them on
# (a host sync then, not at every step).
ProgressFn = Callable[..., None]


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN/inf loss). Deterministic: retrying will not help."""


@dataclass(frozen=True)
class Runtime:
    """How to run, not what to compute: never part of a cell's identity."""

    device: str = "cpu"
    amp: bool = False  # bf16 autocast on CUDA
    # NHWC is the layout oneDNN's and cuDNN's fast convolutions want: on these
    # CPUs a ConvNet-3/ResNet-18 training step measured 1.1-2x faster with it.
    channels_last: bool = True
    workers: int = 4  # DataLoader workers for streamed (ImageNet-scale) splits

    @classmethod
    def auto(cls) -> "Runtime":
        if torch.cuda.is_available():
            return cls(device="cuda", amp=True)
        return cls()

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on this device in this memory layout (in place, as Module.to)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


@dataclass
class TrainResult:
    model: nn.Module  # the weights that were evaluated (EMA when enabled)
    metrics: dict[str, float]
    epochs: list[dict] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class Views:
    """One block's sample order and every step's augmentation parameters."""

    order: torch.Tensor  # [N] int64
    params: list[aug.AugParams]


def num_steps(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def draw_views(spec: aug.AugmentSpec, n: int, batch_size: int, in_hw: tuple[int, int], out_hw: tuple[int, int],
               seed: int, block: int) -> Views:
    """Everything random about one block of epochs, from its own seeded stream:
    replaying a block (refresh_every > 1, or stored labels) is exact."""
    gen = generator(seed, "loop", block)
    order = torch.randperm(n, generator=gen)
    params = [aug.draw(spec, min(batch_size, n - k * batch_size), *in_hw, gen, out_hw)
              for k in range(num_steps(n, batch_size))]
    return Views(order, params)


def make_batch(raw: torch.Tensor, params: aug.AugParams, spec: aug.AugmentSpec, info: DatasetInfo,
               runtime: "Runtime") -> torch.Tensor:
    """The student's (and teacher's) input for one step: shared by the loop and
    the stored-labels stage so both see bit-identical views."""
    x = info.normalize(aug.apply(as_float(raw), params, spec))
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


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


def _streamed(split) -> bool:
    return hasattr(split, "loader")


@torch.inference_mode()
def evaluate(model: nn.Module, split, info: DatasetInfo, runtime: Runtime, batch_size: int = 500,
             flip_tta: bool = False) -> float:
    """Top-1 accuracy as a fraction, on a tensor split or a streamed one."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    chunks = [list(range(i, min(i + batch_size, len(split)))) for i in range(0, len(split), batch_size)]
    if _streamed(split):
        loader, sampler = split.loader(train=False, workers=runtime.workers,
                                       pin_memory=runtime.device.startswith("cuda"))
        sampler.batches = chunks
        batches = zip(chunks, loader)
    else:
        batches = ((rows, split.images[rows[0]:rows[-1] + 1]) for rows in chunks)
    for rows, raw in batches:
        x = info.normalize(as_float(raw.to(runtime.device, non_blocking=True)))
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
            logits = model(x).float()
            if flip_tta:
                logits = logits + model(torch.flip(x, dims=[3])).float()
        correct += (logits.argmax(1) == split.labels[rows[0]:rows[-1] + 1].to(runtime.device)).sum()
    model.train(was_training)
    return correct.item() / max(len(split), 1)


def _peak_memory_bytes(runtime: Runtime) -> int:
    if runtime.device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux; process-wide, so it includes the dataset.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PhaseClock:
    """Wall time per phase of the step. On CUDA, events recorded between phases
    and read once per epoch (no sync per step); on the CPU, perf_counter."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []
        self._last = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self.totals[phase] += now - self._last
        self._last = now

    def flush(self) -> None:
        """Call after a host sync (the per-epoch loss read)."""
        for phase, start, end in self._pending:
            self.totals[phase] += start.elapsed_time(end) / 1000.0
        self._pending.clear()


class _Batches:
    """Yields (idx on device, raw images on device) in a block's order."""

    def __init__(self, data, runtime: Runtime):
        self.data, self.device = data, runtime.device
        self.loader = None
        if _streamed(data):
            self.loader, self.sampler = data.loader(train=True, workers=runtime.workers,
                                                    pin_memory=self.device.startswith("cuda"))
            self.in_hw = data.train_hw
        else:
            self.in_hw = tuple(data.images.shape[-2:])

    def epoch(self, order: torch.Tensor, batch_size: int):
        chunks = order.split(batch_size)
        if self.loader is None:
            on_device = order.to(self.device)
            for idx in on_device.split(batch_size):
                yield idx, self.data.images[idx]
            return
        self.sampler.batches = [c.tolist() for c in chunks]
        for idx, raw in zip(chunks, self.loader):
            yield idx.to(self.device), raw.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.loader = None  # drops the persistent workers


def train(model: nn.Module, data: Split, info: DatasetInfo, protocol: Protocol, labeler, *, batch_size: int,
          seed: int, runtime: Runtime = Runtime(), test: Split | None = None, heldout: Split | None = None,
          on_epoch: Callable[[dict], None] | None = None, checkpoint: Checkpoint | None = None,
          progress: ProgressFn | None = None) -> TrainResult:
    """Train ``model`` on ``data`` under ``protocol`` with targets from ``labeler``.

    ``data`` is a tensor :class:`Split` (moved to the device) or a streamed
    split (decoded by workers). A labeler with a ``views(block)`` method (stored
    labels) dictates the sample order and augmentation; otherwise they are
    drawn from ``seed``. ``progress`` (:data:`ProgressFn`) hears of each
    epoch with its row (loss, train_top1, and test_top1 on evaluated epochs).

    Returns the final-epoch test top-1 as ``metrics["top1"]`` (THE result), plus
    clearly named extras: ``top1_best_on_test`` (selected on the test set) and
    ``top1_heldout_selected`` (epoch chosen on held-out real training data).

    With ``checkpoint`` (rd3core.checkpoint) the state is saved at the end of an
    epoch whenever it is due, and a saved state is resumed from at the start.
    The learning-rate schedule is a function of the epoch and step, so the
    epoch is all of the scheduler's state; views are redrawn from ``seed`` and
    the block.
    """
    device = runtime.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = runtime.place(model)
    model.train()
    data = data.to(device)
    batches = _Batches(data, runtime)
    optimizer = make_optimizer(model, protocol.optim)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    # EMA with swa_utils' update (torch's own foreach lerp, as AveragedModel uses it).
    # AveragedModel.update_parameters is not used: every call it moves its CPU step
    # count to the device, a host sync per step on CUDA, and its first call copies
    # the weights instead of averaging, where our EMA starts from the initial ones.
    ema = copy.deepcopy(model).requires_grad_(False) if protocol.ema_decay else None
    ema_update = get_ema_multi_avg_fn(protocol.ema_decay) if ema is not None else None
    ema_params = list(ema.parameters()) if ema is not None else []
    params_list = list(model.parameters())

    n = len(data)
    steps = num_steps(n, batch_size)
    epochs = protocol.epochs
    spec = protocol.augment
    refresh = protocol.labels.refresh_every
    out_hw = (info.size, info.size) if _streamed(data) else batches.in_hw
    labels_dev = data.labels.to(device)
    history: list[dict] = []
    clock = PhaseClock(device)
    t_train = t_eval = 0.0
    seen = 0
    views: Views | None = None
    start = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        start, history, seen = saved["epoch"], saved["history"], saved["seen"]
        t_train, t_eval = saved["train_s"], saved["eval_s"]
        clock.totals.update(saved["phases"])

    def run_eval() -> dict:
        nonlocal t_eval
        t0 = time.perf_counter()
        target = ema if ema is not None else model
        tta = protocol.eval.test_transform == "flip_tta"
        row = {}
        if test is not None:
            row["test_top1"] = evaluate(target, test, info, runtime, protocol.eval.batch_size, tta)
        if heldout is not None:
            row["heldout_top1"] = evaluate(target, heldout, info, runtime, protocol.eval.batch_size, tta)
        t_eval += time.perf_counter() - t0
        return row

    if progress is not None:  # from where a resumed run starts, so its ETA is timed from here
        progress(start, epochs, "epoch")
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        # Views are re-drawn every `refresh` epochs and replayed in between.
        block = epoch // refresh
        if views is None or epoch % refresh == 0:
            views = labeler.views(block) if hasattr(labeler, "views") else \
                draw_views(spec, n, batch_size, batches.in_hw, out_hw, seed, block)
            if views.order.numel() != n or len(views.params) != steps:
                raise ValueError(f"the labeler's views hold {views.order.numel()} samples in {len(views.params)} "
                                 f"steps; this run has {n} samples in {steps} steps of {batch_size}")
        temperature = protocol.loss.temperature_at(epoch / max(epochs - 1, 1))
        sums = torch.zeros(2, device=device)  # loss, correct (argmax vs the unmixed label)
        t_wait = time.perf_counter()
        for step, (idx, raw) in enumerate(batches.epoch(views.order, batch_size)):
            clock.totals["load"] += time.perf_counter() - t_wait
            clock.start()
            factor = protocol.schedule.factor(epoch + step / steps, epochs)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            params = views.params[step]
            x = make_batch(raw, params, spec, info, runtime)
            y = labels_dev[idx]
            y_b = y[params.mix_perm.to(device)] if params.mixed() else None
            clock.mark("augment")
            with torch.autocast("cuda", torch.bfloat16, enabled=runtime.amp):
                targets = labeler(x, idx, params, block, step)
                clock.mark("labels")
                logits = model(x).float()
            loss = distill_loss(logits, targets, y, y_b, params.mix_lam, protocol.loss, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema_update(ema_params, params_list, None)  # the step count: unused by an EMA
                with torch.no_grad():
                    for be, b in zip(ema.buffers(), model.buffers()):
                        be.copy_(b)
            sums += torch.stack([loss.detach(), (logits.detach().argmax(1) == y).sum().float()])
            clock.mark("student")
            seen += x.shape[0]
            t_wait = time.perf_counter()
        loss_total, correct = sums.tolist()  # the one host sync per epoch
        mean_loss = loss_total / steps
        clock.flush()
        t_train += time.perf_counter() - t0
        if not math.isfinite(mean_loss):
            batches.close()
            raise NonFiniteLoss(f"loss became {mean_loss} in epoch {epoch + 1}")
        row = {"epoch": epoch + 1, "loss": mean_loss, "train_top1": correct / n,
               "lr": optimizer.param_groups[0]["lr"], "temperature": temperature, "time_s": time.perf_counter() - t0}
        last = epoch + 1 == epochs
        if last or (protocol.eval.interval and (epoch + 1) % protocol.eval.interval == 0):
            row.update(run_eval())
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if progress is not None:
            progress(epoch + 1, epochs, "epoch", **row)
        if checkpoint is not None and not last and checkpoint.due():
            checkpoint.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "ema": ema.state_dict() if ema is not None else None, "history": history,
                             "seen": seen, "train_s": t_train, "eval_s": t_eval, "phases": dict(clock.totals)},
                            f"epoch {epoch + 1}")
    batches.close()
    return TrainResult(ema if ema is not None else model, _metrics(history, protocol, heldout is not None),
                       history, _timing(clock, t_train, t_eval, seen, runtime))


def _metrics(history: list[dict], protocol: Protocol, has_heldout: bool) -> dict[str, float]:
    final = history[-1]
    metrics: dict[str, float] = {}
    if "test_top1" in final:
        metrics["top1"] = final["test_top1"]
    evaluated = [r for r in history if "test_top1" in r]
    counted = [r for r in evaluated if r["epoch"] > protocol.eval.best_after_fraction * protocol.epochs]
    if protocol.eval.record_best_on_test and counted:
        metrics["top1_best_on_test"] = max(r["test_top1"] for r in counted)
    on_heldout = [r for r in history if "heldout_top1" in r]
    if on_heldout:  # the last evaluated epoch's: what a search without the test split compares
        metrics["heldout_top1"] = on_heldout[-1]["heldout_top1"]
    if has_heldout and evaluated:
        best = max(evaluated, key=lambda r: (r["heldout_top1"], r["epoch"]))
        metrics["top1_heldout_selected"] = best["test_top1"]
        metrics["heldout_selected_epoch"] = float(best["epoch"])
    metrics["final_loss"] = final["loss"]
    return metrics


def _timing(clock: PhaseClock, t_train: float, t_eval: float, seen: int, runtime: Runtime) -> dict[str, float]:
    timing = {"train_s": t_train, "eval_s": t_eval, "images_per_s": seen / max(t_train, 1e-9),
              "peak_memory_bytes": float(_peak_memory_bytes(runtime))}
    timing.update({f"phase_{k}_s": v for k, v in sorted(clock.totals.items())})
    return timing
