"""The tuned design's search: one Ray Tune run per method, every trial a cell.

For each method in turn, a :class:`ray.tune.Tuner` runs trials, one at a time,
until the method's budget (``design.budget``: trials, or CPU/GPU-hours as
recorded) is spent, drawn by :class:`TrialSearcher` (a Tune ``Searcher``:
random draws from Tune's sampling domains, seeded by ``design.search.seed``, so
trial *i* of every method draws the same candidate recipe; or Optuna's TPE
through Tune's ``OptunaSearch``, seeded likewise) and stopped early by
Tune's ``ASHAScheduler`` on the held-out accuracy of each evaluated epoch. A
trial is a post-evaluation job (orchestrator.execution.jobs.run_node) whose
payload withholds the test split; it reports each evaluated epoch to Tune.

The database is the record and the resume point, not Tune's experiment folder
(a temporary one, removed afterwards): the driver, still the only writer, stores
each trial as a cell of the study (its factors: method, ``protocol: trial``, the
trial's index and searched values) with its held-out curve as epoch rows and,
when it ends, its metrics (``heldout_top1``, ``trial_epochs``, ``trial_rung``,
``pruned``, ``cpu_hours``). A rerun draws the same trials; a trial already
stored is not trained again but *replayed*: its stored curve is reported to
Tune as it was measured, so the scheduler (and TPE) decide as before and the
search continues where it stopped. Trials run one at a time so that those
decisions do not depend on which of two concurrent trials reported first.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from db import records
from db.models import EPOCH_FLOATS, AttemptStatus, CellStatus
from db.queries import attempts_frame, cell_status, epoch_frame, metrics_frame
from db.session import session_scope
from db.models import Study as StudyRow
from rd3core.artifacts import ArtifactStore

from . import failures
from .jobprogress import fmt_duration
from .plan import build_plan
from .recorder import checkout_state, provenance_fields
from ..analysis.tuning import plain, values_text
from ..study.expand import Cell, trial_cell
from ..study.spec import Study, search_domains
from ..study.tuning import METRIC, TPE_STARTUP, Budget, Domain, Search, choose, first_values, rungs

# Tune's console table and its per-trial result files: the driver prints its own lines and keeps the DB.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")  # each epoch reaches the scheduler as it is measured
# Ctrl-C stops the run as everywhere else (the attempt in flight recorded as interrupted), not
# Tune's graceful stop, which would end the trial in flight as if it had completed.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def tune_domain(domain: Domain):
    from ray import tune

    if domain.kind == "choice":
        return tune.choice(list(domain.args))
    return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[domain.kind](*domain.args)


def searcher_class():
    from ray.tune.search import Searcher

    class TrialSearcher(Searcher):
        """The search's Tune Searcher. ``random``: draws from the space's Tune
        domains with one numpy generator seeded by ``search.seed`` (the same
        draws for every method); ``tpe``: Optuna's TPE through Tune's
        OptunaSearch, seeded likewise, random for its first ``startup`` trials,
        then led by each trial's last reported held-out accuracy. Each draw
        becomes the trial's config through ``make_trial(index, values)``; it
        stops when ``budget`` is spent."""

        def __init__(self, domains: dict[str, Domain], budget: Budget, search: Search,
                     make_trial: Callable[[int, dict[str, Any]], dict], cpus: float = 1.0, gpus: float = 0.0):
            super().__init__(metric=METRIC, mode="max")
            self.domains = {path: tune_domain(d) for path, d in domains.items()}
            self.budget, self.make_trial = budget, make_trial
            self.cpus, self.gpus = cpus, gpus
            self.rng = np.random.default_rng(search.seed)
            self.inner = None
            if search.algorithm == "tpe":
                import optuna
                from ray.tune.search.optuna import OptunaSearch

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup or TPE_STARTUP)
                self.inner = OptunaSearch(space=OptunaSearch.convert_search_space(self.domains), metric=METRIC,
                                          mode="max", sampler=sampler)
            self.index = 0
            self.ended: list[dict] = []  # each ended trial's hours, as recorded (a replayed one: as stored)

        def suggest(self, trial_id: str) -> dict | str | None:
            # Trials run one at a time: the last one has ended (and been counted) when the next is asked for.
            if self.budget.kind == "trials" and self.index >= self.budget.amount or \
                    self.budget.kind != "trials" and self.budget.exhausted(self.ended):
                return Searcher.FINISHED
            if self.inner is None:
                values = {path: plain(d.sample(random_state=self.rng)) for path, d in self.domains.items()}
            else:
                values = {path: plain(v) for path, v in self.inner.suggest(trial_id).items()}
            config = self.make_trial(self.index, values)
            self.index += 1
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # An hours budget counts each ended trial (a failed one: 0); TPE learns from its result.
            wall = (result or {}).get("trial_wall_s", 0.0)
            self.ended.append({"cpu_hours": wall * self.cpus / 3600, "gpu_hours": wall * self.gpus / 3600})
            if self.inner is not None:
                self.inner.on_trial_complete(trial_id, result, error)

    return TrialSearcher


class TrialFailed(RuntimeError):
    """A trial whose stored attempt failed deterministically: replayed as the same failure."""


def run_trial(config: dict, store_root: str, threads: int) -> None:
    """Tune's trainable: replay a stored trial, or train it, reporting each
    evaluated epoch's held-out accuracy (``epoch`` is the scheduler's clock)."""
    from ray import tune

    from .jobs import run_node

    # The trial's time (what an hours budget counts) is its post-evaluation's, from
    # its first report: building the method's distilled set for the search's seed,
    # which the first trial of a method does, is not tuning effort.
    t0: list[float] = []

    def send(row: dict, replayed: bool, wall_s: float | None = None) -> None:
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tune.report({**numbers, "epoch": int(row["epoch"]), "replayed": replayed,
                     "trial_wall_s": time.perf_counter() - t0[0] if wall_s is None else wall_s})

    if config["failed"]:
        raise TrialFailed(config["failed"])
    for i, row in enumerate(config["replay"]):  # the last one carries the trial's recorded time
        send(row, True, config["wall_s"] if i == len(config["replay"]) - 1 else 0.0)
    if config["replay"]:
        return

    def progress(done: int, total: int, unit: str, **metrics: Any) -> None:
        if not t0:  # the post-evaluation starts (stored labels, else the training loop)
            t0.append(time.perf_counter())
        if unit == "epoch" and METRIC in metrics:
            send({**metrics, "epoch": done}, False)

    run_node("posteval", config["key"], config["payload"], store_root, threads,
             report=lambda stage: progress if stage == "posteval" else None)


def probe_cells(study: Study) -> list[Cell]:
    """One trial cell per method (its first trial at the first value of every
    domain): the stages its plan names (teachers, the distilled set at the
    search's seed) are those every trial of that method uses."""
    values = first_values(search_domains(study.spec))
    return [trial_cell(study, m.label, 0, values) for m in study.methods]


@dataclass
class MethodSearch:
    """What one method's search did (from the database after it ran)."""
    label: str
    trials: list[dict] = field(default_factory=list)  # index, key, values, status, metrics
    chosen: dict | None = None  # the chosen trial

    def spent(self) -> dict[str, float]:
        done = [t for t in self.trials if t["status"] == CellStatus.done.value]
        return {"trials": float(len(self.trials)), "pruned": float(sum(t.get("pruned", 0) for t in done)),
                "failed": float(sum(t["status"] == CellStatus.failed.value for t in self.trials)),
                "epochs": float(sum(t.get("trial_epochs", 0) for t in done)),
                "cpu_hours": float(sum(t.get("cpu_hours", 0) for t in done))}


class SearchRun:
    """The driver's side of a study's search: trial cells and their records."""

    def __init__(self, study: Study, engine, study_id: int, store: ArtifactStore, log=None):
        self.study, self.engine, self.study_id, self.store = study, engine, study_id, store
        self.log = log or (lambda line: print(line, flush=True))
        spec = study.spec
        self.tuning = spec.design.tuning
        self.domains = search_domains(spec)
        self.resources = spec.resources.for_stage("posteval")
        self.checkout = checkout_state()
        self.cells: dict[str, Cell] = {}
        self.stored: dict[str, tuple[list[dict], str | None, float]] = {}
        self.ids: dict[str, int] = {}  # cell key -> row id, as sync_cells last returned
        self.attempts: dict[str, int] = {}  # trial cell key -> its attempt in flight
        self.shown: dict[str, float] = {}  # trial cell key -> when its last epoch line was printed
        self.t_start = time.monotonic()
        self.epochs = 0

    def __getstate__(self) -> dict:
        # Tune pickles its searcher and callbacks (both hold this run) for
        # Tuner.restore, which resuming from the database replaces: the engine
        # and connections stay in the driver.
        return {}

    # --- the driver-side records ------------------------------------------------
    def make_trial(self, label: str, index: int, values: dict[str, Any]) -> dict:
        """The config Tune runs for trial ``index``: the cell, and what is stored of it."""
        cell = trial_cell(self.study, label, index, values)
        self.cells[cell.key] = cell
        self.epochs = cell.protocol.epochs
        with session_scope(self.engine) as s:
            row = s.get(StudyRow, self.study_id)
            ids = records.sync_cells(s, row, [{"cell_key": cell.key, "seed": cell.seed, "factors": cell.factors,
                                               "config": cell.config}])
        self.ids = ids
        replay, failed, wall_s = self.stored.get(cell.key, ([], None, 0.0))
        node = next(n for n in build_plan([cell], self.store).nodes.values() if n.stage == "posteval")
        return {"key": cell.key, "label": label, "index": index, "values": values, "payload": node.payload,
                "replay": replay, "failed": failed, "wall_s": wall_s}

    def load_stored(self) -> None:
        """What the database holds of the study's trials (read once per method's
        search: the trials it writes are not replayed): key -> (the curve to
        replay, the failure to repeat, the recorded wall time). A trial stored
        done is replayed; one whose last attempt failed deterministically fails
        the same way; any other (interrupted, lost) is trained again."""
        status = cell_status(self.engine, self.study.name)
        curves = epoch_frame(self.engine, self.study.name)
        curves = curves[curves[METRIC].notna()]
        walls = metrics_frame(self.engine, self.study.name)
        walls = dict(walls[walls.name == "trial_wall_s"][["cell_key", "value"]].itertuples(index=False))
        attempts = attempts_frame(self.engine, self.study.name)
        errors = {r.cell_key: (r.error_type, r.error_message) for r in
                  attempts[attempts.status == CellStatus.failed.value].itertuples(index=False)}
        self.stored = {}
        for key, curve in curves.groupby("cell_key"):
            if status.get(key) == CellStatus.done.value:
                rows = [{k: v for k, v in r.items() if k != "cell_key" and v == v and v is not None}
                        for r in curve.to_dict("records")]
                self.stored[key] = (rows, None, float(walls.get(key, 0.0)))
        for key, error in errors.items():
            if status.get(key) == CellStatus.failed.value and not failures.rerun_by_default(*error):
                self.stored[key] = ([], f"{error[0]}: {error[1]}", 0.0)

    def started(self, config: dict) -> None:
        if config["replay"] or config["failed"]:
            return
        with session_scope(self.engine) as s:
            self.attempts[config["key"]] = records.start_attempt(s, self.ids[config["key"]])

    def result(self, config: dict, rows: list[dict]) -> None:
        """An evaluated epoch of a trial in flight: stored, and shown every EPOCH_LINE_S seconds."""
        attempt = self.attempts.get(config["key"])
        if attempt is None or not rows:
            return
        with session_scope(self.engine) as s:
            records.record_epochs(s, self.ids[config["key"]], attempt, rows[-1:])
        now = time.monotonic()
        last = self.shown.setdefault(config["key"], now)  # a short trial shows only its end line
        if now - last >= EPOCH_LINE_S:
            self.shown[config["key"]] = now
            row = rows[-1]
            self.log(f"    {config['label']} trial {config['index']}: epoch {row['epoch']:.0f}/{self.epochs}, "
                     f"{METRIC} {100 * row[METRIC]:.1f}%, {row.get('trial_wall_s', 0):.0f} s")

    def completed(self, config: dict, rows: list[dict]) -> dict[str, float]:
        """The trial ended (trained every epoch, or stopped by the scheduler): its metrics, stored."""
        last = rows[-1] if rows else {}
        reached = int(last.get("epoch", 0))
        metrics = {METRIC: float(last.get(METRIC, math.nan)), "trial_epochs": float(reached),
                   "trial_index": float(config["index"]), "pruned": float(reached < self.epochs),
                   "trial_rung": float(sum(r <= reached for r in rungs(self.tuning.scheduler, self.epochs))),
                   "trial_wall_s": float(last.get("trial_wall_s", math.nan))}
        metrics["cpu_hours"] = metrics["trial_wall_s"] * self.resources.cpus / 3600
        metrics["gpu_hours"] = metrics["trial_wall_s"] * self.resources.gpus / 3600
        attempt = self.attempts.pop(config["key"], None)
        if attempt is not None:
            with session_scope(self.engine) as s:
                records.record_result(s, self.ids[config["key"]], metrics, rows, attempt_id=attempt)
                records.finish_attempt(s, attempt, AttemptStatus.done)
                records.record_provenance(s, attempt, **provenance_fields(self.checkout, None, config["payload"]["seed"]))
        return metrics

    def errored(self, config: dict, message: str) -> None:
        attempt = self.attempts.pop(config["key"], None)
        if attempt is not None:
            error_type, _, text = message.partition(": ")
            with session_scope(self.engine) as s:
                records.finish_attempt(s, attempt, AttemptStatus.failed, error_type=error_type[:200] or "Error",
                                       error_message=text or message)

    def close(self, reason: str) -> None:
        """Attempts in flight when the search stops end failed as interrupted (a rerun runs them again)."""
        if self.attempts:
            with session_scope(self.engine) as s:
                for attempt in self.attempts.values():
                    records.finish_attempt(s, attempt, AttemptStatus.failed, error_type=failures.INTERRUPTED,
                                           error_message=reason)
            self.attempts.clear()

    # --- running it --------------------------------------------------------------
    def run(self, address: str | None, num_cpus: int | None, num_gpus: int | None) -> dict[str, MethodSearch]:
        from .runner import ray_session

        with ray_session(address, num_cpus, num_gpus):
            out = {}
            try:
                for method in self.study.methods:
                    out[method.label] = self.search(method.label)
            finally:
                self.close("the driver stopped before this trial finished")
            return out

    def search(self, label: str) -> MethodSearch:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        tuning = self.tuning
        run = self
        seen: dict[str, tuple[dict, list[dict]]] = {}  # Tune trial id -> (config, rows)
        ended: list[int] = [0]

        class Recording(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                seen[trial.trial_id] = (trial.config, [])
                run.started(trial.config)

            def on_trial_result(self, iteration, trials, trial, result, **info):
                config, rows = seen[trial.trial_id]
                rows.append({k: v for k, v in result.items() if k in ROW_KEYS})
                run.result(config, rows)

            def on_trial_complete(self, iteration, trials, trial, **info):
                config, rows = seen[trial.trial_id]
                metrics = run.completed(config, rows)
                ended[0] += 1
                run.log_trial(label, config, ended[0], metrics)

            def on_trial_error(self, iteration, trials, trial, **info):
                config, rows = seen[trial.trial_id]
                message = _error_text(trial)
                run.errored(config, message)
                ended[0] += 1
                run.log(f"  [{label} trial {config['index']} ({ended[0]})] "
                        f"{values_text(config['values'])}: failed: {message.splitlines()[0][:200]}")

        epochs = self.probe_epochs(label)
        self.load_stored()
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=tuning.scheduler.grace_period,
                                  reduction_factor=tuning.scheduler.reduction_factor, brackets=1)
        searcher = searcher_class()(self.domains, tuning.budget, tuning.search,
                                    lambda index, values: self.make_trial(label, index, values),
                                    self.resources.cpus, self.resources.gpus)
        self.log(f"search {label}: {tuning.budget.describe()} ({tuning.search.algorithm}, seed "
                 f"{tuning.search.seed}), ASHA on {METRIC} at epochs {rungs(tuning.scheduler, epochs)} of {epochs}")
        resources = {"cpu": self.resources.cpus, "gpu": self.resources.gpus}
        trainable = tune.with_resources(tune.with_parameters(run_trial, store_root=str(self.store.root),
                                                             threads=self.resources.threads), resources)
        # Beside the artifact store: the folder a cluster run shares already. Removed after.
        folder = Path(tempfile.mkdtemp(prefix=".tune-", dir=self.store.root.parent))
        try:
            tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler, num_samples=-1,
                max_concurrent_trials=1, reuse_actors=True),
                run_config=tune.RunConfig(storage_path=str(folder), name=label, callbacks=[Recording()],
                                          verbose=0, log_to_file=True))
            tuner.fit()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self.summary(label, epochs)

    def probe_epochs(self, label: str) -> int:
        """The trials' epochs (the scheduler's maximum): the shared protocol's, which the space cannot change."""
        probe = trial_cell(self.study, label, 0, first_values(self.domains))
        self.epochs = probe.protocol.epochs
        return self.epochs

    def summary(self, label: str, epochs: int) -> MethodSearch:
        """The method's trials as stored: the database, not Tune's results, decides."""
        from db.queries import results_frame

        status = cell_status(self.engine, self.study.name)
        frame = results_frame(self.engine, self.study.name)
        stored = {r["cell_key"]: r for r in frame.to_dict("records")} if len(frame) else {}
        out = MethodSearch(label)
        for key, cell in self.cells.items():
            if cell.factors["method"] != label:
                continue
            row = stored.get(key, {})
            out.trials.append({"index": cell.factors["trial"], "key": key, "status": status.get(key),
                               "values": {p: cell.factors[p] for p in self.domains},
                               **{m: row[m] for m in (METRIC, "trial_epochs", "pruned", "cpu_hours", "gpu_hours",
                                                      "trial_rung")
                                  if m in row and row[m] == row[m]}})
        out.trials.sort(key=lambda t: t["index"])
        out.chosen = choose(out.trials)
        spent = out.spent()
        chosen = ("no trial trained every epoch: no tuned recipe" if out.chosen is None else
                  f"chose trial {out.chosen['index']} ({values_text(out.chosen['values'])}, "
                  f"{METRIC} {100 * out.chosen[METRIC]:.1f}%)")
        self.log(f"search {label}: {self.tuning.budget.progress(out.trials)}, {spent['pruned']:.0f} pruned, "
                 f"{spent['failed']:.0f} "
                 f"failed, {spent['epochs']:.0f} epochs trained; {chosen}")
        return out

    def log_trial(self, label: str, config: dict, n: int, metrics: dict[str, float]) -> None:
        how = "replayed from the database" if config["replay"] else f"{metrics['trial_wall_s']:.1f} s"
        state = (f"pruned at epoch {metrics['trial_epochs']:.0f}" if metrics["pruned"] else
                 f"all {metrics['trial_epochs']:.0f} epochs")
        budget = self.tuning.budget
        count = f"{n}/{budget.amount:g}" if budget.kind == "trials" else f"{n}"
        self.log(f"  [{label} trial {config['index']} ({count})] "
                 f"{values_text(config['values'])}: {state}, {METRIC} {100 * metrics[METRIC]:.1f}% ({how}; "
                 f"search elapsed {fmt_duration(time.monotonic() - self.t_start)})")


EPOCH_LINE_S = 10.0  # a trial in flight shows its latest evaluated epoch at most this often
ROW_KEYS = ("epoch", *EPOCH_FLOATS, "trial_wall_s")  # what an epoch row stores, and the trial's clock



def _error_text(trial) -> str:
    """The trial's exception as 'Type: message' (Tune keeps it in the trial's error file)."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.isfile(path):
        text = Path(path).read_text(errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):  # the innermost "Type: message" line of the traceback
        head = line.split(":", 1)[0].strip()
        if head.isidentifier() and head[:1].isupper():
            return line.strip()
    return lines[-1].strip() if lines else "TrialError: the trial failed (no error recorded by Ray Tune)"
