"""The stage cache from the command line.

- ``run STUDY --dry-run``: what a run would do (per stage: runs needed and
  cached; cells) and what it would cost, from the recorded history of finished
  cells; reads the DB and the store, writes nothing.
- ``cache list``: every artifact (stage, key, size, age, what made it), every
  checkpoint of a job (stage, key, size, age, where it was taken) and any leftovers.
- ``cache gc [STUDY ...]``: always removes leftovers (quarantined corrupt
  artifacts, deletions and publishes that crashed: temporary folders and
  checkpoint files idle for longer than a grace period, so a publish or a
  checkpoint save in flight is never touched) and checkpoints whose stage's
  artifact is published (the job died between publishing and removing it);
  with studies named, also removes every artifact and checkpoint none of them
  needs (all their cells, finished or not). ``--dry-run`` only reports.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from db.queries import find_study, finished_cells
from db.session import DatabaseError, make_engine
from rd3core.artifacts import ArtifactInfo, ArtifactStore
from rd3core.checkpoint import saved_at

from .driver import RunOptions, check_capacity, db_url, pending_cells
from ..study.expand import Cell, expand
from .plan import Plan, build_plan
from ..study.spec import Study, StudyError, load_study
from ..study.teachers import missing_hub_weights

TMP_GRACE_S = 3600.0
HISTORY_METRICS = ["time_train_s", "time_eval_s", "synth_wall_s"]


def existing_engine(url: str) -> Engine | None:
    """An engine on the results DB only if it already exists: a dry run must not create one."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise DatabaseError(f"not a database URL: {url!r} ({exc})") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or not Path(parsed.database).is_file():
            return None
    return make_engine(url)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# --------------------------------------------------------------------------------------
# run --dry-run
# --------------------------------------------------------------------------------------

@dataclass
class History:
    rows: list[tuple[dict, dict[str, float]]]
    reason: str = ""  # why there is none, when there is none


def load_history(url: str) -> History:
    engine = existing_engine(url)
    if engine is None:
        return History([], f"no results database at {url} yet")
    try:
        rows = finished_cells(engine, HISTORY_METRICS)
    except SQLAlchemyError as exc:
        return History([], f"the results database {url} could not be read ({type(exc).__name__})")
    finally:
        engine.dispose()
    return History(rows, "" if rows else f"no finished cells in {url} yet")


def posteval_profile(config: dict) -> tuple:
    return (config["dataset"]["name"], config["protocol"]["student"], config["protocol"]["epochs"])


def synth_profile(config: dict) -> str:
    return repr((config["dataset"]["name"], sorted(config["method"].items())))


def estimate(todo: list[Cell], plan: Plan, history: History, store: ArtifactStore) -> list[str]:
    """Lines of the cost estimate: mean recorded times of matching past work."""
    post: dict[tuple, list[float]] = defaultdict(list)
    synth: dict[str, list[float]] = defaultdict(list)
    for config, metrics in history.rows:
        try:
            if "time_train_s" in metrics:
                post[posteval_profile(config)].append(metrics["time_train_s"] + metrics.get("time_eval_s", 0.0))
            if "synth_wall_s" in metrics:
                synth[synth_profile(config)].append(metrics["synth_wall_s"])
        except (KeyError, TypeError):
            continue  # a cell recorded by an older config layout
    lines: list[str] = []
    total = 0.0

    def report(stage: str, n: int, times: list[float], basis: str) -> None:
        nonlocal total
        if n == 0:
            return
        if not times:
            lines.append(f"  {stage:9s} no history: no finished run with the same {basis}; cannot estimate")
            return
        total += sum(times)
        missing = n - len(times)
        tail = f"; {missing} of {n} without history (not counted)" if missing else ""
        lines.append(f"  {stage:9s} ~{human_seconds(sum(times))} for {len(times)} run(s) (mean of past runs with the same "
                     f"{basis}){tail}")

    post_times = [statistics.fmean(post[posteval_profile(c.config)]) for c in todo if post.get(posteval_profile(c.config))]
    synth_nodes = [n for n in plan.nodes.values() if n.stage == "synth" and not n.cached]
    synth_times = []
    for node in synth_nodes:
        config = {"dataset": node.payload["dataset"], "method": node.payload["method"]}
        if synth.get(synth_profile(config)):
            synth_times.append(statistics.fmean(synth[synth_profile(config)]))
    # A loaded teacher costs one test evaluation: nothing to estimate from training runs.
    teacher_nodes = [n for n in plan.nodes.values() if n.stage == "teacher" and not n.cached
                     and "source" not in n.payload]
    teacher_times = []
    stored = [i for i in store.entries() if i.stage == "teacher"]
    for node in teacher_nodes:
        same = [i.meta.get("timing", {}).get("train_s") for i in stored if _same_teacher(i, node.payload)]
        same = [t for t in same if isinstance(t, (int, float))]
        if same:
            teacher_times.append(statistics.fmean(same))
    report("teacher", len(teacher_nodes), teacher_times, "dataset, arch and epochs (stored teachers)")
    report("synth", len(synth_nodes), synth_times, "dataset and method parameters")
    report("posteval", len(todo), post_times, "dataset, student and epochs")
    if not history.rows and not teacher_times:
        return [f"cost estimate: no history ({history.reason}); cannot estimate"]
    header = "cost estimate from past runs (compute time, before any parallelism):"
    return [header, *lines, f"  {'total':9s} ~{human_seconds(total)} for the parts with history"]


