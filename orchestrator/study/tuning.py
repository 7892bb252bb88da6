"""The ``tuned`` design's search: what is searched, with what budget, seed and scheduler.

A tuned study runs every method under its native preset and under the shared
(unified) protocol, like ``native_vs_unified``, and adds a third arm: the
unified protocol with the fields of ``design.space`` set to the values a
search chose for that method. Every method's search has the same budget, the
same searcher seed (so random search draws the same candidate recipes for every
method) and the same early-stopping scheduler; each trial is a cell of the
study, trained with ``search.seed`` and selected on the held-out split alone.
The chosen recipe is then run with the study's seeds and reported on the test
set like any cell. Running the search is orchestrator.execution.search's.

A search space maps protocol fields by dotted path to a domain, written as in
Ray Tune: ``loguniform(low, high)``, ``uniform(low, high)``, ``randint(low,
high)`` (``high`` excluded, as in Tune), or a list of levels to choose from.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rd3core.config import Problem, bounded

from .factors import level_problems, parse_factor

TRIAL = "trial"  # the `protocol` column of a search's trials
TUNED = "tuned"  # ... and of the chosen recipes' cells
RANGES = ("loguniform", "uniform", "randint")
_RANGE_RE = re.compile(r"^\s*(?P<kind>[a-z]+)\s*\(\s*(?P<low>[^,()]+?)\s*,\s*(?P<high>[^,()]+?)\s*\)\s*$")
METRIC = "heldout_top1"  # what the scheduler and the choice read: held-out accuracy at an evaluated epoch
# Not searchable: the epochs are the scheduler's clock (every trial is stopped at
# or before them), and a changed evaluation interval changes when it can compare.
UNSEARCHABLE = {"epochs": "the epochs are the scheduler's time axis (every trial has the same maximum)",
                "eval": "the evaluation settings decide what the scheduler and the choice see"}


MAX_TRIALS = 10_000
TPE_STARTUP = 4  # random trials before TPE models the results
BUDGET_KINDS = ("trials", "cpu_hours", "gpu_hours")


@dataclass(frozen=True)
class Budget:
    """Per method, the same for every method: a number of trials, or the CPU- or
    GPU-hours its trials may use (held x wall time, as recorded: a search stops
    drawing once its recorded trials reach it). Default: 8 trials."""
    trials: int | None = bounded(None, ge=1, le=MAX_TRIALS)
    cpu_hours: float | None = bounded(None, gt=0, le=1e6)
    gpu_hours: float | None = bounded(None, gt=0, le=1e6)

    def validate(self):
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            yield given[1], f"a budget is one of {', '.join(BUDGET_KINDS)}; this one gives {', '.join(given)}"

    @property
    def kind(self) -> str:
        return next((k for k in BUDGET_KINDS if getattr(self, k) is not None), "trials")

    @property
    def amount(self) -> float:
        value = getattr(self, self.kind)
        return 8 if value is None else value

    def describe(self) -> str:
        return f"{self.amount:g} {'trials' if self.kind == 'trials' else self.kind.replace('_', '-')} per method"

    def spent(self, trials: list[dict]) -> float:
        """What ``trials`` (each with its recorded metrics) used of this budget."""
        if self.kind == "trials":
            return float(len(trials))
        return float(sum(t.get(self.kind, 0.0) for t in trials))

    def exhausted(self, trials: list[dict]) -> bool:
        return len(trials) >= MAX_TRIALS or self.spent(trials) >= self.amount

    def progress(self, trials: list[dict]) -> str:
        """``3/8 trials`` or ``0.0012/0.002 cpu-hours`` (3 trials)."""
        if self.kind == "trials":
            return f"{len(trials)}/{self.amount:g} trials"
        return f"{self.spent(trials):.3g}/{self.amount:g} {self.kind.replace('_', '-')} ({len(trials)} trials)"


@dataclass(frozen=True)
class Search:
    # random: the same draws for every method; tpe: Optuna's TPE through Ray Tune,
    # random for the first `startup` trials, then led by each method's own results.
    algorithm: Literal["random", "tpe"] = "random"
    # Seeds the searcher's draws and trains every trial. It must not be a study
    # seed: the chosen recipes are rerun with the study's (fresh) seeds.
    seed: int = 1000
    startup: int | None = bounded(None, ge=1, le=MAX_TRIALS)  # tpe only (default 4)

    def validate(self):
        if self.startup is not None and self.algorithm != "tpe":  # at the searcher: startup alone is a fine value
            yield "algorithm", f"only the tpe searcher takes startup trials (this one is {self.algorithm!r})"

    def record(self) -> dict[str, Any]:
        """What a trial's config records of its search."""
        out = {"algorithm": self.algorithm, "seed": self.seed}
        return out if self.algorithm == "random" else {**out, "startup": self.startup or TPE_STARTUP}


