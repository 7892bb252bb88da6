"""What a teacher is: trained here on the real training split, or loaded from
weights made elsewhere (a checkpoint file, torchvision's or timm's pretrained
weights) with the input normalisation and class order those weights expect."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..augment import AugmentSpec
from ..config import bounded, to_dict
from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..models import MODELS
from ..protocol import LabelSpec, OptimSpec, Protocol, ScheduleSpec
from . import hub
from .checkpoints import LAYOUTS, file_digest

# The keys that say where a teacher's weights come from. A trained teacher is
# keyed without them (as before they existed), so its cached artifact stays valid.
SOURCE_KEYS = ("checkpoint", "layout", "weights", "pretrained", "input_norm", "classes")
NAMED_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD)}  # "dataset": the dataset's own, no change


@dataclass(frozen=True)
class InputNorm:
    """The per-channel mean and std the weights were trained with."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def validate(self):
        if not self.mean or len(self.mean) != len(self.std):
            yield "", f"expected mean and std of equal length (one value per channel), got {self.mean} and {self.std}"
        if any(s <= 0 for s in self.std):
            yield "std", f"expected values > 0, got {self.std}"


def read_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a file: a JSON list of strings, or one name per line
    (blank lines skipped). ValueError says what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    st = p.stat()
    return _read_classes(str(p), st.st_size, st.st_mtime_ns)  # every cell's key asks: read once


