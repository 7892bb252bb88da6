"""What a worker runs for one plan node. Workers never touch the database:
stage outputs go to the artifact store, and everything else (metrics, timings,
provenance) returns to the driver as plain data.

Every stored stage has a *producer* (``@producer("teacher")``) that turns the
node's payload into the artifact's state. :func:`ensure` loads an artifact
through the store's hash check and, when it is missing, truncated or corrupt,
rebuilds it with its producer (recursively for its own upstream refs) instead of
failing; every build is reported back in ``result["built"]``.

Checkpoints: a job with ``checkpoint_every`` seconds gives each stage it builds
(and its post-evaluation) a :class:`rd3core.checkpoint.Checkpoint` in the
artifact store's checkpoint area under the stage key, so a retried, preempted
or rerun job resumes from the newest one (``result["resumed"]`` says where);
the checkpoint is removed once the stage's artifact is published (for a
post-evaluation: once its result is in hand).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from rd3core.artifacts import MANIFEST, ArtifactStore
from rd3core.checkpoint import Checkpoint
from rd3core.config import build
from rd3core.data import HELDOUT_SEED, Dataset, carve_heldout, load_dataset
from rd3core.loop import ProgressFn, Runtime
from rd3core.pipeline import TeacherSpec, build_model, make_stored_labels, posteval, train_teacher
from rd3core.protocol import Protocol
from rd3core.stored_labels import StoredLabels
from rd3core.synth import METHODS, DistilledSet, synthesize
from rd3core.teachers import load_pretrained, network_of, teacher_model


@functools.lru_cache(maxsize=4)
def _loaded(name: str, root: str | None) -> Dataset:
    # Reused Ray workers keep the decoded dataset between jobs.
    return load_dataset(name, root)


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, heldout_per_class: int, heldout_seed: int) -> Dataset:
    # Carved once per worker from the one decoded copy: every stage of a carved
    # dataset (teacher, synth, labels, posteval) sees the same carved train split.
    return carve_heldout(_loaded(name, root), heldout_per_class, heldout_seed)


def _get_dataset(spec: dict) -> Dataset:
    """The dataset a payload names (DatasetSpec.identified), carved when it says so."""
    return _dataset(spec["name"], spec.get("root"), spec.get("heldout_per_class", 0),
                    spec.get("heldout_seed", HELDOUT_SEED))


@dataclass
class Context:
    store: ArtifactStore
    runtime: Runtime
    built: list[dict] = field(default_factory=list)  # every stage this job (re)built
    checkpoint_every: float | None = None  # seconds between checkpoints of a long loop; None or 0: none
    resumed: list[dict] = field(default_factory=list)  # every stage this job resumed from a checkpoint
    report: Callable[[str], ProgressFn] | None = None  # stage -> where its loops report (worker.Reporter)

    def checkpoint(self, stage: str, key: str) -> Checkpoint | None:
        """The hook the stage's long loop saves to and resumes from (None: checkpoints off)."""
        if not self.checkpoint_every:
            return None
        return Checkpoint(self.store.checkpoint(stage, key), self.checkpoint_every)

    def finished(self, stage: str, key: str, checkpoint: Checkpoint | None) -> dict:
        """The stage's output is safe: its checkpoint has served (one left by an
        earlier run with checkpoints on, too). Returns what the checkpoint did."""
        self.store.checkpoint(stage, key).remove()
        if checkpoint is None:
            return {}
        if checkpoint.resumed_at is not None:
            self.resumed.append({"stage": stage, "key": key, "at": checkpoint.resumed_at})
        elif checkpoint.ignored is not None:
            print(f"checkpoint of {stage} {key} not resumed from: {checkpoint.ignored}", file=sys.stderr)
        return {"checkpoint_saves": checkpoint.saves, "checkpoint_s": checkpoint.save_s}

    def progress(self, stage: str) -> ProgressFn | None:
        """The progress callback for ``stage``'s loops; None when nobody listens."""
        return self.report(stage) if self.report is not None else None


# payload, checkpoint hook (None: none) -> (state to store, manifest meta)
Producer = Callable[[Context, dict, Checkpoint | None], tuple[Any, dict]]
PRODUCERS: dict[str, Producer] = {}


