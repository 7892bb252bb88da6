"""A teacher from weights made elsewhere: build the architecture, load the
weights strictly, adapt its input and outputs to the study's dataset, measure
its test top-1 once and refuse one that is no better than chance."""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
from torch import nn

from ..data import Dataset, DatasetInfo
from ..loop import Runtime, TrainResult, evaluate
from ..models import create_model
from . import hub
from .checkpoints import CheckpointError, file_digest, fit_problem, load_into, read_state_dict
from .spec import TeacherSpec

# A teacher below this many times chance accuracy is refused: its weights do not
# fit the data as loaded (wrong class order, normalisation or key layout), and
# everything it labels or synthesises would be noise.
CHANCE_FACTOR = 2.0


class TeacherRefused(CheckpointError):
    """Loaded weights that classify the test set near chance."""


class TeacherInput(nn.Module):
    """Loaded weights seen through the study's data: the study feeds images
    normalised with the dataset's mean/std, so they are renormalised to the
    mean/std the weights expect; and the dataset's classes, in the dataset's
    order, are picked from the weights' outputs."""

    def __init__(self, model: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 index: torch.Tensor | None):
        super().__init__()
        self.model = model
        # Persistent: the stored-labels signature hashes a teacher's state, and
        # these change what it outputs as much as its weights do.
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale + self.shift  # (x * std_d + mean_d - mean_w) / std_w, folded
        out = self.model(x)
        return out if self.index is None else out.index_select(1, self.index)


def outputs(spec: TeacherSpec, info: DatasetInfo) -> int:
    """How many classes the weights' head has."""
    names = spec.class_names()
    return len(names) if names is not None else info.num_classes


def class_index(spec: TeacherSpec, classes: Sequence[str]) -> torch.Tensor | None:
    """For each dataset class (in order), its output in the weights; None when
    they are the same. ValueError names the classes the weights lack."""
    names = spec.class_names()
    if names is None:
        return None
    where = {n: i for i, n in enumerate(names)}
    absent = [c for c in classes if c not in where]
    if absent:
        raise ValueError(f"the dataset's classes {', '.join(map(repr, absent[:5]))}"
                         f"{f' (and {len(absent) - 5} more)' if len(absent) > 5 else ''} are not among the "
                         f"{len(names)} listed (the dataset's are {', '.join(map(repr, classes[:5]))}"
                         f"{', ...' if len(classes) > 5 else ''})")
    index = [where[c] for c in classes]
    return None if index == list(range(len(names))) else torch.tensor(index, dtype=torch.long)


def adapt(model: nn.Module, spec: TeacherSpec, info: DatasetInfo, classes: Sequence[str]) -> nn.Module:
    """``model`` (the weights' own network) as the study's teacher; itself
    when the weights expect the dataset's normalisation and class order."""
    scale = shift = None
    norm = spec.norm()
    if norm is not None and (tuple(norm[0]), tuple(norm[1])) != (tuple(info.mean), tuple(info.std)):
        mean_w, std_w = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in norm)
        mean_d, std_d = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (info.mean, info.std))
        scale, shift = std_d / std_w, (mean_d - mean_w) / std_w
    index = class_index(spec, classes)
    return model if scale is None and index is None else TeacherInput(model, scale, shift, index)


def architecture(spec: TeacherSpec, info: DatasetInfo) -> nn.Module:
    """The weights' network, untrained (its head has :func:`outputs` classes)."""
    return create_model(spec.arch, outputs(spec, info), info.channels, info.size)


def _what(spec: TeacherSpec, info: DatasetInfo) -> str:
    return (f"arch {spec.arch!r} for {info.name} ({info.channels}x{info.size}x{info.size} input, "
            f"{outputs(spec, info)} outputs)")


def source_problems(spec: TeacherSpec, info: DatasetInfo, classes: Sequence[str] | None = None
                    ) -> Iterator[tuple[str, str]]:
    """(key, message) for every way the weights do not fit this dataset, found
    without running them: the file's keys and shapes against the architecture,
    the head's size, the normalisation's channels, the class names (when the
    dataset's ``classes`` are given). A hub file need not be cached yet."""
    norm = spec.norm()
    if norm is not None and len(norm[0]) != info.channels:
        yield "input_norm", f"has {len(norm[0])} channels, dataset {info.name!r} {info.channels}"
    names = spec.class_names()
    if names is not None and classes is not None:
        try:
            class_index(spec, classes)
        except ValueError as exc:
            yield "classes", str(exc)
    elif names is not None and len(names) < info.num_classes:
        yield "classes", f"lists {len(names)} classes, dataset {info.name!r} has {info.num_classes}"
    if spec.source == "checkpoint":
        if spec.layout in ("rded", "dc") and info.channels == 1:
            yield "layout", (f"the {spec.layout} ConvNet pads its first convolution by 3 on 1-channel input "
                             "(MNIST's 28 px to 32); this project's ConvNet does not, so its weights would compute "
                             "something else: not supported")
            return
        try:
            with torch.device("meta"):  # shapes only, no memory
                model = architecture(spec, info)
        except (ValueError, RuntimeError, TypeError) as exc:
            yield "arch", f"cannot be built for {info.name} ({info.channels}x{info.size}x{info.size}): {exc}"
            return
        try:
            problem = fit_problem(read_state_dict(spec.checkpoint), model, spec.checkpoint, spec.layout,
                                  _what(spec, info))
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            yield "checkpoint", problem
    elif spec.loaded:
        found = spec.hub_weights()
        if found.outputs and found.outputs != outputs(spec, info):
            key = "classes" if names is not None else ("weights" if spec.source == "torchvision" else "pretrained")
            yield key, (f"{found.label} have {found.outputs} outputs, the teacher needs {outputs(spec, info)}: "
                        f"list the {found.outputs} classes in output order with classes: (the dataset's "
                        "are picked from them)")


