"""`run`: validate, expand, plan, execute, record, summarise.

The driver is the only process that writes the database. A rerun skips every
cell that already has a result, every cell whose last attempt failed
deterministically (unless ``--retry-failed``), and every stage whose artifact is
in the store, so a finished study reruns in seconds and a crashed or stopped one
resumes where it stopped. Failures and their classification: orchestrator.execution.failures
and docs/EXECUTION.md.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from db import records
from db.models import CellStatus
from db.models import Study as StudyRow
from db.queries import attempts_frame, cell_status
from db.schema import upgrade
from db.session import make_engine, results_url, session_scope
from rd3core.artifacts import ArtifactStore
from rd3core.config import Problem

from . import failures
from ..analysis.commands import summarise
from .jobprogress import run_file, write_run_file
from ..study.expand import Cell, expand, tuned_cells
from .plan import Node, assign_resources, build_plan
from .recorder import Announcing, Recorder
from .search import SearchRun, probe_cells
from .runner import LocalExecutor, Outcome, Progress, RayExecutor, embedded_size, execute
from ..study.spec import Study, StudyError, load_study, render
from ..study.teachers import fetch_hub_weights, uses_hub_weights


@dataclass(frozen=True)
class RunOptions:
    out: Path = Path("results")
    db: str | None = None
    executor: str = "ray"
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    max_retries: int = 2  # reruns of a job after a transient failure, in this run
    retry_failed: bool = False  # also rerun cells whose last attempt failed deterministically
    heartbeat_s: float = 5.0  # job heartbeat period (Ray); a job silent for 12 periods is lost
    command: str | None = None  # the command line that started this run (for the messages)


class Stopped(KeyboardInterrupt):
    """The driver was asked to stop (SIGINT: Ctrl-C, SIGTERM: a scheduler)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # 130 for Ctrl-C, as shells report it


@contextmanager
def stop_on_signals():
    """SIGTERM stops the run like Ctrl-C (a cluster scheduler's way to say stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def deferred_interrupts():
    """While the stopping run records its in-flight attempts, a second Ctrl-C
    waits for that short write instead of leaving them "running"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def db_url(options: RunOptions) -> str:
    return results_url(options.db, options.out)


def cell_label(cell: Cell) -> str:
    parts = [f"{k}={v}" for k, v in cell.factors.items()]
    return f"{cell.key[:10]} " + " ".join(parts + [f"seed={cell.seed}"])


def command_of(path: str | Path, options: RunOptions) -> str:
    if options.command:
        return options.command
    text = f"python -m orchestrator run {path} --out {options.out}"
    return text + (f" --executor {options.executor}" if options.executor != "ray" else "")


def failed_before(engine, study: Study) -> dict[str, tuple[str | None, str | None]]:
    """cell key -> (error type, message) of its last attempt, for failed cells."""
    frame = attempts_frame(engine, study.name)
    frame = frame[frame.status == CellStatus.failed.value]
    return {r.cell_key: (r.error_type, r.error_message) for r in frame.itertuples(index=False)}


def embedded_capacity(study: Study, options: RunOptions) -> tuple[int, int] | None:
    """(CPUs, GPUs) of the Ray instance this run would start; None when it joins a
    cluster (which may grow) or runs jobs in-process."""
    if options.executor != "ray" or options.address or os.environ.get("RAY_ADDRESS"):
        return None
    limits = study.spec.resources
    return embedded_size(options.num_cpus or limits.max_cpus,
                         options.num_gpus if options.num_gpus is not None else limits.max_gpus)


def check_capacity(study: Study, options: RunOptions) -> None:
    """A job that asks for more than the embedded instance has would stay pending
    forever: refuse the study up front, naming the key (nothing written yet)."""
    size = embedded_capacity(study, options)
    problems = [Problem(f"resources.{key}", message)
                for key, message in study.spec.resources.capacity_problems(*size)] if size else []
    if problems:
        raise StudyError(render(study.source, problems))


def pending_cells(engine, study: Study, cells: list[Cell], retry_failed: bool
                  ) -> tuple[list[Cell], dict[str, tuple[str | None, str | None]]]:
    """The cells a run would run, and those it skips: cells whose last attempt
    failed deterministically (key -> error type, message), unless ``retry_failed``."""
    status = cell_status(engine, study.name)
    skipped = {} if retry_failed else {
        k: e for k, e in failed_before(engine, study).items() if status.get(k) == CellStatus.failed.value
        and not failures.rerun_by_default(*e)}
    return [c for c in cells if status.get(c.key) != CellStatus.done.value and c.key not in skipped], skipped


