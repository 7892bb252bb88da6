"""The decoupled pipeline's stages as plain functions: pretrain a teacher,
post-evaluate a distilled set. (Synthesis is :func:`rd3core.synth.synthesize`.)
Usable from a notebook without the orchestrator::

    data = load_dataset("digits")  # carve_heldout(data, 5): also select epochs on held-out images
    teacher = train_teacher(data, TeacherSpec(arch="convnet3", epochs=20))
    # or weights made elsewhere, measured on the test set once (rd3core.teachers):
    # teacher, source = load_pretrained(data, TeacherSpec(arch="convnet3-bn", checkpoint="conv3.pth",
    #                                                     layout="rded", input_norm="imagenet"))
    distilled = synthesize("random_real", data, None, RandomRealParams(ipc=10), seed=0)
    result = posteval(distilled, data, resolve_protocol("rd3", "digits"), {"convnet3": teacher.model}, seed=0)
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from torch import nn

from .checkpoint import Checkpoint
from .data import Dataset, Split, as_float
from .labels import EpochwiseLabels, HardLabels, StaticLabels, TeacherEnsemble
from .loop import ProgressFn, Runtime, TrainResult, train
from .models import create_model
from .protocol import LabelSpec, Protocol, batch_size_for
from .seeding import derive_seed, seed_everything
from .stored_labels import StoredLabeler, StoredLabels, precompute, signature
from .synth import DistilledSet
from .teachers import TeacherSpec, load_pretrained  # noqa: F401  (re-exported: the pipeline's teacher API)


def build_model(arch: str, dataset: Dataset, seed: int) -> nn.Module:
    seed_everything(derive_seed(seed, "init", arch))
    return create_model(arch, dataset.info.num_classes, dataset.info.channels, dataset.info.size)


def train_teacher(dataset: Dataset, spec: TeacherSpec, runtime: Runtime = Runtime(),
                  checkpoint: Checkpoint | None = None, progress: ProgressFn | None = None) -> TrainResult:
    """Pretrain through the same kernel as post-evaluation; records test top-1.
    (A teacher with weights made elsewhere is loaded instead: ``load_pretrained``.)
    ``checkpoint``: saved to and resumed from (rd3core.checkpoint)."""
    if spec.loaded:
        raise ValueError(f"teacher {spec.arch!r} has {spec.source} weights: load it with load_pretrained")
    model = build_model(spec.arch, dataset, spec.seed)
    return train(model, dataset.train, dataset.info, spec.protocol(), HardLabels(), batch_size=spec.batch_size,
                 seed=spec.seed, runtime=runtime, test=dataset.test, checkpoint=checkpoint, progress=progress)


def make_labeler(spec: LabelSpec, teachers: list[nn.Module], distilled: DistilledSet, dataset: Dataset,
                 runtime: Runtime, stored: StoredLabels | None = None):
    if spec.mode == "hard":
        return HardLabels()
    if spec.mode == "stored":
        if stored is None:
            raise ValueError("labels.mode 'stored' needs the stored labels (rd3core.stored_labels.precompute)")
        return StoredLabeler(stored, runtime)
    ensemble = TeacherEnsemble([runtime.place(t) for t in teachers], spec.combine)
    if spec.mode == "static":
        clean = dataset.info.normalize(as_float(distilled.images.to(runtime.device)))
        return StaticLabels(ensemble, clean)
    return EpochwiseLabels(ensemble, reuse_within_block=spec.refresh_every > 1)


def label_teachers(protocol: Protocol, teachers: Mapping[str, nn.Module]) -> list[str]:
    """The teacher names that label under ``protocol`` (empty labels.teachers:
    the first teacher given)."""
    if protocol.labels.mode == "hard":
        return []
    names = list(protocol.labels.teachers) or list(teachers)[:1]
    missing = [n for n in names if n not in teachers]
    if missing or not names:
        raise ValueError(f"protocol labels need teachers {missing or ['<any>']}, given {list(teachers)}")
    return names


def resolve_batch_size(protocol: Protocol, distilled: DistilledSet, dataset: Dataset, ipc: int | None = None) -> int:
    num_classes = dataset.info.num_classes
    ipc = ipc or max(1, len(distilled.labels) // num_classes)
    return batch_size_for(protocol, ipc, num_classes, dataset.info.family)


def make_stored_labels(distilled: DistilledSet, dataset: Dataset, protocol: Protocol,
                       teachers: Mapping[str, nn.Module], seed: int, runtime: Runtime = Runtime(),
                       ipc: int | None = None, progress: ProgressFn | None = None) -> StoredLabels:
    """The `labels` stage: precompute what ``posteval`` under ``protocol`` with
    the same seed will replay (labels.mode 'stored')."""
    names = label_teachers(protocol, teachers)
    return precompute(distilled.images, distilled.labels, dataset.info, protocol, {n: teachers[n] for n in names},
                      batch_size=resolve_batch_size(protocol, distilled, dataset, ipc), seed=seed, runtime=runtime,
                      progress=progress)


def check_stored(stored: StoredLabels, distilled: DistilledSet, dataset: Dataset, protocol: Protocol,
                 teachers: Mapping[str, nn.Module], batch_size: int, seed: int) -> None:
    """Raise StoredLabelsMismatch unless ``stored`` was made for exactly this
    post-evaluation. Teacher weights are compared for the teachers given."""
    names = list(protocol.labels.teachers) or (list(teachers)[:1] if teachers else list(stored.signature["teachers"]))
    expected = signature(protocol, distilled.images, distilled.labels, dataset.info,
                         {n: teachers[n] for n in names if n in teachers}, batch_size=batch_size, seed=seed)
    expected["teachers"] = {n: expected["teachers"].get(n) for n in names}
    stored.check(expected)


def posteval(distilled: DistilledSet, dataset: Dataset, protocol: Protocol, teachers: Mapping[str, nn.Module],
             seed: int, runtime: Runtime = Runtime(), ipc: int | None = None,
             stored: StoredLabels | None = None, on_epoch: Callable[[dict], None] | None = None,
             checkpoint: Checkpoint | None = None, progress: ProgressFn | None = None,
             with_test: bool = True) -> dict[str, Any]:
    """Train a fresh student on ``distilled`` under ``protocol``; returns the
    metrics (``top1`` = final-epoch test accuracy), per-epoch history, timing
    (by phase) and the size of the soft labels a user must store to rerun it
    (``labels``: 0 for hard and on-the-fly labels).

    ``teachers`` maps architecture name to a trained model; the protocol's
    ``labels.teachers`` picks from it (empty: the first one given). With
    labels.mode 'stored', ``stored`` comes from the labels stage
    (:func:`make_stored_labels`); it is checked against this run and refused
    on any difference. When it is None the labels are precomputed here.
    A dataset with a held-out split (:func:`rd3core.data.carve_heldout`) is
    evaluated on it too, at every evaluated epoch (``eval.interval`` must be set),
    and ``top1_heldout_selected`` records the test accuracy at the epoch chosen
    on it. The student's training saves to and resumes from ``checkpoint``
    (rd3core.checkpoint), when given. ``progress`` hears of a stored-label
    precompute done here (batches), then of the training (epochs).
    ``with_test=False`` (a tuning trial) never evaluates on the test split:
    the metrics are the held-out ones alone, and a held-out split is required.
    """
    t0 = time.perf_counter()
    batch_size = resolve_batch_size(protocol, distilled, dataset, ipc)
    heldout, heldout_info = dataset.heldout, {}
    if heldout is None and not with_test:
        raise ValueError(f"dataset {dataset.info.name!r}: a post-evaluation without the test split selects on a "
                         "held-out split, and this dataset has none (rd3core.data.carve_heldout)")
    if heldout is not None:
        if not protocol.eval.interval:  # the final epoch alone leaves nothing to select
            raise ValueError(f"dataset {dataset.info.name!r} has a held-out split: selecting an epoch on it needs "
                             "eval.interval > 0")
        carved = dataset.record.get("heldout", {})
        heldout_info = {"heldout": {"per_class": carved.get("per_class"), "seed": carved.get("seed"),
                                    "images": len(heldout)}}
    labels_info: dict[str, Any] = {}
    t_labels = time.perf_counter()
    if protocol.labels.mode == "stored":
        if stored is None:
            stored = make_stored_labels(distilled, dataset, protocol, teachers, seed, runtime, ipc, progress)
        check_stored(stored, distilled, dataset, protocol, teachers, batch_size, seed)
        labels_info = dict(stored.meta)
        names = list(stored.signature["teachers"])
        labeler = make_labeler(protocol.labels, [], distilled, dataset, runtime, stored)
    else:
        names = label_teachers(protocol, teachers)
        labeler = make_labeler(protocol.labels, [teachers[n] for n in names], distilled, dataset, runtime)
        # What must be shipped with the set besides its images: nothing for hard labels or a
        # teacher relabelling on the fly; one fp32 teacher output per image for static labels.
        static = protocol.labels.mode == "static"
        labels_info = {"storage_bytes": len(distilled.labels) * dataset.info.num_classes * 4 if static else 0}
    t_labels = time.perf_counter() - t_labels  # static labels or a stored-label precompute done here
    student = build_model(protocol.student, dataset, seed)
    setup_s = time.perf_counter() - t0
    result = train(student, Split(distilled.images, distilled.labels), dataset.info, protocol, labeler,
                   batch_size=batch_size, seed=seed, runtime=runtime,
                   test=dataset.test.to(runtime.device) if with_test else None,
                   heldout=heldout.to(runtime.device) if heldout is not None else None, on_epoch=on_epoch,
                   checkpoint=checkpoint, progress=progress)
    timing = {"setup_s": setup_s, "labels_setup_s": t_labels, **result.timing}
    return {"metrics": dict(result.metrics), "epochs": result.epochs, "timing": timing, "labels": labels_info,
            "resolved": {"batch_size": batch_size, "teachers": names, **heldout_info}}
