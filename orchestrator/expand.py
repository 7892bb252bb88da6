"""Cells: the study's factor combinations x methods x seeds, each with its fully
resolved config and a stable id (hash of that config).

Seeds are shared by every method and protocol, so method comparisons are paired.
Distinct (preset, protocol overrides) combinations are resolved once each:
a 10,000-cell study usually has far fewer distinct protocols than cells.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from rd3core.config import ConfigError, Problem, build, canonical_json, set_path, stable_hash, to_dict
from rd3core.data import dataset_info
from rd3core.pipeline import TeacherSpec
from rd3core.protocol import Protocol, resolve_protocol
from rd3core.synth import METHODS

from .spec import DatasetSpec, MethodConfig, Study, StudyError, render


@dataclass(frozen=True)
class Cell:
    key: str
    seed: int
    factors: dict[str, Any]  # factor path -> level (plus "method" when a study has several)
    dataset: DatasetSpec
    method: MethodConfig
    preset: str | None
    protocol: Protocol
    teachers: tuple[TeacherSpec, ...]  # every teacher the cell uses; [0] serves synthesis
    config: dict[str, Any]  # canonical resolved config, stored with the result


def _label_teachers(protocol: Protocol, study: Study) -> tuple[TeacherSpec, ...]:
    by_arch = {t.arch: t for t in study.spec.teachers}
    if protocol.labels.mode == "hard":
        return ()
    names = protocol.labels.teachers or (study.spec.teachers[0].arch,)
    return tuple(by_arch[n] for n in names)


def expand(study: Study) -> list[Cell]:
    spec = study.spec
    family = dataset_info(spec.dataset.name).family
    factor_paths = list(spec.factors)
    problems: list[Problem] = []
    protocols: dict[str, Protocol | None] = {}
    teacher_archs = {t.arch for t in spec.teachers}
    cells: list[Cell] = []
    seen: dict[str, dict] = {}
    checked: set[str] = set()
    for index, method in enumerate(study.methods):
        method_fields = to_dict(method.params)
        for levels in itertools.product(*(spec.factors[p] for p in factor_paths)):
            combo = dict(zip(factor_paths, levels))
            preset = combo.get("preset", spec.protocol.preset)
            overrides = dict(spec.protocol.overrides)
            params = dict(method_fields)
            for path, level in combo.items():
                if path.startswith("protocol."):
                    overrides = set_path(overrides, path[len("protocol."):], level)
                elif path.startswith("method."):
                    name = path[len("method."):]
                    if name not in params:
                        problems.append(Problem(f"factors.{path}", f"method {method.name!r} has no parameter "
                                                f"{name!r} (it has: {', '.join(params)})"))
                        continue
                    params[name] = level
            pkey = canonical_json({"preset": preset, "overrides": overrides})
            if pkey not in protocols:
                try:
                    protocols[pkey] = resolve_protocol(preset, family, overrides, "protocol.overrides")
                except ConfigError as exc:
                    protocols[pkey] = None
                    where = " (with " + ", ".join(f"{p}={v!r}" for p, v in combo.items()) + ")" if combo else ""
                    problems += [Problem(p.path, p.message + where) for p in exc.problems]
                    continue
                missing = [t for t in protocols[pkey].labels.teachers if t not in teacher_archs]
                if missing:
                    problems.append(Problem("protocol.overrides.labels.teachers",
                                            f"labels need teachers {missing} that the study does not declare "
                                            f"under 'teachers' (declared: {sorted(teacher_archs)})"))
                    protocols[pkey] = None
            protocol = protocols[pkey]
            if protocol is None:
                continue
            try:
                method_params = build(METHODS.get(method.name).params, params, "methods")
            except ConfigError as exc:
                problems += exc.problems
                continue
            if canonical_json([method.name, method_params]) not in checked:  # dataset/teacher-dependent checks
                checked.add(canonical_json([method.name, method_params]))
                problems += [Problem(f"methods[{index}].{sub}", message) for sub, message in METHODS.get(method.name)
                             .problems(method_params, dataset_info(spec.dataset.name), spec.teachers[0].arch)]
            cell_method = replace(method, params=method_params)
            teachers = _label_teachers(protocol, study)
            if METHODS.get(method.name).needs_teacher and spec.teachers[0] not in teachers:
                teachers = (spec.teachers[0],) + teachers
            factors: dict[str, Any] = {"method": method.name} if len(study.methods) > 1 else {}
            factors.update(combo)
            for seed in spec.seeds:
                config = {
                    "dataset": to_dict(spec.dataset),
                    "method": {"name": method.name, **to_dict(method_params)},
                    "preset": preset,
                    "protocol": to_dict(protocol),
                    "teachers": [to_dict(t) for t in teachers],
                    "seed": seed,
                }
                key = stable_hash(config)
                if key in seen:
                    problems.append(Problem("factors", f"two factor combinations resolve to the same cell: "
                                            f"{seen[key]} and {factors} (seed {seed})"))
                    continue
                seen[key] = factors
                cells.append(Cell(key, seed, factors, spec.dataset, cell_method, preset, protocol, teachers, config))
    if problems:
        raise StudyError(render(study.source, list(dict.fromkeys(problems))))
    return cells