def run_study(path: str | Path, options: RunOptions) -> int:
    t_start = time.perf_counter()
    study = load_study(path)
    cells = expand(study)
    check_capacity(study, options)
    if uses_hub_weights(cells):  # torchvision/timm weights of teachers not stored yet, before anything is written
        fetch_hub_weights(study, build_plan(cells, ArtifactStore(options.out / "artifacts", readonly=True)))
    options.out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(db_url(options))
    upgrade(engine)  # before any job runs; refuses a database from newer code
    store = ArtifactStore(options.out / "artifacts")
    with session_scope(engine) as s:
        row = records.ensure_study(s, study.name, study.text, study.text_hash)
        study_id = row.id
        ids = records.sync_cells(s, row, [{"cell_key": c.key, "seed": c.seed, "factors": c.factors,
                                           "config": c.config} for c in cells])
        stale = records.abandon_attempts(s, study_id, "the driver stopped before this attempt finished")
    if study.spec.design.kind == "tuned":
        try:
            with stop_on_signals():
                tuned = run_search(study, engine, study_id, store, options)
        except Stopped as exc:
            print(f"\nstopped ({exc}) during the search: the trials stored so far are kept; the trial in flight "
                  f"was recorded as interrupted.\nresume with: {command_of(path, options)}", file=sys.stderr)
            return exc.exit_status
        if tuned is None:
            return 1
        cells += tuned
        with session_scope(engine) as s:
            ids = records.sync_cells(s, s.get(StudyRow, study_id), [
                {"cell_key": c.key, "seed": c.seed, "factors": c.factors, "config": c.config} for c in tuned])
    todo, skipped = pending_cells(engine, study, cells, options.retry_failed)
    by_key = {c.key: c for c in cells}
    command = command_of(path, options)
    print(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo) - len(skipped)} already done, "
          + (f"{len(skipped)} failed before and skipped (--retry-failed runs them), " if skipped else "")
          + f"{len(todo)} to run")
    if stale:
        print(f"  {stale} attempt(s) left running by a stopped driver recorded as failed")
    failed: dict[str, tuple[Cell, Outcome]] = {}
    if todo:
        try:
            with stop_on_signals():
                run_cells(study, todo, ids, by_key, engine, store, options, failed, t_start)
        except Stopped as exc:
            print(f"\nstopped ({exc}): results committed so far are kept; the jobs in flight were cancelled and "
                  f"recorded as interrupted.\nresume with: {command}", file=sys.stderr)
            return exc.exit_status
    if not failed and not skipped:
        with session_scope(engine) as s:
            records.finish_study(s, study_id)
    summarise(engine, study, options.out)
    if failed or skipped:
        report_failures(study, [(c, o.failure, o.tries) for c, o in failed.values()],
                        [(by_key[k], failures.Failure(t or "Error", m or "")) for k, (t, m) in skipped.items()],
                        command, options)
        return 1
    return 0


def run_search(study: Study, engine, study_id: int, store: ArtifactStore, options: RunOptions) -> list[Cell] | None:
    """A tuned design's search (orchestrator.execution.search), then the cells of
    the recipes it chose; None when a method's search did not spend its budget
    (stopped: a rerun resumes it), so that no method is compared on less tuning."""
    # First the teachers and distilled sets every method's trials share (one each,
    # at the search's seed), with the planned resources and the progress display
    # of any stage: a trial then trains only its post-evaluation.
    print("stages the search's trials share:")
    run_cells(study, probe_cells(study), {}, {}, engine, store, options, {}, time.perf_counter(),
              stages=("teacher", "synth"))
    limits = study.spec.resources
    searches = SearchRun(study, engine, study_id, store).run(
        options.address, options.num_cpus or limits.max_cpus,
        options.num_gpus if options.num_gpus is not None else limits.max_gpus)
    budget = study.spec.design.tuning.budget
    short = {label: budget.progress(s.trials) for label, s in searches.items() if not budget.exhausted(s.trials)}
    if short:
        print(f"the search did not spend the same budget for every method ({budget.describe()}; "
              + ", ".join(f"{label}: {n}" for label, n in short.items())
              + f"): no tuned recipe is run. resume with: {command_of(study.source.path, options)}", file=sys.stderr)
        return None
    chosen = {label: (s.chosen["values"], s.chosen["key"]) for label, s in searches.items() if s.chosen}
    return tuned_cells(study, chosen)