def _same_teacher(info: ArtifactInfo, payload: dict) -> bool:
    made = info.meta.get("params", {})
    try:
        return (made["dataset"]["name"] == payload["dataset"]["name"]
                and made["teacher"]["arch"] == payload["teacher"]["arch"]
                and made["teacher"]["epochs"] == payload["teacher"]["epochs"])
    except (KeyError, TypeError):
        return False


def dry_run(path: str | Path, options: RunOptions) -> int:
    study = load_study(path)
    cells = expand(study)
    check_capacity(study, options)
    url = db_url(options)
    store = ArtifactStore(options.out / "artifacts", readonly=True)
    todo, skipped = cells, {}
    engine = existing_engine(url)
    if engine is not None:
        try:
            todo, skipped = pending_cells(engine, study, cells, options.retry_failed)
        except SQLAlchemyError:
            pass  # no tables yet: everything is to run
        finally:
            engine.dispose()
    print(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo) - len(skipped)} already done, "
          + (f"{len(skipped)} failed before and skipped (--retry-failed runs them), " if skipped else "")
          + f"{len(todo)} to run (dry run: nothing is run or written)")
    if study.spec.design.kind == "tuned":
        tuning = study.spec.design.tuning
        n = len(study.methods)
        print(f"  and first the search: {tuning.budget.describe()} for each of {n} method{'s' * (n != 1)}, "
              f"then the chosen recipes' {len(study.methods) * len(study.spec.seeds)} cells (the trials stored "
              "are replayed, not run)")
    plan = build_plan(todo, store)
    loaded, trained = plan.loaded_teachers()
    for stage, (need, cached) in plan.counts().items():
        # Teachers with weights made elsewhere are loaded and measured, never trained.
        detail = f"  ({loaded} to load from their weights, {trained} to train)" if stage == "teacher" and loaded else ""
        print(f"  {stage:9s} {need:4d} to run, {cached:4d} cached{detail}")
    for line in missing_hub_weights(study, plan):
        print(f"warning: {line}", file=sys.stderr)
    if todo:
        for line in estimate(todo, plan, load_history(url), store):
            print(line)
    return 0


# --------------------------------------------------------------------------------------
# cache list / gc
# --------------------------------------------------------------------------------------

def describe(params: Any) -> str:
    """A one-line summary of the payload that produced an artifact: names first,
    then its own scalars and upstream keys, then nested settings."""
    if not isinstance(params, dict):
        return "-"
    head, mid, tail = [], [], []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, dict) and "stage" in value and "key" in value:
            mid.append(f"{key}={str(value['key'])[:8]}")
        elif isinstance(value, dict):
            head += [str(value[k]) for k in ("name", "arch") if value.get(k) is not None]
            tail += [f"{k}={v}" for k, v in value.items()
                     if k not in ("name", "arch", "root") and isinstance(v, (int, float, str, bool))]
        elif isinstance(value, (int, float, str, bool)):
            mid.append(f"{key}={value}")
    text = " ".join(head + mid + tail)
    return text if len(text) <= 100 else text[:97] + "..."


