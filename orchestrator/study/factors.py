"""Factor names: what a study may vary, and how one level is checked on its own.

A factor is named by a path:

- ``preset``: the protocol preset; ``method``: which of the study's methods;
  ``seed``: an alias of the top-level ``seeds`` (always crossed, never paired);
- ``protocol.<field path>``: any Protocol field, nested (``protocol.labels.mode``);
- ``method.<parameter>``: a parameter of the methods (``method.ipc``);
- ``teacher.<field path>``: a field of the primary (first) teacher;
  ``teacher[<arch>].<field path>``: of the teacher declared with that arch.

Each level is checked alone against the study's base settings so that a bad
level is reported at its own line; checks that need the whole combination (one
field's validity depending on another) run when cells are expanded.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from rd3core.config import ConfigError, Problem, build, field_types, merge, set_path, to_dict
from rd3core.pipeline import TeacherSpec
from rd3core.protocol import Protocol

NAMED = ("preset", "method", "seed")
_TEACHER_RE = re.compile(r"^teacher\[(?P<arch>[^\]]+)\]\.(?P<sub>.+)$")
GRAMMAR = ("'preset', 'method', 'seed', 'protocol.<field>', 'method.<parameter>', "
           "'teacher.<field>' or 'teacher[<arch>].<field>'")


@dataclass(frozen=True)
class FactorPath:
    raw: str
    kind: str  # preset | method | seed | protocol | param | teacher
    sub: str = ""  # the field path inside its kind (protocol/param/teacher)
    teacher: str | None = None  # teacher[<arch>]; None: the primary teacher


def parse_factor(raw: Any) -> tuple[FactorPath | None, str | None]:
    """(path, None) or (None, what was expected)."""
    if not isinstance(raw, str):
        return None, f"expected a factor name ({GRAMMAR}), got {raw!r}"
    if raw in NAMED:
        return FactorPath(raw, raw), None
    match = _TEACHER_RE.match(raw)
    if match:
        return _checked(FactorPath(raw, "teacher", match["sub"], match["arch"]), TeacherSpec)
    root, dot, sub = raw.partition(".")
    if dot and sub:
        if root == "protocol":
            return _checked(FactorPath(raw, "protocol", sub), Protocol)
        if root == "method":
            return FactorPath(raw, "param", sub), None  # checked per method (parameters differ)
        if root == "teacher":
            return _checked(FactorPath(raw, "teacher", sub), TeacherSpec)
    return None, f"unknown factor {raw!r}: expected {GRAMMAR}"


def _checked(path: FactorPath, cls: type) -> tuple[FactorPath | None, str | None]:
    problem = field_path_problem(cls, path.sub)
    return (None, problem) if problem else (path, None)


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def field_path_problem(cls: type, sub: str) -> str | None:
    """None when ``sub`` names a field (at any depth) of dataclass ``cls``."""
    current: type | None = cls
    done: list[str] = []
    for part in sub.split("."):
        if current is None:
            return f"{'.'.join(done)!r} is a single setting, not a group: nothing to set at {sub!r}"
        hints = field_types(current)
        if part not in hints:
            return f"{current.__name__} has no field {part!r} (fields: {', '.join(sorted(hints))})"
        done.append(part)
        current = _dataclass_in(hints[part])
    return None


def _rewrite(problems: list[Problem], inner: str, where: str) -> list[Problem]:
    """Keep the problems about the factor's own field (``inner`` and below),
    renamed to the level's key path ``where``; the rest depend on other
    settings and are checked per combination."""
    out = []
    for p in problems:
        if p.path == inner or p.path.startswith((inner + ".", inner + "[")):
            out.append(Problem(where + p.path[len(inner):], p.message))
    return out


def level_problems(path: FactorPath, level: Any, where: str, *, protocol_base: dict | None = None,
                   teacher: TeacherSpec | None = None, params: tuple[str, type, dict] | None = None
                   ) -> list[Problem]:
    """Problems of one level alone. ``protocol_base``: the base protocol as plain
    data; ``teacher``: the teacher the factor modifies; ``params``: (method
    label, params class, base params as plain data)."""
    if path.kind == "protocol" and protocol_base is not None:
        return _try(Protocol, apply_level(protocol_base, path.sub, level), "protocol", path.sub, where)
    if path.kind == "teacher" and teacher is not None:
        return _try(TeacherSpec, apply_level(to_dict(teacher), path.sub, level), "teacher", path.sub, where)
    if path.kind == "param" and params is not None:
        label, cls, base = params
        found = _try(cls, apply_level(base, path.sub, level), "method", path.sub, where)
        return [Problem(p.path, f"{p.message} (method {label!r})") for p in found]
    return []


def _try(cls: type, data: dict, root: str, sub: str, where: str) -> list[Problem]:
    try:
        build(cls, data, root)
    except ConfigError as exc:
        return _rewrite(exc.problems, f"{root}.{sub}", where)
    return []


def apply_level(base: dict, sub: str, level: Any) -> dict:
    """``base`` with the field at ``sub`` set to ``level``; a mapping level merges
    into a group of settings like an override does."""
    return merge(base, set_path({}, sub, level))