def run_cells(study: Study, todo: list[Cell], ids: dict[str, int], by_key: dict[str, Cell], engine,
              store: ArtifactStore, options: RunOptions, failed: dict, t_start: float,
              stages: tuple[str, ...] | None = None) -> None:
    """Plan and execute ``todo``, committing each outcome as it arrives; cells
    that failed for good land in ``failed``. Ctrl-C / SIGTERM (Stopped) leave
    it after recording the attempts in flight as interrupted. ``stages``: run
    only the plan's nodes of these stages (the artifacts a search's trials
    share), no post-evaluation."""
    plan = assign_resources(build_plan(todo, store), study.spec.resources)
    if stages is not None:
        plan.nodes = {nid: n for nid, n in plan.nodes.items() if n.stage in stages}
    for stage, (need, cached) in plan.counts().items():
        print(f"  {stage:9s} {need:4d} to run, {cached:4d} cached")
    progress = Progress(0 if stages is not None else len(todo),
                        stages={s: need for s, (need, _) in plan.counts().items()})
    recorder = Recorder(engine, store, plan, ids, {c.key: c.seed for c in todo})
    built: Counter[str] = Counter()
    jobs: list[dict] = []
    progress_file = run_file(options.out, study.name)

    def on_progress(running: list[tuple[Node, dict | None]]) -> None:
        """Where the running jobs are: the display, the cells' epoch rows, the file `status` reads."""
        progress.jobs([(node.id, node.stage, node.key, record) for node, record in running])
        recorder.epochs([(node, record.get("rows", [])) for node, record in running
                         if record is not None and record.get("stage") == node.stage == "posteval"
                         and record.get("unit") == "epoch"])
        try:
            write_run_file(progress_file, {**progress.snapshot(), "updated": time.time(), "pid": os.getpid(),
                                           "host": socket.gethostname()})
        except OSError as exc:  # a full disk stops the file, not the run
            print(f"warning: could not write {progress_file}: {exc}", file=sys.stderr)

    def on_outcome(outcome: Outcome) -> None:
        node = outcome.node
        progress.job_done(node.id)
        if outcome.wall_s is not None:
            jobs.append({"stage": node.stage, "key": node.key, "ok": outcome.failure is None,
                         "wall_s": outcome.wall_s, **outcome.job})
        for entry in (outcome.result or {}).get("built", []):
            built[entry["stage"]] += 1
            if entry["key"] != node.key:  # an upstream artifact was missing or corrupt
                print(f"    {entry['stage']} {entry['key'][:10]} rebuilt (missing or corrupt in the store)",
                      flush=True)
        for entry in (outcome.result or {}).get("resumed", []):
            print(f"    resumed {entry['stage']} {entry['key'][:10]} from {entry['at']}", flush=True)
        if outcome.retrying:
            progress.note(f"    {node.stage} {node.key[:10]} failed ({outcome.failure.type}: "
                          f"{_first_line(outcome.failure.message)}); transient: retrying "
                          f"(run {outcome.tries + 1} of at most {options.max_retries + 1})")
        if node.stage != "posteval":
            if outcome.failure is None:
                recorder.stage_done(node)
                if not any(e["key"] == node.key for e in outcome.result.get("built", [])):
                    # published meanwhile by another run sharing the store
                    print(f"    {node.stage} {node.key[:10]} found in the store", flush=True)
            if not outcome.retrying:
                progress.stage(node.stage, node.key, outcome.wall_s, outcome.error)
            return
        cell = by_key[node.key]
        if outcome.failure is None:
            recorder.cell_done(outcome, result_metrics(outcome.result, outcome.wall_s, node.resources))
            progress.cell(cell_label(cell), True, f"top1={100 * outcome.result['metrics']['top1']:.2f}%")
        else:
            recorder.cell_failed(outcome)
            if not outcome.retrying:
                failed[node.key] = (cell, outcome)
                progress.cell(cell_label(cell), False, _first_line(outcome.error))

    limits = study.spec.resources
    t_executor = time.perf_counter()
    executor = None
    try:
        executor = (LocalExecutor(str(store.root)) if options.executor == "local" else
                    RayExecutor(str(store.root), options.address, options.num_cpus or limits.max_cpus,
                                options.num_gpus if options.num_gpus is not None else limits.max_gpus,
                                heartbeat_s=options.heartbeat_s))
        executor.on_tick = recorder.heartbeat
        executor.on_progress = on_progress  # Ray: read with the beats; in-process: as the job writes them
        slots = executor.slots()
        t_ready = time.perf_counter()
        execute(plan, Announcing(executor, recorder.submitted), limits, on_outcome, options.max_retries)
        t_end = time.perf_counter()
    except KeyboardInterrupt as exc:
        with deferred_interrupts():
            progress.close()
            recorder.close("the run was stopped (Ctrl-C or SIGTERM) while this attempt ran")
        raise exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT) from None
    finally:
        progress.close()
        progress_file.unlink(missing_ok=True)  # `status` then reads the database alone
        if executor is not None:
            executor.close()
        recorder.close("the driver stopped before this attempt finished")
    # What actually ran, counted from the jobs' own reports (benchmarks parse this line).
    print(f"stages built: {json.dumps(dict(sorted(built.items())))}", flush=True)
    # Where the run's time went (bench/orchestrator_overhead.py reads it).
    log = {"executor": options.executor, "slots": slots, "started": time.time() - (time.perf_counter() - t_start),
           "wall_s": t_end - t_start,
           "startup_s": t_executor - t_start, "executor_start_s": t_ready - t_executor,
           "execute_s": t_end - t_ready, "jobs": jobs}
    folder = options.out / study.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last_run.json").write_text(json.dumps(log, indent=1))


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else ""


