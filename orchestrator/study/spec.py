"""Study files: parse and validate YAML into frozen dataclasses.

Every problem in a study is collected (not just the first) and reported as
``file:line: key.path: what was expected``; the CLI prints them and exits 2
before anything is written. docs/STUDIES.md describes every key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rd3core.config import (ConfigError, Problem, bounded, bounds_of, build, canonical_json, describe_bounds,
                            field_types, merge, to_dict)
from rd3core.data import (DATASETS, HELDOUT_SEED, DatasetInfo, check_location, data_env_var, dataset_info,
                          heldout_problem, load_dataset)
from rd3core.pipeline import TeacherSpec
from rd3core.protocol import PRESETS, Protocol, preset_protocol_dict, resolve_protocol
from rd3core.synth import METHODS

from . import yamlsrc
from .design import ARMED, DESIGN_KINDS, Design, DesignSpec, build_design
from .tuning import Domain, space_problems
from .factors import FactorPath, field_path_problem, level_problems, parse_factor
from .resources import Resources, ResourcesSpec  # noqa: F401  (Resources: the per-job request)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Keys of a method entry that are not the method's own parameters.
# `baseline: true|false` marks a method as a baseline, shown beside the methods
# (the analysis reads it from the stored study; the registry's flag otherwise).
METHOD_KEYS = ("name", "label", "native_preset", "baseline")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str | None = None  # path to the data, or the RD3_DATA_<NAME> environment variable
    # Real training images per class carved out of the training split before any
    # stage sees it (rd3core.data.carve_heldout): posteval selects an epoch on them.
    heldout_per_class: int = bounded(0, ge=0, le=100_000)

    def validate(self):
        if self.name not in DATASETS:
            yield "name", DATASETS.unknown_message(self.name)
            return
        try:
            check_location(self.name, self.root)
            dataset_info(self.name, self.root)  # facts read from the data (imagefolder): a bad tree shows here
        except FileNotFoundError as exc:
            # rd3core names the study key and the variable; the command line has one more way.
            unset = self.root is None and data_env_var(self.name) not in os.environ
            yield "root", f"{exc}{' (or give run --data PATH)' if unset else ''}"
            return
        except ValueError as exc:
            yield "root", str(exc)
            return
        if self.heldout_per_class > 0:
            # Only then is the data read (its labels bound the carve): every class keeps a training image.
            try:
                problem = heldout_problem(load_dataset(self.name, self.root), self.heldout_per_class)
            except (OSError, ValueError) as exc:  # a tabled dataset's root is read only now: a bad tree shows here
                yield "root", str(exc)
                return
            if problem:
                yield "heldout_per_class", problem

    @property
    def info(self) -> DatasetInfo:
        return dataset_info(self.name, self.root)

    def identified(self) -> dict[str, Any]:
        """What cells and stages are keyed by, and what workers load
        (``orchestrator.execution.jobs``): name and root; for a dataset whose facts are read
        from its data, its content digest (two trees never share results); for a
        carved one, ``heldout_per_class`` and ``heldout_seed``, so its teachers,
        distilled sets and cells are never those of the whole training split.
        Keys at their default are left out: an uncarved dataset keys as before."""
        identity: dict[str, Any] = {"name": self.name, "root": self.root}
        digest = self.info.digest
        if digest:
            identity["digest"] = digest
        if self.heldout_per_class:
            identity.update(heldout_per_class=self.heldout_per_class, heldout_seed=HELDOUT_SEED)
        return identity


@dataclass(frozen=True)
class ProtocolBase:
    preset: str | None = None  # a named preset (python -m orchestrator list presets)
    # Any Protocol field, nested; they customise `preset` (the study's own protocol).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Applied to every protocol of the study, whatever its preset (native ones too):
    # what makes a study fit its hardware, such as the student or the epochs.
    common_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self):
        if self.preset is not None and self.preset not in PRESETS:
            yield "preset", PRESETS.unknown_message(self.preset)
        for leaf in sorted(_leaves(self.overrides) & _leaves(self.common_overrides)):
            yield f"common_overrides.{leaf}", ("also set under protocol.overrides: set it in one place "
                                               "(common_overrides apply to every preset)")


def _leaves(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict) or not data:
        return {prefix} if prefix else set()
    out: set[str] = set()
    for key, value in data.items():
        out |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


@dataclass(frozen=True)
class StudySpec:
    name: str
    dataset: DatasetSpec
    methods: tuple[Any, ...]  # each {name, label?, native_preset?, <param>: value}; checked by parse_method
    teachers: tuple[TeacherSpec, ...] = (TeacherSpec(),)  # the first is the primary teacher
    protocol: ProtocolBase = field(default_factory=ProtocolBase)
    design: DesignSpec | str = field(default_factory=DesignSpec)  # a mapping, or just the kind's name
    factors: dict[str, Any] = field(default_factory=dict)  # factor path -> list of levels
    exclude: tuple[dict[str, Any], ...] = ()  # each {factor: level, ...}: combinations to drop
    seeds: tuple[int, ...] = (0,)
    description: str = ""
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)

    def validate(self):
        if not NAME_RE.match(self.name):
            yield "name", "expected letters, digits, '_', '.', '-' (it names a results folder)"
        if not self.methods:
            yield "methods", "expected at least one method"
        if not self.teachers:
            yield "teachers", "expected at least one teacher"
        if not self.seeds:
            yield "seeds", "expected at least one seed"
        if len(set(self.seeds)) != len(self.seeds):
            yield "seeds", f"lists a seed twice: {list(self.seeds)}"
        if isinstance(self.design, str) and self.design not in DESIGN_KINDS:
            yield "design", f"unknown design {self.design!r} (known: {', '.join(DESIGN_KINDS)})"
        archs = [t.arch for t in self.teachers]
        for i, arch in enumerate(archs):
            if arch in archs[:i]:
                yield f"teachers[{i}].arch", (f"declares teacher {arch!r} twice (also teachers[{archs.index(arch)}]; "
                                              "teachers are named by arch)")
        for raw, levels in self.factors.items():
            path, message = parse_factor(raw)
            if path is None:
                yield f"factors.{raw}", message
            elif path.teacher is not None and path.teacher not in archs:
                yield f"factors.{raw}", f"no teacher with arch {path.teacher!r} (declared: {', '.join(archs)})"
            if not isinstance(levels, list) or not levels:
                yield f"factors.{raw}", f"expected a non-empty list of levels, got {levels!r}"


@dataclass(frozen=True)
class MethodConfig:
    name: str
    params: Any  # the method's frozen params dataclass
    label: str = ""  # its level in the `method` column (default: name)
    native_preset: str | None = None  # its published protocol (native_vs_unified)

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclass(frozen=True)
class Study:
    spec: StudySpec  # design normalised to a DesignSpec; a `seed` factor moved to seeds
    methods: tuple[MethodConfig, ...]
    source: yamlsrc.Source
    text: str
    design: Design | None = None  # the rows to expand

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def factor_columns(self) -> list[str]:
        """The factor columns every cell records (method first when shown)."""
        return list(self.design.columns) if self.design else list(self.spec.factors)


class StudyError(ValueError):
    """Every problem found in one study file, each with file:line and key path."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