def producer(stage: str):
    def deco(fn: Producer) -> Producer:
        PRODUCERS[stage] = fn
        return fn
    return deco


def ensure(ctx: Context, ref: dict, load: bool = True) -> Any:
    """The verified state of artifact ``ref``, built first if missing or corrupt.
    ``load=False`` only makes sure it is in the store (returns None)."""
    stage, key = ref["stage"], ref["key"]
    recorded = _recorded_threads(ctx.store, stage, key)  # read before a damaged copy is quarantined
    if load:
        state = ctx.store.load(stage, key)
        if state is not None:
            return state
    elif ctx.store.info(stage, key, verify=True) is not None:
        return None
    t0 = time.perf_counter()
    checkpoint = ctx.checkpoint(stage, key)
    with _threads(recorded):
        state, meta = PRODUCERS[stage](ctx, ref["payload"], checkpoint)
        threads = torch.get_num_threads()
    ctx.store.save(stage, key, state, {**meta, "threads": threads, "params": _summary(ref["payload"])})
    saves = ctx.finished(stage, key, checkpoint)
    ctx.built.append({"stage": stage, "key": key, "wall_s": time.perf_counter() - t0,
                      "meta": {**_numeric(meta), **saves}})
    return state


def _recorded_threads(store: ArtifactStore, stage: str, key: str) -> int | None:
    """The thread count a damaged artifact was built with, from its manifest. CPU
    reductions round differently with another thread count, so a rebuild inside a
    job that holds fewer CPUs than the plan gave the original (a critical-path
    teacher rebuilt by a one-CPU post-evaluation) repeats the original's count to
    give the same bytes."""
    try:
        threads = json.loads((store.path(stage, key) / MANIFEST).read_text())["meta"]["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return threads if isinstance(threads, int) and threads > 0 else None


@contextlib.contextmanager
def _threads(count: int | None):
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _summary(payload: Any) -> Any:
    """The producing payload for the manifest, with upstream refs cut to their keys."""
    if isinstance(payload, dict):
        if {"stage", "key", "payload"} <= set(payload):
            return {"stage": payload["stage"], "key": payload["key"]}
        return {k: _summary(v) for k, v in payload.items()}
    return payload


def _numeric(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_TEACHERS: dict[tuple[str, str, str], torch.nn.Module] = {}


def load_teacher(ctx: Context, ref: dict) -> torch.nn.Module:
    """A trained teacher from the store, kept per worker: its key is a content
    hash of everything that made it, so the key alone identifies it."""
    cache_key = (str(ctx.store.root), ref["key"], ctx.runtime.device)
    if cache_key not in _TEACHERS:
        state = ensure(ctx, ref)
        spec = build(TeacherSpec, ref["payload"]["teacher"])
        dataset = _get_dataset(ref["payload"]["dataset"])
        if spec.loaded:  # the stored network, seen through the dataset's normalisation and classes
            model, network = teacher_model(spec, dataset)
        else:
            model = network = build_model(spec.arch, dataset, spec.seed)
        network.load_state_dict(state["state_dict"])
        if len(_TEACHERS) >= 8:
            _TEACHERS.pop(next(iter(_TEACHERS)))
        _TEACHERS[cache_key] = model.to(ctx.runtime.device).eval()
    return _TEACHERS[cache_key]


@producer("teacher")
def make_teacher(ctx: Context, payload: dict, checkpoint: Checkpoint | None) -> tuple[Any, dict]:
    """Train the teacher, or load its weights made elsewhere (nothing trained;
    the test top-1 measured once). The stored state is the network's own."""
    dataset = _get_dataset(payload["dataset"])
    spec = build(TeacherSpec, payload["teacher"])
    source = None
    if spec.loaded:
        result, source = load_pretrained(dataset, spec, ctx.runtime, payload["source"].get("sha256"))
    else:
        result = train_teacher(dataset, spec, ctx.runtime, checkpoint, ctx.progress("teacher"))
    network = network_of(result.model)
    state = {"state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}}
    meta = {"metrics": result.metrics, "timing": result.timing, "dataset": dataset.record}
    return state, meta if source is None else {**meta, "source": source}


@producer("synth")
def make_synth(ctx: Context, payload: dict, checkpoint: Checkpoint | None) -> tuple[Any, dict]:
    dataset = _get_dataset(payload["dataset"])
    method = METHODS.get(payload["method"]["name"])
    params = build(method.params, {k: v for k, v in payload["method"].items() if k != "name"})
    teacher = load_teacher(ctx, payload["teacher"]) if payload.get("teacher") else None
    distilled = synthesize(method.name, dataset, teacher, params, payload["seed"], ctx.runtime, checkpoint,
                           ctx.progress("synth"))
    return distilled.state(), distilled.meta


@producer("labels")
def make_labels(ctx: Context, payload: dict, checkpoint: Checkpoint | None) -> tuple[Any, dict]:
    # Not checkpointed: the precompute is one teacher pass per epoch of views,
    # short beside the post-evaluation that replays it.
    dataset = _get_dataset(payload["dataset"])
    distilled = DistilledSet.from_state(ensure(ctx, payload["synth"]))
    teachers = {arch: load_teacher(ctx, ref) for arch, ref in payload["teachers"].items()}
    stored = make_stored_labels(distilled, dataset, build(Protocol, payload["protocol"]), teachers,
                                payload["seed"], ctx.runtime, payload.get("ipc"), ctx.progress("labels"))
    return stored.state(), stored.meta


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Versions of what computes the numbers, as installed on this worker (the
    project itself from pyproject.toml when run from a checkout, not installed)."""
    versions: dict[str, str | None] = {}
    for name in ("torchvision", "timm", "ray", "rd3bench"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if versions["rd3bench"] is None and pyproject.is_file():
        import tomllib

        versions["rd3bench"] = tomllib.loads(pyproject.read_text())["project"]["version"]
    return versions


def environment() -> dict[str, Any]:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), **package_versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    ray = sys.modules.get("ray")  # only inside a Ray worker; never imported here otherwise
    if ray is not None and ray.is_initialized():
        info["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return info


def run_node(stage: str, key: str, payload: dict, store_root: str, threads: int,
             runtime: Runtime | None = None, checkpoint_every: float | None = None,
             report: Callable[[str], ProgressFn] | None = None) -> dict[str, Any]:
    """Execute one node; returns plain data for the driver. ``built`` lists every
    stage actually computed (empty when the artifact was already in the store),
    ``resumed`` every stage resumed from a checkpoint. ``report``: stage -> the
    progress callback its loops report to."""
    torch.set_num_threads(max(1, int(threads)))  # same thread count in every executor: same numbers
    runtime = runtime or Runtime.auto()
    ctx = Context(ArtifactStore(store_root), runtime, checkpoint_every=checkpoint_every, report=report)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"stage": stage, "key": key, "env": environment(), "runtime": runtime.__dict__,
                           "started_at": datetime.now(timezone.utc).isoformat()}
    if stage in PRODUCERS:
        ensure(ctx, {"stage": stage, "key": key, "payload": payload}, load=False)
    elif stage == "posteval":
        dataset = _get_dataset(payload["dataset"])
        distilled = DistilledSet.from_state(ensure(ctx, payload["synth"]))
        protocol = build(Protocol, payload["protocol"])
        teachers = {arch: load_teacher(ctx, ref) for arch, ref in payload["teachers"].items()}
        stored = StoredLabels.from_state(ensure(ctx, payload["labels"])) if payload.get("labels") else None
        checkpoint = ctx.checkpoint(stage, key)
        result = posteval(distilled, dataset, protocol, teachers, payload["seed"], runtime, payload.get("ipc"),
                          stored=stored, checkpoint=checkpoint, progress=ctx.progress("posteval"),
                          with_test=payload.get("test", True))
        out["checkpoint"] = ctx.finished(stage, key, checkpoint)
        out.update(result)
        out["synth_meta"] = distilled.meta
        out["dataset"] = dataset.record
    else:
        raise ValueError(f"unknown stage {stage!r}")
    out["built"] = ctx.built
    out["resumed"] = ctx.resumed
    out["wall_s"] = time.perf_counter() - t0
    return out