def report_failures(study: Study, failed: list, skipped: list, command: str, options: RunOptions,
                    stream=None, limit: int = 20) -> None:
    """The end of a run with failed cells: each cell and its error, then the
    exact commands that run them again."""
    stream = stream or sys.stderr
    rows = [(cell, failure, f"{tries} run(s)" if failure.transient else failure.kind) for cell, failure, tries
            in failed] + [(cell, failure, "failed before, skipped") for cell, failure in skipped]
    print(f"\n{len(rows)} cell(s) failed:", file=stream)
    for cell, failure, note in rows[:limit]:
        print(f"  {cell_label(cell)}: {failure.type}: {_first_line(failure.message)} [{note}]", file=stream)
    if len(rows) > limit:
        print(f"  ... and {len(rows) - limit} more", file=stream)
    kinds = Counter(failure.kind for _, failure, _ in rows)
    by_type = Counter(failure.type for _, failure, _ in rows)
    print("by error: " + ", ".join(f"{t} {n}" for t, n in by_type.most_common()), file=stream)
    where = f" --db {options.db}" if options.db and "@" not in options.db else ""
    print(f"tracebacks and attempts: python -m orchestrator status {study.name} --out {options.out}{where}",
          file=stream)
    if kinds["transient"] or kinds["stopped"]:
        print(f"{kinds['transient'] + kinds['stopped']} failed for a transient reason (a worker or node died, "
              f"memory was short): a plain rerun retries them:\n  {command}", file=stream)
    if kinds["deterministic"]:
        retry = command if "--retry-failed" in command.split() else f"{command} --retry-failed"
        print(f"{kinds['deterministic']} failed deterministically (an error in the job or the study's settings): "
              f"a rerun skips them; after fixing the cause, run them again with:\n  {retry}", file=stream)


def result_metrics(result: dict, wall_s: float | None = None, resources=None) -> dict[str, float]:
    """Everything numeric a cell reports, flattened into named metrics: the
    accuracies (``top1`` is THE result), timings (``time_*``), the cost of the
    distilled set it used (``synth_*``: wall time and bytes, RD3's efficiency axis),
    of its stored labels (``labels_storage_bytes``, ``labels_wall_s``) and of its
    post-evaluation job (``gpu_hours``, ``cpu_hours``: the job's wall time times
    the devices it held)."""
    metrics = dict(result["metrics"])
    if wall_s is not None and resources is not None:
        metrics["gpu_hours"] = wall_s * resources.gpus / 3600
        metrics["cpu_hours"] = wall_s * resources.cpus / 3600
    metrics.update({f"labels_{k}": v for k, v in result.get("labels", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics.update({f"time_{k}": v for k, v in result["timing"].items()})
    metrics.update({f"synth_{k}": v for k, v in result.get("synth_meta", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "version"})
    return metrics