@dataclass(frozen=True)
class Scheduler:
    kind: Literal["asha"] = "asha"  # Ray Tune's ASHAScheduler on held-out accuracy per evaluated epoch
    grace_period: int = bounded(1, ge=1, le=100_000)  # epochs every trial trains before it can be stopped
    reduction_factor: int = bounded(3, ge=2, le=100)  # 1/reduction_factor of the trials go on at each rung


@dataclass(frozen=True)
class Domain:
    kind: str  # loguniform | uniform | randint | choice
    args: tuple[Any, ...]  # (low, high) or the levels

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}" if self.kind == "choice" else f"{self.kind}({self.args[0]}, {self.args[1]})"


@dataclass(frozen=True)
class TuningSpec:
    space: dict[str, Any] = field(default_factory=dict)  # protocol.<path> -> domain (text or list of levels)
    budget: Budget = field(default_factory=Budget)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)


def parse_domain(value: Any) -> tuple[Domain | None, str | None]:
    if isinstance(value, list):
        if not value:
            return None, "expected a non-empty list of levels to choose from"
        return Domain("choice", tuple(value)), None
    if not isinstance(value, str):
        return None, (f"expected a domain: loguniform(low, high), uniform(low, high), randint(low, high) or a list "
                      f"of levels, got {value!r}")
    match = _RANGE_RE.match(value)
    if match is None and re.match(r"^\s*[a-z]+\s*\([^)]*$", value):
        return None, (f"got {value!r}: inside a flow mapping ({{...}}) a comma ends the value; quote the domain "
                      "('loguniform(1e-4, 1e-1)') or write the space as an indented block")
    if match is None or match["kind"] not in RANGES:
        return None, (f"expected loguniform(low, high), uniform(low, high), randint(low, high) or a list of "
                      f"levels, got {value!r}")
    kind = match["kind"]
    try:
        low, high = (int(match[k]) if kind == "randint" else float(match[k]) for k in ("low", "high"))
    except ValueError:
        return None, f"{kind} takes two {'integers' if kind == 'randint' else 'numbers'}, got {value!r}"
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        return None, f"expected finite bounds with low < high, got {value!r}"
    if kind == "loguniform" and low <= 0:
        return None, f"loguniform needs low > 0, got {value!r}"
    return Domain(kind, (low, high)), None


def space_problems(tuning: TuningSpec, protocol_base: dict) -> tuple[dict[str, Domain], list[Problem]]:
    """The space's domains by path, and the problems of each path and domain
    (a range's ends and a list's levels are each checked as a factor level is)."""
    domains: dict[str, Domain] = {}
    problems: list[Problem] = []
    if not tuning.space:
        problems.append(Problem("design.space", "expected the search space: protocol fields by dotted path, each "
                                "with a domain (e.g. protocol.optim.lr: loguniform(1e-4, 1e-1))"))
    for raw, value in tuning.space.items():
        where = f"design.space.{raw}"
        path, message = parse_factor(raw)
        if path is None or path.kind != "protocol":
            problems.append(Problem(where, message or f"expected a protocol field (protocol.<field path>), got {raw!r}"))
            continue
        root = path.sub.split(".")[0]
        if root in UNSEARCHABLE:
            problems.append(Problem(where, f"cannot be searched: {UNSEARCHABLE[root]}"))
            continue
        domain, message = parse_domain(value)
        if domain is None:
            problems.append(Problem(where, message))
            continue
        levels = domain.args if domain.kind == "choice" else (domain.args[0], domain.args[1] - 1) \
            if domain.kind == "randint" else domain.args
        for level in dict.fromkeys(levels):
            problems += level_problems(path, level, where, protocol_base=protocol_base)
        domains[raw] = domain
    return domains, problems


def first_values(domains: dict[str, Domain]) -> dict[str, Any]:
    """Each domain's first value (its low end, or first level): a stand-in trial's."""
    return {path: d.args[0] for path, d in domains.items()}


def rungs(scheduler: Scheduler, epochs: int) -> list[int]:
    """The epochs at which ASHA compares trials (grace_period x reduction_factor^k, below the last epoch)."""
    out, t = [], scheduler.grace_period
    while t < epochs:
        out.append(t)
        t *= scheduler.reduction_factor
    return out


def choose(trials: list[dict]) -> dict | None:
    """The chosen trial: of those that trained every epoch (done and not
    pruned), the highest held-out accuracy at the last epoch; a tie goes to the
    earlier trial. Each trial: ``index``, ``status`` and its metrics."""
    full = [t for t in trials if t.get("status") == "done" and t.get("pruned") == 0
            and isinstance(t.get(METRIC), float) and math.isfinite(t[METRIC])]
    return max(full, key=lambda t: (t[METRIC], -t["index"])) if full else None