def render(source: yamlsrc.Source, problems: list[Problem]) -> list[str]:
    return [f"{source.where(p.path)}: {p.path}: {p.message}" if p.path else f"{source.path}: {p.message}"
            for p in problems]


def native_preset(method: MethodConfig) -> str | None:
    return published_preset(method.native_preset, method.label, method.name)


def published_preset(native: str | None, label: str, name: str) -> str | None:
    """A method's published protocol: its ``native_preset``, else the preset named
    like its label, else like its registry name."""
    for candidate in (native, label, name):
        if isinstance(candidate, str) and candidate in PRESETS:
            return candidate
    return None


def parse_method(entry: Any, path: str) -> tuple[MethodConfig | None, list[Problem]]:
    if not isinstance(entry, dict):
        return None, [Problem(path, f"expected a mapping with 'name' and the method's parameters, got {entry!r}")]
    if "name" not in entry:
        return None, [Problem(f"{path}.name", "required key missing (a method name)")]
    name = entry["name"]
    if not isinstance(name, str) or name not in METHODS:
        return None, [Problem(f"{path}.name", METHODS.unknown_message(str(name)))]
    problems = []
    label, native = entry.get("label", name), entry.get("native_preset")
    if not isinstance(label, str) or not NAME_RE.match(label):
        problems.append(Problem(f"{path}.label", f"expected a short name (letters, digits, '_', '.', '-'), got {label!r}"))
    if native is not None and (not isinstance(native, str) or native not in PRESETS):
        problems.append(Problem(f"{path}.native_preset", PRESETS.unknown_message(str(native))))
    if "baseline" in entry and not isinstance(entry["baseline"], bool):
        problems.append(Problem(f"{path}.baseline", f"expected true or false, got {entry['baseline']!r}"))
    params = {k: v for k, v in entry.items() if k not in METHOD_KEYS}
    try:
        built = build(METHODS.get(name).params, params, path)
    except ConfigError as exc:
        return None, problems + exc.problems
    if problems:
        return None, problems
    return MethodConfig(name, built, label, native), []


