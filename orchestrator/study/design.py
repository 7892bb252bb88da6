"""Designs: which combinations of factor levels a study runs.

``factorial`` (default) crosses every factor; ``zip`` pairs the levels of all
factors (equal lengths); a factorial may also pair some factors in ``zip``
groups; ``ofat`` varies one factor at a time around a baseline; ``cells`` lists
the combinations explicitly; ``native_vs_unified`` runs every method under its
own published preset and under one (or more) shared protocols, in a factor
column ``protocol`` whose levels are ``native`` and the shared presets' names;
a column ``recipe`` names the preset each cell ran under, and every random real
subset is also run under each other method's native preset (its recipe-matched
twin), so each method is compared with a random subset under its own recipe;
``tuned`` runs those two arms and adds a third, ``tuned``: the shared protocol
with the fields of ``space`` set by an equal-budget search per method
(orchestrator.study.tuning; those cells are added once the search has chosen).

Methods and seeds are crossed with every row unless ``method`` is itself a
factor; seeds are always crossed, so comparisons between methods are paired.
Exclusion rules then drop named combinations, and each must drop something.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

from rd3core.config import Problem, canonical_json
from rd3core.protocol import PRESETS

from .factors import parse_factor
from .tuning import Budget, Scheduler, Search, TuningSpec

NATIVE = "native"
DESIGN_KINDS = ("factorial", "zip", "ofat", "cells", "native_vs_unified", "tuned")
ARMED = ("native_vs_unified", "tuned")  # the designs with a `protocol` column of native and shared arms


@dataclass(frozen=True)
class DesignSpec:
    kind: Literal["factorial", "zip", "ofat", "cells", "native_vs_unified", "tuned"] = "factorial"
    # factorial / native_vs_unified: groups of factors whose levels are paired
    # (equal lengths); the groups and the other factors are crossed.
    zip: tuple[tuple[str, ...], ...] = ()
    baseline: dict[str, Any] = field(default_factory=dict)  # ofat: factor -> baseline level (default: first)
    cells: tuple[dict[str, Any], ...] = ()  # cells: each a mapping factor -> level
    unified: tuple[str, ...] = ()  # native_vs_unified, tuned: shared presets (default: protocol.preset)
    # tuned: the search (orchestrator.study.tuning)
    space: dict[str, Any] = field(default_factory=dict)
    budget: Budget | None = None
    search: Search | None = None
    scheduler: Scheduler | None = None

    @property
    def tuning(self) -> TuningSpec:
        return TuningSpec(self.space, self.budget or Budget(), self.search or Search(), self.scheduler or Scheduler())

    def validate(self):
        if self.kind != "tuned":
            for name in ("space", "budget", "search", "scheduler"):
                if getattr(self, name):
                    yield name, f"only the 'tuned' design takes a search {name} (this design is {self.kind!r})"
        elif len(self.unified) > 1:
            yield "unified", f"the tuned design tunes one shared protocol, got {list(self.unified)}"
        if self.zip and self.kind not in ("factorial", "native_vs_unified"):
            yield "zip", (f"zip groups apply to the factorial and native_vs_unified designs, not {self.kind!r} "
                          "(design 'zip' pairs every factor)")
        if self.baseline and self.kind != "ofat":
            yield "baseline", f"only the 'ofat' design takes a baseline (this design is {self.kind!r})"
        if self.cells and self.kind != "cells":
            yield "cells", f"only the 'cells' design takes a list of cells (this design is {self.kind!r})"
        if self.kind == "cells" and not self.cells:
            yield "cells", "expected a non-empty list of cells, each a mapping factor -> level"
        if self.unified and self.kind not in ARMED:
            yield "unified", f"only the native_vs_unified and tuned designs take unified presets (this is {self.kind!r})"
        for i, name in enumerate(self.unified):
            if name not in PRESETS:
                yield f"unified[{i}]", PRESETS.unknown_message(name)
        if len(set(self.unified)) != len(self.unified):
            yield "unified", f"names a preset twice: {list(self.unified)}"
        seen: set[str] = set()
        for i, group in enumerate(self.zip):
            if len(group) < 2:
                yield f"zip[{i}]", f"expected at least two factors to pair, got {list(group)}"
            for name in group:
                if name in seen:
                    yield f"zip[{i}]", f"factor {name!r} is in two zip groups"
                seen.add(name)


@dataclass(frozen=True)
class Row:
    levels: dict[str, Any]  # column -> level; always has "method" (a method label)
    where: str  # key path that produced it (for messages)
    seeds: tuple[int, ...]  # the study's seeds, minus any excluded for this row


@dataclass
class Design:
    rows: list[Row]
    columns: list[str]  # the factor columns each cell records
    # (column, canonical level) -> (level, key path of its first mention)
    levels: dict[tuple[str, str], tuple[Any, str]]


def _key(level: Any) -> str:
    return canonical_json(level)


def build_design(design: DesignSpec, factors: dict[str, list], labels: list[str], base_preset: str | None,
                 seeds: tuple[int, ...], exclude: tuple[dict, ...], natives: dict[str, str | None] | None = None,
                 randoms: tuple[str, ...] = ()) -> tuple[Design | None, list[Problem]]:
    """The rows of the design, or the problems that prevent building them.
    ``natives``: each method label's published preset; ``randoms``: the labels of
    random real subsets (native_vs_unified twins them under the other recipes)."""
    problems: list[Problem] = []
    levels: dict[tuple[str, str], tuple[Any, str]] = {}

    def note(column: str, level: Any, where: str) -> None:
        levels.setdefault((column, _key(level)), (level, where))

    for name, values in factors.items():
        for i, value in enumerate(values):
            note(name, value, f"factors.{name}[{i}]")
    combos, names = _combos(design, factors, note, problems)
    arms: list[str] = []
    if design.kind == "tuned" and factors:
        problems.append(Problem("factors", "the tuned design searches each method's recipe: it crosses no factors "
                                "(search protocol fields under design.space, or use another design)"))
    if design.kind in ARMED:
        if "preset" in factors:
            problems.append(Problem("factors.preset", f"the {design.kind} design sets the preset of every cell "
                                    "(native or unified); remove the 'preset' factor"))
        unified = list(design.unified) or ([base_preset] if base_preset else [])
        if not unified:
            problems.append(Problem("design.unified", "expected the shared protocol: set protocol.preset or "
                                    "design.unified to a preset name"))
        arms = [NATIVE, *unified]
        for i, arm in enumerate(arms):
            note("protocol", arm, f"design.unified[{i - 1}]" if design.unified and i else "protocol.preset")
    if problems:
        return None, problems
    method_is_factor = "method" in names
    if not method_is_factor:
        for i, label in enumerate(labels):
            note("method", label, f"methods[{i}]")
    natives = natives or {}
    rows: list[Row] = []
    for label in ([None] if method_is_factor else labels):
        for arm in arms or [None]:
            for combo, where in combos:
                row = dict(combo) if label is None else {"method": label, **combo}
                if arm is not None:
                    row["protocol"] = arm
                    method = row["method"]  # a bad level (validated elsewhere) can be any YAML value
                    row["recipe"] = (natives.get(method) if isinstance(method, str) else None) if arm == NATIVE \
                        else arm
                rows.append(Row(row, where, seeds))
    if arms:
        rows += _twins(rows, randoms)
    shown = (["method"] if method_is_factor or len(labels) > 1 or arms else []) + \
            (["protocol", "recipe"] if arms else []) + [n for n in names if n != "method"]
    rows, found = _exclude(rows, exclude, set(shown) | {"method", "seed"}, seeds)
    problems += found
    return Design(rows, shown, levels), problems


def _twins(rows: list[Row], randoms: tuple[str, ...]) -> list[Row]:
    """Each random subset under every other native recipe of the study, beside its
    own native cells (a recipe it already runs under is shared, not repeated)."""
    native = [r for r in rows if r.levels["protocol"] == NATIVE]
    recipes = list(dict.fromkeys(r.levels["recipe"] for r in native if r.levels["method"] not in randoms))
    out = []
    for r in native:
        if r.levels["method"] in randoms:
            out += [Row({**r.levels, "recipe": recipe}, r.where, r.seeds) for recipe in recipes
                    if recipe != r.levels["recipe"]]
    return out


def _combos(design: DesignSpec, factors: dict[str, list], note, problems: list[Problem]
            ) -> tuple[list[tuple[dict, str]], list[str]]:
    """(level combination, where) pairs without methods and arms, and the factor names."""
    names = list(factors)
    if design.kind == "cells":
        if factors:
            problems.append(Problem("factors", "the 'cells' design takes its factors from design.cells; "
                                    "remove 'factors' (or use another design)"))
        return _explicit_cells(design.cells, note, problems)
    if design.kind == "ofat":
        return _ofat(design.baseline, factors, note, problems), names
    groups = [tuple(names)] if design.kind == "zip" and names else [tuple(g) for g in design.zip]
    grouped: dict[str, int] = {}
    for gi, group in enumerate(groups):
        where = "design" if design.kind == "zip" else f"design.zip[{gi}]"
        unknown = [n for n in group if n not in factors]
        if unknown:
            problems.append(Problem(where, f"zips {unknown}, which {'is' if len(unknown) == 1 else 'are'} not "
                                    f"under 'factors' (factors: {names})"))
            continue
        lengths = {n: len(factors[n]) for n in group}
        if len(set(lengths.values())) > 1:
            problems.append(Problem(where, "zipped factors need the same number of levels (they are paired "
                                    f"one to one), got {', '.join(f'{n}: {k}' for n, k in lengths.items())}"))
            continue
        for n in group:
            grouped[n] = gi
    for n in names:
        if n not in grouped:
            _distinct(f"factors.{n}", factors[n], problems, "lists a level twice")
    for gi, group in enumerate(groups):
        if all(n in grouped for n in group):
            _distinct("design" if design.kind == "zip" else f"design.zip[{gi}]",
                      list(zip(*(factors[g] for g in group))), problems, f"pairs the same levels of {list(group)} twice")
    if problems:
        return [], names
    blocks: list[list[dict]] = []
    placed: set[int] = set()
    for n in names:  # groups take the place of their first factor
        if n not in grouped:
            blocks.append([{n: v} for v in factors[n]])
        elif grouped[n] not in placed:
            placed.add(grouped[n])
            group = groups[grouped[n]]
            blocks.append([dict(zip(group, values)) for values in zip(*(factors[g] for g in group))])
    combos = []
    for parts in itertools.product(*blocks):
        combo: dict = {}
        for part in parts:
            combo.update(part)
        combos.append((combo, "factors" if names else "design"))
    return combos, names


def _distinct(where: str, levels: list, problems: list[Problem], message: str) -> None:
    keys = [_key(level) for level in levels]
    if len(set(keys)) != len(keys):
        problems.append(Problem(where, f"{message}: {levels}"))


def _ofat(baseline: dict, factors: dict[str, list], note, problems: list[Problem]) -> list[tuple[dict, str]]:
    if not factors:
        problems.append(Problem("factors", "the 'ofat' design varies factors around a baseline: expected factors"))
        return []
    for n, levels in factors.items():
        _distinct(f"factors.{n}", levels, problems, "lists a level twice")
    for name in baseline:
        if name not in factors:
            problems.append(Problem(f"design.baseline.{name}", f"not a factor of this study (factors: {list(factors)})"))
    base = {n: baseline.get(n, levels[0]) for n, levels in factors.items()}
    for n in baseline:
        if n in factors:
            note(n, baseline[n], f"design.baseline.{n}")
    rows, seen = [(base, "design.baseline")], {_key(base)}
    for n, levels in factors.items():
        for i, level in enumerate(levels):
            row = {**base, n: level}
            if _key(row) not in seen:
                seen.add(_key(row))
                rows.append((row, f"factors.{n}[{i}]"))
    return rows


def _explicit_cells(cells: tuple[dict, ...], note, problems: list[Problem]) -> tuple[list[tuple[dict, str]], list[str]]:
    names: list[str] = list(cells[0]) if cells else []
    rows, seen = [], {}
    for j, cell in enumerate(cells):
        where = f"design.cells[{j}]"
        bad = False
        for name, level in cell.items():
            path, message = parse_factor(name)
            if path is None or path.kind == "seed":
                bad = True
                problems.append(Problem(f"{where}.{name}", message or (
                    "seeds are crossed with every cell (paired comparisons): list them under 'seeds'")))
            else:
                note(name, level, f"{where}.{name}")
        if set(cell) != set(names):
            bad = True
            problems.append(Problem(where, f"every cell must name the same factors: this one names "
                                    f"{sorted(map(str, cell))}, design.cells[0] names {sorted(map(str, names))}"))
        key = _key(cell)
        if key in seen:
            bad = True
            problems.append(Problem(where, f"the same cell as design.cells[{seen[key]}]"))
        seen.setdefault(key, j)
        if not bad:
            rows.append(({n: cell[n] for n in names}, where))
    return rows, names


def _exclude(rows: list[Row], rules: tuple[dict, ...], columns: set[str], seeds: tuple[int, ...]
             ) -> tuple[list[Row], list[Problem]]:
    problems: list[Problem] = []
    usable = []
    for i, rule in enumerate(rules):
        if not rule:
            problems.append(Problem(f"exclude[{i}]", "expected a mapping factor -> level naming what to drop"))
            continue
        unknown = [k for k in rule if k not in columns]
        for k in unknown:
            problems.append(Problem(f"exclude[{i}].{k}", f"not a factor of this study's cells "
                                    f"(factors: {', '.join(sorted(columns))})"))
        if not unknown:
            usable.append((i, rule))
    hits = {i: 0 for i, _ in usable}
    out = []
    for row in rows:
        kept = row.seeds
        for i, rule in usable:
            if all(row.levels.get(k) == v for k, v in rule.items() if k != "seed"):
                dropped = [s for s in kept if "seed" not in rule or s == rule["seed"]]
                hits[i] += len(dropped)
                kept = tuple(s for s in kept if s not in dropped)
        if kept == row.seeds:
            out.append(row)
        elif kept:
            out.append(Row(row.levels, row.where, kept))
    for i, rule in usable:
        if not hits[i]:
            problems.append(Problem(f"exclude[{i}]", f"matches no cell: {rule} (a typo in a level, or a "
                                    "combination the design does not contain, or one an earlier rule dropped)"))
    return out, problems
