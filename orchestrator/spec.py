"""Study files: parse and validate YAML into frozen dataclasses.

Every problem in a study is collected (not just the first) and reported as
``file:line: key.path: what was expected``; the CLI prints them and exits 2
before anything is written.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rd3core.config import ConfigError, Problem, build
from rd3core.data import DATASETS, check_location
from rd3core.pipeline import TeacherSpec
from rd3core.protocol import PRESETS, resolve_protocol
from rd3core.synth import METHODS

from . import yamlsrc

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
FACTOR_ROOTS = ("protocol.", "method.")
FACTOR_NAMES = ("preset",)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str | None = None  # path to the data, or the RD3_DATA_<NAME> environment variable

    def validate(self):
        if self.name not in DATASETS:
            yield "name", DATASETS.unknown_message(self.name)
            return
        try:
            check_location(self.name, self.root)
        except FileNotFoundError as exc:
            yield "root", str(exc)


@dataclass(frozen=True)
class ProtocolBase:
    preset: str | None = None  # a named preset (python -m orchestrator list presets)
    overrides: dict[str, Any] = field(default_factory=dict)  # any Protocol field, nested

    def validate(self):
        if self.preset is not None and self.preset not in PRESETS:
            yield "preset", PRESETS.unknown_message(self.preset)


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0  # per job
    gpus: float = 0.0  # per job; fractions share a GPU

    def validate(self):
        if self.cpus <= 0:
            yield "cpus", f"expected > 0, got {self.cpus}"
        if self.gpus < 0:
            yield "gpus", f"expected >= 0, got {self.gpus}"


@dataclass(frozen=True)
class StudySpec:
    name: str
    dataset: DatasetSpec
    methods: tuple[Any, ...]  # each {name: <method>, <param>: value, ...}; checked by parse_method
    teachers: tuple[TeacherSpec, ...] = (TeacherSpec(),)  # the first is the primary teacher
    protocol: ProtocolBase = field(default_factory=ProtocolBase)
    factors: dict[str, Any] = field(default_factory=dict)  # factor path -> list of levels
    seeds: tuple[int, ...] = (0,)
    description: str = ""
    resources: Resources = field(default_factory=Resources)

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
        archs = [t.arch for t in self.teachers]
        for arch in {a for a in archs if archs.count(a) > 1}:
            yield "teachers", f"declares teacher {arch!r} twice (teachers are named by arch)"
        for path, levels in self.factors.items():
            if not (path in FACTOR_NAMES or path.startswith(FACTOR_ROOTS)):
                yield f"factors.{path}", ("unknown factor: expected 'preset', 'protocol.<field path>' or "
                                          "'method.<parameter>'")
            elif not isinstance(levels, list) or not levels:
                yield f"factors.{path}", f"expected a non-empty list of levels, got {levels!r}"
            elif len({repr(v) for v in levels}) != len(levels):
                yield f"factors.{path}", f"lists a level twice: {levels}"


@dataclass(frozen=True)
class MethodConfig:
    name: str
    params: Any  # the method's frozen params dataclass


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    methods: tuple[MethodConfig, ...]
    source: yamlsrc.Source
    text: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class StudyError(ValueError):
    """Every problem found in one study file, each with file:line and key path."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


def render(source: yamlsrc.Source, problems: list[Problem]) -> list[str]:
    return [f"{source.where(p.path)}: {p.path}: {p.message}" if p.path else f"{source.path}: {p.message}"
            for p in problems]


def parse_method(entry: Any, path: str) -> tuple[MethodConfig | None, list[Problem]]:
    if not isinstance(entry, dict):
        return None, [Problem(path, f"expected a mapping with 'name' and the method's parameters, got {entry!r}")]
    if "name" not in entry:
        return None, [Problem(f"{path}.name", "required key missing (a method name)")]
    name = entry["name"]
    if not isinstance(name, str) or name not in METHODS:
        return None, [Problem(f"{path}.name", METHODS.unknown_message(str(name)))]
    params = {k: v for k, v in entry.items() if k != "name"}
    try:
        return MethodConfig(name, build(METHODS.get(name).params, params, path)), []
    except ConfigError as exc:
        return None, exc.problems


def load_study(path: str | Path, text: str | None = None) -> Study:
    """Parse and validate the study's own structure (cells are checked by expand)."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise StudyError([f"{path}: no such study file"])
        text = path.read_text()
    try:
        source = yamlsrc.load(path, text)
    except yamlsrc.YamlSyntaxError as exc:
        raise StudyError([str(exc)]) from None
    if not isinstance(source.data, dict):
        raise StudyError([f"{path}: expected a mapping of study keys at the top level"])
    problems: list[Problem] = []
    spec = None
    try:
        spec = build(StudySpec, source.data)
    except ConfigError as exc:
        problems += exc.problems
    methods: list[MethodConfig] = []
    names: list[str] = []
    for i, entry in enumerate(source.data.get("methods") or []):
        method, found = parse_method(entry, f"methods[{i}]")
        problems += found
        if method is not None:
            if method.name in names:
                problems.append(Problem(f"methods[{i}].name", f"method {method.name!r} listed twice; vary its "
                                        "parameters with a factor such as method.ipc"))
            names.append(method.name)
            methods.append(method)
    if spec is not None or isinstance(source.data.get("protocol"), dict):
        # Check the base protocol now, so its problems are reported together
        # with the rest (factor levels are checked cell by cell in expand).
        problems += _base_protocol_problems(source.data)
    if problems:
        raise StudyError(render(source, list(dict.fromkeys(problems))))
    return Study(spec, tuple(methods), source, text)


def _base_protocol_problems(data: dict) -> list[Problem]:
    base = data.get("protocol") or {}
    preset, overrides = base.get("preset"), base.get("overrides") or {}
    if (preset is not None and preset not in PRESETS) or not isinstance(overrides, dict):
        return []  # already reported by the StudySpec build
    dataset = (data.get("dataset") or {}).get("name") if isinstance(data.get("dataset"), dict) else None
    family = DATASETS.get(dataset)[0].family if dataset in DATASETS else "cifar"
    try:
        resolve_protocol(preset, family, overrides, "protocol.overrides")
    except ConfigError as exc:
        return exc.problems
    return []