def bounded_fields():
    """(key path, config class, field) of every bounded key of a study: the
    study's own keys, the protocol's (as overrides and factors name them) and
    each method's parameters."""
    def walk(cls: type, prefix: str):
        for f in fields(cls):
            if bounds_of(f):
                yield f"{prefix}{f.name}", cls, f
            for inner, many in _configs_in(field_types(cls)[f.name]):
                yield from walk(inner, f"{prefix}{f.name}{'[]' if many else ''}.")

    yield from walk(StudySpec, "")
    yield from walk(Protocol, "protocol.")
    for name in METHODS.names():
        yield from walk(METHODS.get(name).params, f"methods[name={name}].")


def list_bounds() -> list[str]:
    """``rd3 list bounds``: one line per bounded key."""
    return [f"{key}: {describe_bounds(bounds_of(f))}" for key, _, f in bounded_fields()]


def _configs_in(tp: Any, many: bool = False):
    """(config dataclass, inside a list?) for each dataclass a field's type holds."""
    if dataclasses.is_dataclass(tp):
        yield tp, many
    for arg in typing.get_args(tp):
        yield from _configs_in(arg, many or typing.get_origin(tp) is tuple)


def load_study(path: str | Path, text: str | None = None) -> Study:
    """Parse and validate everything but the per-cell resolution (done by expand)."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise StudyError([f"{path}: no such study file"])
    try:
        text = yamlsrc.read_text(path) if text is None else text
        source = yamlsrc.load(path, text)
    except yamlsrc.YamlSyntaxError as exc:
        raise StudyError([str(exc)]) from None
    if not isinstance(source.data, dict):
        raise StudyError([f"{path}: expected a mapping of study keys at the top level"])
    data = source.data
    problems = [Problem(path, message) for path, message in yamlsrc.unrecordable(data)]
    if problems:  # values no config can hold: report them alone, before they confuse other checks
        raise StudyError(render(source, problems))
    spec, problems = _build_spec(data)
    methods, method_problems = _methods(data.get("methods"))
    problems += method_problems
    if isinstance(data.get("protocol"), dict) or spec is not None:
        problems += _base_protocol_problems(data)
    study = None
    if spec is not None and not method_problems:
        spec, found = _normalise(spec, data)
        problems += found
        if not found:
            study, found = _check_design(Study(spec, tuple(methods), source, text))
            problems += found
    if problems:
        raise StudyError(render(source, list(dict.fromkeys(problems))))
    return study


# Keys whose problems do not stop the design from being checked (the design
# does not depend on them), so a study with several mistakes shows them all.
_INDEPENDENT = {"name": "study", "description": "", "dataset": {"name": "digits"}, "resources": {}}


def _build_spec(data: dict) -> tuple[StudySpec | None, list[Problem]]:
    try:
        return build(StudySpec, data), []
    except ConfigError as exc:
        problems = exc.problems
    roots = {re.split(r"[.\[]", p.path)[0] for p in problems}
    unknown = roots - {f.name for f in fields(StudySpec)}
    if roots - unknown <= set(_INDEPENDENT):
        patched = {k: v for k, v in data.items() if k not in unknown}
        patched.update({k: _INDEPENDENT[k] for k in roots - unknown})
        try:  # only to check the rest: the problems found are raised anyway
            return build(StudySpec, patched), problems
        except ConfigError:
            pass
    return None, problems


def _methods(entries: Any) -> tuple[list[MethodConfig], list[Problem]]:
    problems: list[Problem] = []
    methods: list[MethodConfig] = []
    labels: dict[str, int] = {}
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        method, found = parse_method(entry, f"methods[{i}]")
        problems += found
        if method is None:
            continue
        if method.label in labels:
            key = "label" if isinstance(entry, dict) and "label" in entry else "name"
            problems.append(Problem(f"methods[{i}].{key}", f"method {method.label!r} is listed twice (also "
                                    f"methods[{labels[method.label]}]): vary its parameters with a factor such as "
                                    "method.ipc, or give each entry its own 'label'"))
        labels.setdefault(method.label, i)
        methods.append(method)
    return methods, problems


def _normalise(spec: StudySpec, data: dict) -> tuple[StudySpec, list[Problem]]:
    """A design given by name becomes a DesignSpec; a `seed` factor becomes the seeds."""
    problems: list[Problem] = []
    design = DesignSpec(kind=spec.design) if isinstance(spec.design, str) else spec.design
    factors = dict(spec.factors)
    seeds = spec.seeds
    if "seed" in factors:
        levels = factors.pop("seed")
        if "seeds" in data:
            problems.append(Problem("factors.seed", "the seeds are given twice (here and under 'seeds'): keep one"))
        elif not all(isinstance(s, int) and not isinstance(s, bool) for s in levels):
            problems.append(Problem("factors.seed", f"expected a list of int seeds, got {levels!r}"))
        else:
            seeds = tuple(levels)
    for i, group in enumerate(design.zip):
        if "seed" in group:
            problems.append(Problem(f"design.zip[{i}]", "seeds are crossed with every cell so that comparisons "
                                    "stay paired: 'seed' cannot be zipped"))
    return replace(spec, design=design, factors=factors, seeds=seeds), problems


def _family(data: dict) -> str:
    dataset = data.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else None
    root = dataset.get("root") if isinstance(dataset, dict) else None
    if not isinstance(name, str) or name not in DATASETS:
        return "cifar"
    try:
        return dataset_info(name, root if isinstance(root, str) else None).family
    except (FileNotFoundError, ValueError):  # reported at dataset.root
        return "cifar"


def _base_protocol_problems(data: dict) -> list[Problem]:
    """The study's own protocol (preset + overrides) and the common overrides
    on their own, so their problems are reported with the rest."""
    base = data.get("protocol") or {}
    if not isinstance(base, dict):
        return []
    preset, overrides, common = base.get("preset"), base.get("overrides") or {}, base.get("common_overrides") or {}
    if (preset is not None and (not isinstance(preset, str) or preset not in PRESETS)) or \
            not isinstance(overrides, dict) or not isinstance(common, dict):
        return []  # already reported by the StudySpec build
    family = _family(data)
    problems: list[Problem] = []
    for where, extra in (("protocol.overrides", overrides), ("protocol.common_overrides", common)):
        if extra or where == "protocol.overrides":
            try:
                resolve_protocol(preset, family, extra, where)
            except ConfigError as exc:
                problems += exc.problems
    return problems


def base_protocol_dict(spec: StudySpec, family: str, preset: str | None, customised: bool) -> dict:
    """Plain protocol data before factor levels: the preset, its overrides when
    it is the study's own protocol, then the common overrides."""
    data = preset_protocol_dict(preset, family) if preset else {}
    if customised:
        data = merge(data, spec.protocol.overrides)
    return merge(data, spec.protocol.common_overrides)