def list_cache(out: Path) -> int:
    store = ArtifactStore(out / "artifacts", readonly=True)
    now = time.time()
    entries = list(store.entries())
    if not entries:
        print(f"no artifacts under {store.root}")
    else:
        print(f"{'stage':8s} {'key':24s} {'size':>9s} {'age':>5s}  made with")
        for info in entries:
            print(f"{info.stage:8s} {info.key:24s} {human_bytes(info.bytes):>9s} {human_age(now - info.created):>5s}"
                  f"  {describe(info.meta.get('params'))}")
        by_stage: dict[str, list[ArtifactInfo]] = defaultdict(list)
        for info in entries:
            by_stage[info.stage].append(info)
        summary = ", ".join(f"{s} {len(v)} ({human_bytes(sum(i.bytes for i in v))})" for s, v in by_stage.items())
        print(f"{len(entries)} artifacts: {summary}")
    checkpoints = list(store.checkpoints())
    for ckpt in checkpoints:
        print(f"checkpoint {ckpt.stage:8s} {ckpt.key:24s} {human_bytes(ckpt.bytes):>9s} "
              f"{human_age(now - ckpt.mtime):>5s}  at {saved_at(ckpt.path) or '(unreadable)'}")
    if checkpoints:
        print(f"{len(checkpoints)} checkpoints ({human_bytes(sum(c.bytes for c in checkpoints))}) of jobs that "
              "have not finished: a rerun resumes from them")
    leftovers = list(store.leftovers())
    for left in leftovers:
        print(f"leftover {left.kind:8s} {left.path}  {human_bytes(left.bytes)}, idle {human_age(now - left.mtime)}")
    if leftovers:
        print(f"{len(leftovers)} leftovers ({human_bytes(sum(x.bytes for x in leftovers))}): "
              "python -m orchestrator cache gc removes them")
    return 0


def resolve_study(ref: str, url: str) -> Study:
    """A study by file path, or by the name it was recorded under in the DB."""
    path = Path(ref)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return load_study(path)
    engine = existing_engine(url)
    row = None
    if engine is not None:
        try:
            row = find_study(engine, ref)
        except SQLAlchemyError:
            row = None
        finally:
            engine.dispose()
    if row is None:
        raise StudyError([f"{ref}: no such study file, and no study named {ref!r} in {url}"])
    return load_study(Path(f"{ref}.yaml"), text=row.spec_text)


def gc_cache(out: Path, studies: list[str], url: str, dry_run: bool = False, tmp_grace_s: float = TMP_GRACE_S) -> int:
    # Every named study is resolved and planned before anything is deleted: a
    # study that fails to load stops gc with nothing removed.
    store = ArtifactStore(out / "artifacts", readonly=dry_run)
    keep: set[tuple[str, str]] = set()
    nodes: set[tuple[str, str]] = set()  # every job of the named studies, post-evaluations too
    for ref in studies:
        study = resolve_study(ref, url)
        plan = build_plan(expand(study), ArtifactStore(store.root, readonly=True))
        keep |= plan.artifacts()
        nodes |= {(n.stage, n.key) for n in plan.nodes.values()}
    verb = "would remove" if dry_run else "removed"
    now = time.time()
    removed = freed = 0
    for left in store.leftovers():
        if left.kind == "tmp" and now - left.mtime < tmp_grace_s:
            print(f"kept leftover {left.path} (written {human_age(now - left.mtime)} ago: maybe a publish in progress)")
            continue
        if not dry_run:
            _rmtree(left.path)
        print(f"{verb} leftover {left.kind} {left.path} ({human_bytes(left.bytes)})")
        removed, freed = removed + 1, freed + left.bytes
    for ckpt in list(store.checkpoints()):
        if store.exists(ckpt.stage, ckpt.key):
            why = "its artifact is published"
        elif studies and (ckpt.stage, ckpt.key) not in nodes:
            why = "no study named needs it"
        else:
            continue
        if not dry_run:
            store.checkpoint(ckpt.stage, ckpt.key).remove()
        print(f"{verb} checkpoint {ckpt.stage} {ckpt.key} ({human_bytes(ckpt.bytes)}): {why}")
        removed, freed = removed + 1, freed + ckpt.bytes
    kept = 0
    for info in list(store.entries()):
        if not studies or (info.stage, info.key) in keep:
            kept += 1
            continue
        if dry_run or store.remove(info.stage, info.key):
            print(f"{verb} {info.stage} {info.key} ({human_bytes(info.bytes)}): "
                  f"{describe(info.meta.get('params'))}")
            removed, freed = removed + 1, freed + info.bytes
    scope = f"needed by {', '.join(studies)}" if studies else "(no study named: only leftovers are removed)"
    print(f"{verb} {removed} item(s), {human_bytes(freed)}; kept {kept} artifact(s) {scope}")
    return 0


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:  # a checkpoint save's temporary file
        path.unlink(missing_ok=True)
