"""What a worker runs for one plan node. Workers never touch the database:
stage outputs go to the artifact store, and everything else (metrics, timings,
provenance) returns to the driver as plain data.
"""
from __future__ import annotations

import functools
import os
import platform
import socket
import time
from typing import Any

import torch

from rd3core.artifacts import ArtifactStore
from rd3core.config import build
from rd3core.data import Dataset, load_dataset
from rd3core.loop import Runtime
from rd3core.pipeline import TeacherSpec, build_model, make_stored_labels, posteval, train_teacher
from rd3core.protocol import Protocol
from rd3core.stored_labels import StoredLabels
from rd3core.synth import METHODS, DistilledSet, synthesize


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None) -> Dataset:
    # Reused Ray workers keep the decoded dataset between jobs.
    return load_dataset(name, root)


def _get_dataset(spec: dict) -> Dataset:
    return _dataset(spec["name"], spec.get("root"))


class MissingArtifact(RuntimeError):
    """An upstream stage's artifact vanished or failed its hash check."""


_TEACHERS: dict[tuple[str, str, str], torch.nn.Module] = {}


def load_teacher(store_root: str, ref: dict, dataset: dict, runtime: Runtime) -> torch.nn.Module:
    """A trained teacher from the store, kept per worker: its key is a content
    hash of everything that made it, so the key alone identifies it."""
    cache_key = (store_root, ref["key"], runtime.device)
    if cache_key not in _TEACHERS:
        spec = build(TeacherSpec, ref["spec"])
        state = ArtifactStore(store_root).load("teacher", ref["key"])
        if state is None:
            raise MissingArtifact(f"teacher artifact {ref['key']} is missing or corrupt under {store_root}")
        model = build_model(spec.arch, _get_dataset(dataset), spec.seed)
        model.load_state_dict(state["state_dict"])
        if len(_TEACHERS) >= 8:
            _TEACHERS.pop(next(iter(_TEACHERS)))
        _TEACHERS[cache_key] = model.to(runtime.device).eval()
    return _TEACHERS[cache_key]


def _load_distilled(store: ArtifactStore, payload: dict, store_root: str) -> DistilledSet:
    state = store.load("synth", payload["synth_key"])
    if state is None:
        raise MissingArtifact(f"distilled set {payload['synth_key']} is missing or corrupt under {store_root}")
    return DistilledSet.from_state(state)


def environment() -> dict[str, Any]:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run_node(stage: str, key: str, payload: dict, store_root: str, threads: int,
             runtime: Runtime | None = None) -> dict[str, Any]:
    """Execute one node; returns plain data for the driver."""
    torch.set_num_threads(max(1, int(threads)))  # same thread count in every executor: same numbers
    runtime = runtime or Runtime.auto()
    store = ArtifactStore(store_root)
    dataset = _get_dataset(payload["dataset"])
    t0 = time.perf_counter()
    out: dict[str, Any] = {"stage": stage, "key": key, "env": environment(), "runtime": runtime.__dict__}
    if stage == "teacher":
        if not store.exists("teacher", key):
            spec = build(TeacherSpec, payload["teacher"])
            result = train_teacher(dataset, spec, runtime)
            state = {"state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()}}
            store.save("teacher", key, state, {"metrics": result.metrics, "timing": result.timing,
                                               "dataset": dataset.record})
            out["metrics"] = result.metrics
    elif stage == "synth":
        if not store.exists("synth", key):
            method = METHODS.get(payload["method"]["name"])
            params = build(method.params, {k: v for k, v in payload["method"].items() if k != "name"})
            teacher = load_teacher(store_root, payload["teacher"], payload["dataset"], runtime) \
                if payload.get("teacher") else None
            distilled = synthesize(method.name, dataset, teacher, params, payload["seed"], runtime)
            store.save("synth", key, distilled.state(), distilled.meta)
            out["meta"] = distilled.meta
    elif stage == "labels":
        if not store.exists("labels", key):
            distilled = _load_distilled(store, payload, store_root)
            teachers = {arch: load_teacher(store_root, ref, payload["dataset"], runtime)
                        for arch, ref in payload["teachers"].items()}
            stored = make_stored_labels(distilled, dataset, build(Protocol, payload["protocol"]), teachers,
                                        payload["seed"], runtime, payload.get("ipc"))
            store.save("labels", key, stored.state(), stored.meta)
            out["meta"] = stored.meta
    elif stage == "posteval":
        distilled = _load_distilled(store, payload, store_root)
        protocol = build(Protocol, payload["protocol"])
        teachers = {arch: load_teacher(store_root, ref, payload["dataset"], runtime)
                    for arch, ref in payload["teachers"].items()}
        stored = None
        if payload.get("labels_key"):
            state = store.load("labels", payload["labels_key"])
            if state is None:
                raise MissingArtifact(f"stored labels {payload['labels_key']} are missing or corrupt "
                                      f"under {store_root}")
            stored = StoredLabels.from_state(state)
        result = posteval(distilled, dataset, protocol, teachers, payload["seed"], runtime, payload.get("ipc"),
                          stored=stored)
        out.update(result)
        out["synth_meta"] = distilled.meta
        out["dataset"] = dataset.record
    else:
        raise ValueError(f"unknown stage {stage!r}")
    out["wall_s"] = time.perf_counter() - t0
    return out
