"""`run`: validate, expand, plan, execute, record, summarise.

The driver is the only process that writes the database. A rerun skips every
cell that already has a result and every stage whose artifact is in the store,
so a finished study reruns in seconds and a crashed one resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from db import records
from db.models import CellStatus
from db.queries import cell_status, results_frame
from db.schema import upgrade
from db.session import make_engine, results_url, session_scope
from rd3core.artifacts import ArtifactStore

from .analysis import commands, summary
from .analysis.design import load_design
from .expand import Cell, expand
from .plan import assign_resources, build_plan
from .recorder import Announcing, Recorder
from .runner import LocalExecutor, Outcome, Progress, RayExecutor, execute
from .spec import Study, load_study


@dataclass(frozen=True)
class RunOptions:
    out: Path = Path("results")
    db: str | None = None
    executor: str = "ray"
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None


def db_url(options: RunOptions) -> str:
    return results_url(options.db, options.out)


def cell_label(cell: Cell) -> str:
    parts = [f"{k}={v}" for k, v in cell.factors.items()]
    return f"{cell.key[:10]} " + " ".join(parts + [f"seed={cell.seed}"])


def run_study(path: str | Path, options: RunOptions) -> int:
    study = load_study(path)
    cells = expand(study)
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
    status = cell_status(engine, study.name)
    todo = [c for c in cells if status.get(c.key) != CellStatus.done.value]
    by_key = {c.key: c for c in cells}
    print(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    if stale:
        print(f"  {stale} attempt(s) left running by a stopped driver recorded as failed")
    failures: list[tuple[Cell, Outcome]] = []
    if todo:
        plan = assign_resources(build_plan(todo, store), study.spec.resources)
        for stage, (need, cached) in plan.counts().items():
            print(f"  {stage:9s} {need:4d} to run, {cached:4d} cached")
        progress = Progress(len(todo), stages={s: need for s, (need, _) in plan.counts().items()})
        recorder = Recorder(engine, store, plan, ids, {c.key: c.seed for c in todo})
        built: Counter[str] = Counter()

        def on_outcome(outcome: Outcome) -> None:
            node = outcome.node
            for entry in (outcome.result or {}).get("built", []):
                built[entry["stage"]] += 1
                if entry["key"] != node.key:  # an upstream artifact was missing or corrupt
                    print(f"    {entry['stage']} {entry['key'][:10]} rebuilt (missing or corrupt in the store)",
                          flush=True)
            if node.stage != "posteval":
                if outcome.error is None:
                    recorder.stage_done(node)
                    if not any(e["key"] == node.key for e in outcome.result.get("built", [])):
                        # published meanwhile by another run sharing the store
                        print(f"    {node.stage} {node.key[:10]} found in the store", flush=True)
                progress.stage(node.stage, node.key, (outcome.result or {}).get("wall_s"), outcome.error)
                return
            cell = by_key[node.key]
            if outcome.error is None:
                recorder.cell_done(outcome, result_metrics(outcome.result))
                progress.cell(cell_label(cell), True, f"top1={100 * outcome.result['metrics']['top1']:.2f}%")
            else:
                recorder.cell_failed(outcome)
                failures.append((cell, outcome))
                progress.cell(cell_label(cell), False, outcome.error)

        limits = study.spec.resources
        executor = (LocalExecutor(str(store.root)) if options.executor == "local" else
                    RayExecutor(str(store.root), options.address, options.num_cpus or limits.max_cpus,
                                options.num_gpus if options.num_gpus is not None else limits.max_gpus))
        try:
            execute(plan, Announcing(executor, recorder.submitted), study.spec.resources, on_outcome)
        finally:
            progress.close()
            executor.close()
            recorder.close("the driver stopped before this attempt finished")
        # What actually ran, counted from the jobs' own reports (benchmarks parse this line).
        print(f"stages built: {json.dumps(dict(sorted(built.items())))}", flush=True)
    if not failures:
        with session_scope(engine) as s:
            records.finish_study(s, study_id)
    summarise(engine, study, options.out)
    if failures:
        print(f"\n{len(failures)} cell(s) failed:", file=sys.stderr)
        for cell, outcome in failures:
            print(f"  {cell_label(cell)}: {outcome.error}", file=sys.stderr)
        print(f"rerun to retry them: python -m orchestrator run {path}", file=sys.stderr)
        return 1
    return 0


def result_metrics(result: dict) -> dict[str, float]:
    """Everything numeric a cell reports, flattened into named metrics: the
    accuracies (``top1`` is THE result), timings (``time_*``), the cost of the
    distilled set it used (``synth_*``: wall time and bytes, RD3's efficiency axis)
    and of its stored labels (``labels_storage_bytes``, ``labels_wall_s``)."""
    metrics = dict(result["metrics"])
    metrics.update({f"labels_{k}": v for k, v in result.get("labels", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics.update({f"time_{k}": v for k, v in result["timing"].items()})
    metrics.update({f"synth_{k}": v for k, v in result.get("synth_meta", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "version"})
    return metrics


def summarise(engine, study: Study, out: Path) -> None:
    """Mean and std per factor combination and per level on the terminal, CSVs,
    then the quick attribution (shares with intervals, headlines, analysis.json,
    main-effects and variance-share plots)."""
    raw = results_frame(engine, study.name)
    folder = out / study.name
    folder.mkdir(parents=True, exist_ok=True)
    if raw.empty:
        print("no results yet")
        return
    # Factor levels as strings in the study's order (mappings as JSON), only finite top1.
    design = load_design(engine, study.name)
    frame, factors = design.frame, list(design.levels)
    combos = summary.combination_table(frame, factors)
    effects = summary.main_effects(frame, factors)
    print(f"\nfinal top-1 (%), mean and std over seeds, per factor combination:")
    print(summary.format_table(combos))
    if not effects.empty:
        print(f"\nper factor level (main effects):")
        print(summary.format_table(effects))
    missing = design.not_analysed()
    if len(missing):
        print(f"\n{len(missing)} stored cell(s) not in these tables (" +
              ", ".join(f"{n} {s}" for s, n in missing["reason"].value_counts().items()) +
              f"): python -m orchestrator analyze {study.name} --out {out} lists them")
    raw.to_csv(folder / "results.csv", index=False)
    combos.to_csv(folder / "combinations.csv", index=False)
    effects.to_csv(folder / "main_effects.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"cells": len(raw), "factors": factors}, indent=1))
    try:
        written = commands.run_summary(engine, study.name, folder)
    except Exception as exc:  # noqa: BLE001 - the results are stored; the analysis can be rerun alone
        print(f"warning: the analysis failed ({exc.__class__.__name__}: {exc}); results are stored: "
              f"rerun it with python -m orchestrator report {study.name} --out {out}", file=sys.stderr)
        written = []
    for p in written:
        print(f"wrote {p}")