def _check_design(study: Study) -> tuple[Study, list[Problem]]:
    """Build the design's rows and check each factor level on its own."""
    spec = study.spec
    labels = [m.label for m in study.methods]
    design, problems = build_design(spec.design, spec.factors, labels, spec.protocol.preset, spec.seeds,
                                    spec.exclude, {m.label: native_preset(m) for m in study.methods},
                                    tuple(m.label for m in study.methods if m.name == "random_real"))
    if spec.design.kind in ARMED:
        for i, method in enumerate(study.methods):
            if native_preset(method) is None:
                problems.append(Problem(f"methods[{i}].name", f"method {method.label!r} has no published preset "
                                        "of the same name: give its entry native_preset: <preset> (presets: "
                                        f"{', '.join(PRESETS.names())})"))
    family = _family(study.source.data)
    if spec.design.kind == "tuned":
        problems += _tuning_problems(spec, family, study.source.data)
    if design is None:
        return study, problems
    by_label = {m.label: m for m in study.methods}
    protocol_base = base_protocol_dict(spec, family, spec.protocol.preset, True)
    teachers = {t.arch: t for t in spec.teachers}
    params_seen: set[tuple[str, str]] = set()
    for (column, _), (level, where) in design.levels.items():
        if column == "method":
            if not isinstance(level, str) or level not in by_label:
                problems.append(Problem(where, f"unknown method {level!r}: expected the label of a method listed "
                                        f"under 'methods' ({', '.join(labels)})"))
            continue
        if column in ("protocol", "recipe", "seed"):
            continue
        path, message = parse_factor(column)
        if path is None or path.kind == "seed":
            continue  # reported where the name is
        if path.kind == "preset":
            if not isinstance(level, str) or level not in PRESETS:
                problems.append(Problem(where, PRESETS.unknown_message(str(level))))
        elif path.kind == "protocol":
            problems += level_problems(path, level, where, protocol_base=protocol_base)
        elif path.kind == "teacher":
            problems += level_problems(path, level, where, teacher=teachers.get(path.teacher, spec.teachers[0]))
    for row in design.rows:  # method parameters: checked against the methods each level meets
        label = row.levels.get("method")
        method = by_label.get(label) if isinstance(label, str) else None
        if method is None:
            continue
        for column, level in row.levels.items():
            if not column.startswith("method."):
                continue
            seen_key = (method.label, column + "=" + repr(level))
            if seen_key in params_seen:
                continue
            params_seen.add(seen_key)
            problems += _param_problems(method, parse_factor(column)[0], level, design, column)
    return replace(study, design=design), list(dict.fromkeys(problems))


