"""`run`: validate, expand, plan, execute, record, summarise.

The driver is the only process that writes the database. A rerun skips every
cell that already has a result and every stage whose artifact is in the store,
so a finished study reruns in seconds and a crashed one resumes where it stopped.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from db import records
from db.models import CellStatus
from db.queries import cell_status, results_frame
from db.schema import upgrade
from db.session import make_engine, session_scope, sqlite_url
from rd3core.artifacts import ArtifactStore

from .analysis import plots, summary
from .expand import Cell, expand
from .plan import build_plan
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
    return options.db or sqlite_url(options.out / "rd3.sqlite")


def cell_label(cell: Cell) -> str:
    parts = [f"{k}={v}" for k, v in cell.factors.items()]
    return f"{cell.key[:10]} " + " ".join(parts + [f"seed={cell.seed}"])


def run_study(path: str | Path, options: RunOptions) -> int:
    study = load_study(path)
    cells = expand(study)
    options.out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(db_url(options))
    upgrade(engine)
    store = ArtifactStore(options.out / "artifacts")
    with session_scope(engine) as s:
        row = records.ensure_study(s, study.name, study.text, study.text_hash)
        study_id = row.id
        ids = records.sync_cells(s, row, [{"cell_key": c.key, "seed": c.seed, "factors": c.factors,
                                           "config": c.config} for c in cells])
    status = cell_status(engine, study.name)
    todo = [c for c in cells if status.get(c.key) != CellStatus.done.value]
    by_key = {c.key: c for c in cells}
    print(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    failures: list[tuple[Cell, Outcome]] = []
    if todo:
        plan = build_plan(todo, store)
        for stage, (need, cached) in plan.counts().items():
            print(f"  {stage:9s} {need:4d} to run, {cached:4d} cached")
        progress = Progress(len(todo))

        def on_outcome(outcome: Outcome) -> None:
            node = outcome.node
            if node.stage != "posteval":
                if outcome.error is None:
                    progress.stage(node.stage, node.key, outcome.result["wall_s"])
                else:
                    print(f"    {node.stage} {node.key[:10]} FAILED: {outcome.error}", flush=True)
                return
            cell = by_key[node.key]
            with session_scope(engine) as s:  # one transaction per result, committed as it arrives
                if outcome.error is None:
                    metrics = result_metrics(outcome.result)
                    records.record_result(s, ids[cell.key], metrics, outcome.result["epochs"])
                else:
                    records.set_status(s, ids[cell.key], CellStatus.failed)
            if outcome.error is None:
                progress.cell(cell_label(cell), True, f"top1={100 * outcome.result['metrics']['top1']:.2f}%")
            else:
                failures.append((cell, outcome))
                progress.cell(cell_label(cell), False, outcome.error)

        executor = (LocalExecutor(str(store.root)) if options.executor == "local" else
                    RayExecutor(str(store.root), options.address, options.num_cpus, options.num_gpus))
        try:
            execute(plan, executor, study.spec.resources, on_outcome)
        finally:
            executor.close()
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
    frame = results_frame(engine, study.name)
    folder = out / study.name
    folder.mkdir(parents=True, exist_ok=True)
    if frame.empty:
        print("no results yet")
        return
    factors = (["method"] if len(study.methods) > 1 else []) + list(study.spec.factors)
    combos = summary.combination_table(frame, factors)
    effects = summary.main_effects(frame, factors)
    print(f"\nfinal top-1 (%), mean and std over seeds, per factor combination:")
    print(summary.format_table(combos))
    if not effects.empty:
        print(f"\nper factor level (main effects):")
        print(summary.format_table(effects))
    frame.to_csv(folder / "results.csv", index=False)
    combos.to_csv(folder / "combinations.csv", index=False)
    effects.to_csv(folder / "main_effects.csv", index=False)
    written = plots.main_effects_plot(frame, factors, folder, f"{study.name}: main effects on final top-1")
    (folder / "summary.json").write_text(json.dumps({"cells": len(frame), "factors": factors}, indent=1))
    for p in written:
        print(f"wrote {p}")