def _weights(spec: TeacherSpec, info: DatasetInfo) -> tuple[nn.Module, dict]:
    """The weights' network with its weights, and what identifies them."""
    if spec.source == "timm":
        model, path = hub.timm_pretrained(spec.arch, outputs(spec, info), info.channels, info.size)
        found = hub.timm_weights(spec.arch)
        return model, {"kind": "timm", "weights": found.name, "path": str(path), "sha256": file_digest(path)}
    model = architecture(spec, info)
    if spec.source == "torchvision":
        found = hub.torchvision_weights(spec.weights)
        state, path = hub.torchvision_state_dict(found)
        load_into(model, state, str(path), "torchvision", _what(spec, info))
        return model, {"kind": "torchvision", "weights": found.name, "path": str(path), "sha256": file_digest(path)}
    load_into(model, read_state_dict(spec.checkpoint), spec.checkpoint, spec.layout, _what(spec, info))
    return model, {"kind": "checkpoint", "path": spec.checkpoint, "sha256": file_digest(spec.checkpoint),
                   "layout": spec.layout}


def load_pretrained(dataset: Dataset, spec: TeacherSpec, runtime: Runtime = Runtime(),
                    expected_sha256: str | None = None) -> tuple[TrainResult, dict]:
    """The teacher from weights made elsewhere, its test top-1 measured once
    (``metrics["top1"]``), and where the weights came from (path, sha256, layout,
    input normalisation, classes). ``expected_sha256``: the digest the study was
    planned with (a file changed since is refused). Raises TeacherRefused near chance."""
    if not spec.loaded:
        raise ValueError(f"teacher {spec.arch!r} has no weights to load (it is trained: pipeline.train_teacher)")
    info = dataset.info
    t0 = time.perf_counter()
    model, source = _weights(spec, info)
    if expected_sha256 is not None and source["sha256"] != expected_sha256:
        raise CheckpointError(f"{source['path']} changed since the study was planned (sha256 {expected_sha256[:12]}, "
                              f"now {source['sha256'][:12]}): run the study again to plan with the new file")
    try:
        teacher = adapt(model, spec, info, dataset.classes)
    except ValueError as exc:
        raise CheckpointError(f"classes: {exc}") from None
    teacher = runtime.place(teacher).eval()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    top1 = evaluate(teacher, dataset.test, info, runtime)
    eval_s = time.perf_counter() - t1
    norm, names = spec.norm(), spec.class_names()
    source["input_norm"] = None if norm is None else {"mean": list(norm[0]), "std": list(norm[1])}
    source["classes"] = None if names is None else list(names)
    chance = 1.0 / info.num_classes
    if top1 < CHANCE_FACTOR * chance:
        layout = f", or the key layout (layout: now {spec.layout})" if spec.source == "checkpoint" else ""
        raise TeacherRefused(
            f"teacher {spec.arch!r} from {source['path']}: test top-1 {100 * top1:.2f}% is near chance "
            f"({100 * chance:.1f}% for {info.num_classes} classes), so the weights do not fit {info.name} as loaded. "
            f"Likely causes: the class order (classes: the weights' class names in output order; the dataset's "
            f"begin {', '.join(dataset.classes[:3])}), the input normalisation (input_norm: now "
            f"{spec.input_norm if isinstance(spec.input_norm, str) else 'explicit'}; RDED's code uses imagenet, "
            f"DC/MTT and SRe2L's CIFAR code their own mean/std){layout}")
    return TrainResult(teacher, {"top1": top1}, [], {"load_s": load_s, "eval_s": eval_s}), source


def network_of(teacher: nn.Module) -> nn.Module:
    """The weights' own network inside a teacher: what a teacher artifact stores."""
    return teacher.model if isinstance(teacher, TeacherInput) else teacher


def teacher_model(spec: TeacherSpec, dataset: Dataset) -> tuple[nn.Module, nn.Module]:
    """(teacher, network) for loading a stored teacher's state into ``network``:
    for loaded weights the teacher adapts the network to the dataset."""
    network = architecture(spec, dataset.info)
    return adapt(network, spec, dataset.info, dataset.classes), network