def tuned_preset(spec: StudySpec) -> str | None:
    """The shared preset a tuned design searches around."""
    return (spec.design.unified or (spec.protocol.preset,))[0]


def search_domains(spec: StudySpec) -> dict[str, Domain]:
    """A (validated) tuned design's space: path -> domain."""
    preset = tuned_preset(spec)
    base = base_protocol_dict(spec, spec.dataset.info.family, preset, preset == spec.protocol.preset)
    return space_problems(spec.design.tuning, base)[0]


def _tuning_problems(spec: StudySpec, family: str, data: dict) -> list[Problem]:
    tuning = spec.design.tuning
    problems: list[Problem] = []
    dataset = data.get("dataset")  # as written: a dataset refused elsewhere is checked as digits here
    if not (isinstance(dataset, dict) and dataset.get("heldout_per_class")):
        problems.append(Problem("design", "the tuned design selects every method's recipe on held-out real training "
                                "images, never on the test set: set dataset.heldout_per_class (e.g. 5)"))
    if tuning.search.seed in spec.seeds:
        problems.append(Problem("design.search.seed", f"seed {tuning.search.seed} trains the search's trials; the "
                                "chosen recipes are rerun with the study's seeds, which must be fresh: use a search "
                                f"seed that is not in seeds {list(spec.seeds)}"))
    preset = tuned_preset(spec)
    if preset is not None:
        problems += space_problems(tuning, base_protocol_dict(spec, family, preset, preset == spec.protocol.preset))[1]
    return problems


def _param_problems(method: MethodConfig, path: FactorPath, level: Any, design: Design, column: str) -> list[Problem]:
    where = design.levels[(column, canonical_json(level))][1]
    cls = type(method.params)
    missing = field_path_problem(cls, path.sub)
    if missing:
        return [Problem(where.rsplit("[", 1)[0] if where.startswith("factors.") else where,
                        f"method {method.label!r} has no parameter {path.sub!r}: {missing}")]
    return level_problems(path, level, where, params=(method.label, cls, to_dict(method.params)))

