"""Frozen-dataclass configs built from plain mappings (YAML), strictly.

Every config in the project (Protocol, teacher and method specs, the study file)
goes through :func:`build`, so they share one behaviour: unknown keys are errors,
types are checked, *all* problems are reported at once with their dotted key
path, and a ``validate()`` method on a dataclass adds cross-field checks.
:func:`to_dict` and :func:`stable_hash` give the canonical form that is stored
with every result and hashed into cell and stage ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class _Invalid:
    """Marks a value that failed conversion; its problem is already recorded."""

    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Invalid()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


_hints_cache: dict[type, dict[str, Any]] = {}
_PLAIN = frozenset((str, int, float, bool, type(None)))


def field_types(cls: type) -> dict[str, Any]:
    if cls not in _hints_cache:
        _hints_cache[cls] = typing.get_type_hints(cls)
    return _hints_cache[cls]


_fields_cache: dict[type, dict[str, dataclasses.Field]] = {}


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    if cls not in _fields_cache:
        _fields_cache[cls] = {f.name: f for f in dataclasses.fields(cls) if f.init}
    return _fields_cache[cls]


def _convert(tp: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """Return ``value`` as type ``tp`` or append a Problem and return _BAD."""
    if type(value) is tp and tp in _PLAIN:  # the common case, first: large studies build many configs
        return value
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        shaped: list[Problem] | None = None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[Problem] = []
            out = _convert(arg, value, path, trial)
            if not trial:
                return out
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                shaped = trial
        # A mapping for the one dataclass member: its own problems say more than the union's name.
        problems.extend(shaped or [Problem(path, f"expected {_type_name(tp)}, got {value!r}")])
        return _BAD
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}"))
        return _BAD
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}"))
            return _BAD
        return _build(tp, value, path, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}"))
            return _BAD
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            items = tuple(_convert(args[0], v, _join(path, i), problems) for i, v in enumerate(value))
            return _BAD if any(v is _BAD for v in items) else items
        if len(value) != len(args):
            problems.append(Problem(path, f"expected a list of {len(args)} values, got {value!r}"))
            return _BAD
        items = tuple(_convert(a, v, _join(path, i), problems) for i, (a, v) in enumerate(zip(args, value)))
        return _BAD if any(v is _BAD for v in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            problems.append(Problem(path, f"expected a mapping, got {value!r}"))
            return _BAD
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    problems.append(Problem(path, f"expected {_type_name(tp)}, got {value!r}"))
    return _BAD


def _build(cls: type, data: Mapping, path: str, problems: list[Problem]) -> Any:
    hints = field_types(cls)
    fields = _init_fields(cls)
    kwargs: dict[str, Any] = {}
    blocked = False  # a value we cannot construct with; unknown keys do not block
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(Problem(_join(path, str(key)), f"unknown key (expected one of: {known})"))
            continue
        kwargs[key] = _convert(hints[key], value, _join(path, key), problems)
        blocked |= kwargs[key] is _BAD
        if not blocked and (bad := bound_problem(fields[key], kwargs[key])):
            problems.append(Problem(_join(path, key), bad))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(_join(path, name), f"required key missing ({_type_name(hints[name])})"))
            blocked = True
    if blocked:
        return _BAD
    # Constructed even when a child reported validate() problems, so this level's
    # own checks run too and the user sees every problem at once.
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        for sub, message in validate():
            problems.append(Problem(_join(path, sub) if sub else path, message))
    return obj


def build(cls: type, data: Mapping | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; raise ConfigError listing every problem."""
    problems: list[Problem] = []
    obj = _convert(cls, {} if data is None else data, path, problems)
    if problems:
        raise ConfigError(problems)
    return obj


_BOUNDS = "rd3.bounds"
_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A numeric field with bounds that :func:`build` enforces (on numbers only:
    a field that also takes a string or null keeps those). The bounds are the
    documented ones (``rd3 list bounds`` prints them all): lower ones where a run
    cannot mean anything else, upper ones far beyond any published recipe, so a
    typo of a few digits is refused before a run is planned on it."""
    bounds = {op: v for op, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={_BOUNDS: bounds})


def bounds_of(f: dataclasses.Field) -> dict[str, float]:
    """A field's bounds: {"ge"|"gt"|"le"|"lt": limit} (empty when it has none)."""
    return f.metadata.get(_BOUNDS, {})


def describe_bounds(bounds: Mapping[str, float]) -> str:
    return ", ".join(f"{_OPS[op][0]} {_number(limit)}" for op, limit in bounds.items())


def bound_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is outside field ``f``'s bounds, or None."""
    bounds = bounds_of(f)
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    for op, limit in bounds.items():
        sign, holds = _OPS[op]
        if not holds(value, limit):
            return f"expected {sign} {_number(limit)}, got {value}"
    return None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


_ADDED = "rd3.added_field"


def added_field(default: Any) -> Any:
    """A config field added after results were stored without it. :func:`to_dict`
    leaves it out while it holds ``default``, so every cell id and stage key hashed
    before it existed stays the same (as a dataset's identity leaves out keys at
    their default); set to anything else, it is stored and hashed like any field."""
    return dataclasses.field(default=default, metadata={_ADDED: True})


# Per dataclass: its field names, and the added fields' defaults in canonical form.
_FIELD_NAMES: dict[type, tuple[tuple[str, ...], dict[str, Any]]] = {}


def to_dict(obj: Any) -> Any:
    """Canonical plain-data form (tuples become lists), as stored and hashed."""
    # Exact-type fast paths first: every cell id hashes its whole resolved
    # config, and the generic checks below dominate expanding large studies.
    kind = type(obj)
    if kind in _PLAIN:
        return obj
    if kind is dict:
        return {str(k): to_dict(v) for k, v in obj.items()}
    if kind is list or kind is tuple:
        return [to_dict(v) for v in obj]
    known = _FIELD_NAMES.get(kind)
    if known is None and dataclasses.is_dataclass(kind):
        fs = dataclasses.fields(kind)
        known = _FIELD_NAMES[kind] = (tuple(f.name for f in fs),
                                      {f.name: to_dict(f.default) for f in fs if f.metadata.get(_ADDED)})
    if known is not None:
        names, added = known
        out = {name: to_dict(getattr(obj, name)) for name in names}
        for name, default in added.items():
            if out[name] == default:
                del out[name]
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def canonical_json(data: Any, *, plain: bool = False) -> str:
    """``plain=True`` skips :func:`to_dict` for data that is already its output
    (same text, a walk saved per call when hashing many configs)."""
    # allow_nan=False: NaN != NaN would give one config two hashes.
    return json.dumps(data if plain else to_dict(data), sort_keys=True, separators=(",", ":"), allow_nan=False)


def stable_hash(data: Any, length: int = 16, *, plain: bool = False) -> str:
    return hashlib.sha256(canonical_json(data, plain=plain).encode()).hexdigest()[:length]


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """Return a copy of nested plain ``data`` with ``dotted`` set to ``value``
    (intermediate mappings are created). Used for preset overrides and factors,
    which are then re-validated by :func:`build`."""
    head, _, rest = dotted.partition(".")
    out = dict(data)
    if not rest:
        out[head] = value
    else:
        inner = out.get(head)
        out[head] = set_path(inner if isinstance(inner, Mapping) else {}, rest, value)
    return out


def merge(base: Mapping, overrides: Mapping) -> dict:
    """Deep-merge plain mappings: nested mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