@functools.lru_cache(maxsize=16)
def _read_classes(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} cannot be read as text ({exc})") from None
    if p.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{p}: expected a JSON list of class names (strings)")
        return tuple(names)
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _absolute(path: str | None) -> str | None:
    # Workers may run elsewhere than the driver's current directory.
    return None if path is None else os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher. Trained here (the default): pretrained on the real training
    split with hard labels by ``epochs`` ... ``seed``. Loaded: from a checkpoint
    file (``checkpoint`` + ``layout``), torchvision's weights (``weights``) or
    timm's (``pretrained``); then nothing is trained and those fields are unused."""

    arch: str = "convnet3"
    epochs: int = bounded(30, ge=1, le=100_000)
    batch_size: int = bounded(128, ge=1, le=65_536)
    optim: OptimSpec = field(default_factory=lambda: OptimSpec(name="sgd", lr=0.05, weight_decay=5e-4))
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    augment: AugmentSpec = field(default_factory=lambda: AugmentSpec(crop="pad", padding=4, flip=True, mix="none"))
    seed: int = 0
    checkpoint: str | None = None  # a weights file; a relative path is from the current directory
    layout: str = "ours"  # how the file names its keys (checkpoints.LAYOUTS)
    weights: str | None = None  # torchvision:<WeightsEnum>.<member>
    pretrained: bool = False  # timm/<name>[.<tag>]: timm's pretrained weights
    input_norm: str | InputNorm = "dataset"  # what the weights expect: dataset | imagenet | {mean, std}
    classes: tuple[str, ...] | str | None = None  # the weights' outputs in order: names, or a file of them

    def __post_init__(self):
        object.__setattr__(self, "checkpoint", _absolute(self.checkpoint))
        if isinstance(self.classes, str):
            object.__setattr__(self, "classes", _absolute(self.classes))

    @property
    def source(self) -> str:
        """Where the weights come from: trained | checkpoint | torchvision | timm."""
        if self.checkpoint is not None:
            return "checkpoint"
        if self.weights is not None:
            return "torchvision"
        return "timm" if self.pretrained else "trained"

    @property
    def loaded(self) -> bool:
        return self.source != "trained"

    def class_names(self) -> tuple[str, ...] | None:
        """The weights' output classes in order (None: the dataset's own order)."""
        return read_classes(self.classes) if isinstance(self.classes, str) else self.classes

    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) the weights expect, None for the dataset's own."""
        if isinstance(self.input_norm, InputNorm):
            return self.input_norm.mean, self.input_norm.std
        return NAMED_NORMS.get(self.input_norm)

    def hub_weights(self) -> hub.HubWeights | None:
        if self.source == "torchvision":
            return hub.torchvision_weights(self.weights)
        return hub.timm_weights(self.arch) if self.source == "timm" else None

    def validate(self):
        if self.arch not in MODELS:
            yield "arch", MODELS.unknown_message(self.arch)
        given = [k for k, on in (("checkpoint", self.checkpoint is not None), ("weights", self.weights is not None),
                                 ("pretrained", self.pretrained)) if on]
        if len(given) > 1:
            yield given[1], f"the weights come from one place: give one of checkpoint, weights, pretrained " \
                            f"(also {given[0]})"
        if self.layout not in LAYOUTS:
            yield "layout", LAYOUTS.unknown_message(self.layout)
        elif self.layout != "ours" and self.checkpoint is None:
            yield "layout", "says how a checkpoint file names its keys: set checkpoint too"
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            yield "checkpoint", f"{self.checkpoint} {'is not a file' if Path(self.checkpoint).exists() else 'does not exist'}"
        if self.weights is not None and self.arch in MODELS:
            problem = hub.torchvision_problem(self.weights, self.arch)
            if problem:
                yield "weights", problem
        if self.pretrained and self.arch in MODELS:
            problem = hub.timm_problem(self.arch)
            if problem:
                yield "pretrained", problem
        yield from self._input_problems()

    def _input_problems(self):
        if isinstance(self.input_norm, str) and self.input_norm != "dataset" and self.input_norm not in NAMED_NORMS:
            yield "input_norm", (f"expected 'dataset', {', '.join(map(repr, NAMED_NORMS))} or "
                                 f"{{mean: [...], std: [...]}}, got {self.input_norm!r}")
        try:
            names = self.class_names()
        except ValueError as exc:
            yield "classes", str(exc)
            names = None
        if names is not None:
            repeated = sorted({n for n in names if names.count(n) > 1})
            if not names or not all(isinstance(n, str) and n for n in names):
                yield "classes", "expected a non-empty list of class names, or a file of them"
            elif repeated:
                yield "classes", f"names a class twice: {', '.join(repeated[:5])}"
        if not self.loaded:
            for key, default in (("input_norm", "dataset"), ("classes", None)):
                if getattr(self, key) != default:
                    yield key, "applies to weights made elsewhere: set checkpoint, weights or pretrained (a " \
                               "teacher trained here sees the dataset's own normalisation and class order)"

    def settings(self) -> dict[str, Any]:
        """The spec as plain data for a job to rebuild it: for loaded weights
        only ``arch`` and where they come from (the training keys are unused)."""
        data = to_dict(self)
        return data if not self.loaded else {k: v for k, v in data.items() if k == "arch" or k in SOURCE_KEYS}

    def identity(self) -> dict[str, Any]:
        """What the teacher's artifact and the cells are keyed by, and recorded
        as: a trained teacher's settings; for loaded weights, what identifies
        them (a file's content digest, never its path), the layout, the input
        normalisation and the class order."""
        data = to_dict(self)
        if not self.loaded:
            return {k: v for k, v in data.items() if k not in SOURCE_KEYS}
        if self.source == "checkpoint":
            source = {"kind": "checkpoint", "sha256": file_digest(self.checkpoint), "layout": self.layout}
        else:
            found = self.hub_weights()
            source = {"kind": found.library, "weights": found.name, "file": found.filename}
        names = self.class_names()
        return {"arch": self.arch, "source": source, "input_norm": data["input_norm"],
                "classes": list(names) if names is not None else None}

    def protocol(self) -> Protocol:
        return Protocol(student=self.arch, epochs=self.epochs, batch_size=self.batch_size, augment=self.augment,
                        labels=LabelSpec(mode="hard"), optim=self.optim, schedule=self.schedule)

