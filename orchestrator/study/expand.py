"""Cells: the design's rows x seeds, each with its fully resolved config and a
stable id (hash of that config; the study's name and factor labels play no part,
so identical cells in two studies share results).

A cell's protocol is built in this order: its preset (the study's, a ``preset``
factor level, or the method's native preset), the study's ``protocol.overrides``
when the preset is the study's own ``protocol.preset``, then
``protocol.common_overrides``, then the cell's ``protocol.*`` factor levels.

Seeds are shared by every method and protocol, so method comparisons are paired.
Distinct protocols, teachers and method parameters are each resolved once: a
10,000-cell study has far fewer of them than cells.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from rd3core.config import ConfigError, Problem, build, field_types, stable_hash, to_dict
from rd3core.pipeline import TeacherSpec
from rd3core.protocol import Protocol
from rd3core.synth import METHODS

from .design import NATIVE, Row
from .factors import FactorPath, apply_level, parse_factor
from .spec import MethodConfig, Study, StudyError, base_protocol_dict, native_preset, render, tuned_preset
from .teachers import TeacherChecks, teacher_problems
from .tuning import TRIAL, TUNED


@dataclass(frozen=True)
class Cell:
    key: str
    seed: int
    factors: dict[str, Any]  # factor column -> level (the study's factor_columns)
    dataset: dict[str, Any]  # the dataset's identity (DatasetSpec.identified): what stages load and are keyed by
    method: MethodConfig
    preset: str | None
    protocol: Protocol
    teachers: tuple[TeacherSpec, ...]  # every teacher the cell uses; [0] serves synthesis
    config: dict[str, Any]  # canonical resolved config, stored with the result


class _Resolver:
    """Resolves rows into (protocol, params, teachers), each distinct one once."""

    def __init__(self, study: Study):
        self.study = study
        self.spec = study.spec
        self.family = self.spec.dataset.info.family
        self.paths: dict[str, FactorPath | None] = {}
        self.bases: dict[tuple, dict] = {}
        self.protocols: dict[tuple, tuple[Protocol, dict] | list[Problem]] = {}
        self.params: dict[tuple, tuple[Any, dict] | list[Problem]] = {}
        self.teachers: dict[tuple, tuple[TeacherSpec, ...] | list[Problem]] = {}
        self.teacher_dicts: dict[TeacherSpec, dict] = {}
        self.teacher_checks = TeacherChecks(self.spec.dataset)
        self.fields = [f.name for f in fields(Protocol)]
        self.groups = {name: tp for name, tp in field_types(Protocol).items() if is_dataclass(tp)}
        self.group_cache: dict[tuple[str, str], tuple[Any, dict] | list[Problem]] = {}

    def path(self, column: str) -> FactorPath | None:
        if column not in self.paths:
            self.paths[column] = None if column in ("method", "protocol", "recipe", TRIAL) else parse_factor(column)[0]
        return self.paths[column]

    def split(self, row: Row) -> tuple[list, list, list]:
        protocol, params, teachers = [], [], []
        for column, level in row.levels.items():
            path = self.path(column)
            if path is None:
                continue
            if path.kind == "protocol":
                protocol.append((path.sub, level))
            elif path.kind == "param":
                params.append((path.sub, level))
            elif path.kind == "teacher":
                teachers.append((path.teacher, path.sub, level))
        return protocol, params, teachers

    def preset(self, row: Row, method: MethodConfig) -> tuple[str | None, bool]:
        """(preset, whether protocol.overrides apply)."""
        arm = row.levels.get("protocol")
        if arm == NATIVE:  # a random subset's twin names the other method's recipe
            return row.levels.get("recipe") or native_preset(method), False
        if arm in (TRIAL, TUNED):  # a search's cells: the shared preset, searched fields set
            preset = row.levels["recipe"]
        else:
            preset = arm if arm is not None else row.levels.get("preset", self.spec.protocol.preset)
        return preset, preset == self.spec.protocol.preset

    def protocol(self, preset: str | None, customised: bool, levels: list) -> tuple[Protocol, dict] | list[Problem]:
        key = (preset, customised, repr(levels))
        if key not in self.protocols:
            if (preset, customised) not in self.bases:
                self.bases[preset, customised] = base_protocol_dict(self.spec, self.family, preset, customised)
            data = self.bases[preset, customised]
            for sub, level in levels:
                data = apply_level(data, sub, level)
            self.protocols[key] = self._build_protocol(data)
        return self.protocols[key]

    def _build_protocol(self, data: dict) -> tuple[Protocol, dict] | list[Problem]:
        # Protocols of one study mostly differ in a few fields: each distinct group
        # of settings (augment, labels, ...) is built and validated once, and build()
        # takes the built group as it is (the Protocol's own checks still run).
        data, problems, groups = dict(data), [], {}
        for name, cls in self.groups.items():
            value = data.get(name)
            if not isinstance(value, dict):
                continue
            gkey = (name, repr(value))
            if gkey not in self.group_cache:
                try:
                    built = build(cls, value, f"protocol.{name}")
                    self.group_cache[gkey] = (built, to_dict(built))
                except ConfigError as exc:
                    self.group_cache[gkey] = exc.problems
            found = self.group_cache[gkey]
            if isinstance(found, list):
                problems += found
            else:
                data[name], groups[name] = found
        try:
            protocol = build(Protocol, data, "protocol")
        except ConfigError as exc:
            return problems + exc.problems
        if problems:
            return problems
        # A group the Protocol itself resolved (a rule such as schedule.zeta: rd3) is
        # recorded as resolved: the stored config says what ran.
        return protocol, {f: groups[f] if f in groups and getattr(protocol, f) is data[f] else
                          to_dict(getattr(protocol, f)) for f in self.fields}

    def method_params(self, method: MethodConfig, levels: list) -> tuple[Any, dict] | list[Problem]:
        key = (method.label, repr(levels))
        if key not in self.params:
            if not levels:
                self.params[key] = (method.params, to_dict(method.params))
            else:
                data = to_dict(method.params)
                for sub, level in levels:
                    data = apply_level(data, sub, level)
                try:
                    params = build(type(method.params), data, "method")
                    self.params[key] = (params, to_dict(params))
                except ConfigError as exc:
                    self.params[key] = exc.problems
        return self.params[key]

    def teacher_list(self, levels: list) -> tuple[TeacherSpec, ...] | list[Problem]:
        key = repr(levels)
        if key not in self.teachers:
            teachers = list(self.spec.teachers)
            problems: list[Problem] = []
            for arch, sub, level in levels:
                i = next((j for j, t in enumerate(self.spec.teachers) if t.arch == arch), 0) if arch else 0
                try:
                    teachers[i] = build(TeacherSpec, apply_level(to_dict(teachers[i]), sub, level),
                                        f"teacher[{self.spec.teachers[i].arch}]")
                except ConfigError as exc:
                    problems += exc.problems
            for declared, teacher in zip(self.spec.teachers, teachers):
                if teacher != declared and not problems:  # changed by a level: its weights against the dataset
                    problems += self.teacher_checks.problems(teacher, f"teacher[{declared.arch}]")
            archs = [t.arch for t in teachers]
            if len(set(archs)) != len(archs):
                problems.append(Problem("teachers", f"two teachers with the same arch: {archs}"))
            self.teachers[key] = problems or tuple(teachers)
        return self.teachers[key]

    def teacher_dict(self, teacher: TeacherSpec) -> dict:
        """What a cell records and is keyed by for ``teacher``: its identity
        (a loaded teacher's file by content digest, never by path)."""
        if teacher not in self.teacher_dicts:
            self.teacher_dicts[teacher] = teacher.identity()
        return self.teacher_dicts[teacher]


def _cell_teachers(protocol: Protocol, teachers: tuple[TeacherSpec, ...], needs_teacher: bool
                   ) -> tuple[TeacherSpec, ...] | Problem:
    by_arch = {t.arch: t for t in teachers}
    used: tuple[TeacherSpec, ...] = ()
    if protocol.labels.mode != "hard":
        names = protocol.labels.teachers or (teachers[0].arch,)
        missing = [n for n in names if n not in by_arch]
        if missing:
            return Problem("protocol.labels.teachers", f"labels need teachers {missing} that the study does not "
                           f"declare under 'teachers' (declared: {sorted(by_arch)})")
        used = tuple(by_arch[n] for n in names)
    if needs_teacher:  # the primary teacher serves synthesis: it comes first
        used = (teachers[0],) + tuple(t for t in used if t != teachers[0])
    return used


class _Expander:
    """Rows -> cells, with every problem found on the way; each distinct
    protocol, method parameter set and teacher list is resolved once."""

    def __init__(self, study: Study):
        spec = study.spec
        found = teacher_problems(spec)  # weights made elsewhere against the dataset (reads checkpoint files)
        if found:
            raise StudyError(render(study.source, found))
        self.study, self.spec = study, spec
        self.resolver = _Resolver(study)
        self.by_label = {m.label: m for m in study.methods}
        self.info = spec.dataset.info
        self.dataset = spec.dataset.identified()  # name and root, and a content digest or held-out carve when set
        self.problems: list[Problem] = []
        self.unselectable: set[str | None] = set()  # presets whose protocols leave the held-out split nothing to select
        self.seen: dict[str, dict] = {}
        self.methods: dict[tuple, MethodConfig] = {}

    def cells(self, row: Row, searched: list[tuple[str, Any]] = (), extra: dict[str, Any] | None = None) -> list[Cell]:
        """The cells of ``row`` (one per seed). ``searched``: protocol (path, value)
        pairs a search set, applied after the row's levels; ``extra``: config
        entries that tell the cells apart (a trial's index, a tuned cell's trial)."""
        resolver, spec = self.resolver, self.spec
        method = self.by_label[row.levels["method"]]
        preset, customised = resolver.preset(row, method)
        protocol_levels, param_levels, teacher_levels = resolver.split(row)
        resolved = [resolver.protocol(preset, customised, protocol_levels + list(searched)),
                    resolver.method_params(method, param_levels), resolver.teacher_list(teacher_levels)]
        found = [p for r in resolved if isinstance(r, list) for p in r]
        if not found:
            (protocol, protocol_dict), (params, params_dict), teachers = resolved
            used = _cell_teachers(protocol, teachers, METHODS.get(method.name).needs_teacher)
            found = [used] if isinstance(used, Problem) else []
            if spec.dataset.heldout_per_class and not protocol.eval.interval and preset not in self.unselectable:
                self.unselectable.add(preset)
                within = ", ".join(f"{k}={v!r}" for k, v in row.levels.items())
                self.problems.append(Problem("dataset.heldout_per_class", (
                    f"selecting an epoch on the held-out split needs eval.interval > 0, but the protocol "
                    f"{'of preset ' + repr(preset) if preset else '(no preset)'} has eval.interval 0 (in the cells "
                    f"with {within}): set protocol.common_overrides.eval.interval, or drop heldout_per_class")))
        if found:
            within = ", ".join(f"{k}={v!r}" for k, v in row.levels.items())
            self.problems += [Problem(row.where, f"{p.path}: {p.message} (in the cells with {within})") for p in found]
            return []
        mkey = (method.label, repr(param_levels))
        if mkey not in self.methods:
            self.methods[mkey] = method if params is method.params else replace(method, params=params)
            # Checks that need the dataset and the teacher (e.g. SRe2L needs BatchNorm).
            index = self.study.methods.index(method)
            self.problems += [Problem(f"methods[{index}].{sub}", message) for sub, message in
                              METHODS.get(method.name).problems(params, self.info, teachers[0].arch)]
        factors = {c: row.levels[c] for c in self.study.factor_columns}
        if TRIAL in row.levels:  # a trial's index and searched values: its own columns, beside the study's
            factors.update({c: v for c, v in row.levels.items() if c not in factors})
        base = {
            "dataset": self.dataset,
            "method": {"name": method.name, **params_dict},
            "preset": preset,
            "protocol": protocol_dict,
            "teachers": [resolver.teacher_dict(t) for t in used],
            **(extra or {}),
        }
        out = []
        for seed in row.seeds:
            config = {**base, "seed": seed}
            key = stable_hash(config, plain=True)  # every part is to_dict output already
            if key in self.seen:
                self.problems.append(Problem(row.where, f"{self.seen[key]} and {factors} resolve to the same config "
                                             "(method parameters, protocol, teachers and seed): a study runs each "
                                             "config once; make them differ, or drop one with an 'exclude' rule"))
                continue
            self.seen[key] = factors
            out.append(Cell(key, seed, factors, self.dataset, self.methods[mkey], preset, protocol, used, config))
        return out

    def finish(self, cells: list[Cell]) -> list[Cell]:
        if self.problems:
            raise StudyError(render(self.study.source, list(dict.fromkeys(self.problems))))
        return cells


def expand(study: Study) -> list[Cell]:
    """The study's cells; a tuned design's searched cells come from
    :func:`trial_cell` and :func:`tuned_cells` as its search runs."""
    expander = _Expander(study)
    return expander.finish([c for row in study.design.rows for c in expander.cells(row)])


def _searched(values: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(parse_factor(path)[0].sub, value) for path, value in values.items()]


def trial_cell(study: Study, label: str, index: int, values: dict[str, Any]) -> Cell:
    """Trial ``index`` of method ``label``'s search: the shared protocol with the
    searched fields at ``values`` (path -> value), trained with the search's seed.
    Its config records the trial's index and the search (algorithm and seed), so
    a rerun that draws the same trials finds them stored."""
    spec = study.spec
    tuning = spec.design.tuning
    row = Row({"method": label, "protocol": TRIAL, "recipe": tuned_preset(spec), TRIAL: index, **values},
              "design.space", (tuning.search.seed,))
    search = tuning.search.record()
    expander = _Expander(study)  # the values are protocol.<path> columns of the row: set like factor levels
    return expander.finish(expander.cells(row, extra={TRIAL: {"index": index, "search": search}}))[0]


def tuned_cells(study: Study, chosen: dict[str, tuple[dict[str, Any], str]]) -> list[Cell]:
    """The chosen recipes' cells: for each method label, (values, the key of the
    trial that chose them), run with the study's seeds (fresh beside the trials')."""
    spec = study.spec
    expander = _Expander(study)
    cells = []
    for label, (values, trial_key) in chosen.items():
        row = Row({"method": label, "protocol": TUNED, "recipe": tuned_preset(spec)}, "design.space", spec.seeds)
        cells += expander.cells(row, _searched(values), {TUNED: {"trial": trial_key}})
    return expander.finish(cells)
