"""Values that must survive a round trip through either engine unchanged.

- Times: always timezone-aware UTC. SQLite has no time zone type (SQLAlchemy
  stores a naive string), so UTC is normalised on the way in and attached again
  on the way out; PostgreSQL's timestamptz comes back in the session's zone and
  is converted to UTC.
- Floats: SQLite stores NaN as NULL, so a NaN would read back as "missing".
  Every float column that can hold NaN stores NULL plus a marker (``metric.is_nan``,
  ``epoch_metric.nan_fields``, ``cell_factor.kind = 'float'`` with a NULL value);
  +-inf are stored as they are on both engines. The same rule on both engines,
  so raw SQL behaves the same on SQLite and PostgreSQL.
- A cell's metrics are also packed on its row (``pack_metrics``: names as a
  JSON array, values as little-endian float64, NaN and inf as they are), so
  that reading a whole study costs one row per cell, not one per metric.
- Factor levels: a typed key/value row per factor (kind + one value column), so
  a pivot never guesses whether "1" was an int, a float or a string.
"""
from __future__ import annotations

import enum
import json
import math
import struct
from datetime import datetime, timezone
from typing import Any, Mapping

from sqlalchemy import DateTime
from sqlalchemy.types import TypeDecorator

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every engine; naive input is refused,
    because guessing its zone is how times go wrong years later."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware times (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def split_float(value: Any) -> tuple[float | None, bool]:
    """(what to store, is NaN): NaN is stored as NULL with its marker set."""
    if value is None:
        return None, False
    value = float(value)
    return (None, True) if math.isnan(value) else (value, False)


def join_float(value: float | None, is_nan: bool) -> float | None:
    return math.nan if is_nan else value


def pack_metrics(metrics: Mapping[str, float | None]) -> tuple[str, bytes]:
    """A cell's metrics as (names, values): the names sorted, as a JSON array;
    the values in that order as little-endian float64 (None becomes NaN, as
    results_frame reads a missing value). db.frames decodes them."""
    names = sorted(metrics)
    values = [math.nan if metrics[n] is None else float(metrics[n]) for n in names]
    return json.dumps(names), struct.pack(f"<{len(values)}d", *values)


class FactorKind(str, enum.Enum):
    int = "int"
    float = "float"
    str = "str"
    bool = "bool"
    null = "null"
    json = "json"  # lists and mappings: canonical JSON text in value_str


def encode_factor(value: Any) -> dict[str, Any]:
    """One factor level as the columns of a ``cell_factor`` row."""
    row: dict[str, Any] = {"value_int": None, "value_float": None, "value_str": None, "value_bool": None}
    if value is None:
        kind = FactorKind.null
    elif isinstance(value, bool):  # before int: bool is an int subclass
        kind, row["value_bool"] = FactorKind.bool, value
    elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        kind, row["value_int"] = FactorKind.int, value
    elif isinstance(value, float):
        kind, row["value_float"] = FactorKind.float, (None if math.isnan(value) else value)
    elif isinstance(value, str):
        kind, row["value_str"] = FactorKind.str, value
    else:
        kind, row["value_str"] = FactorKind.json, json.dumps(value, sort_keys=True, separators=(",", ":"))
    row["kind"] = kind
    return row


def decode_factor(kind: FactorKind | str, value_int: int | None, value_float: float | None,
                  value_str: str | None, value_bool: bool | None) -> Any:
    kind = FactorKind(kind)
    if kind is FactorKind.int:
        return int(value_int)
    if kind is FactorKind.float:
        return math.nan if value_float is None else float(value_float)
    if kind is FactorKind.bool:
        return bool(value_bool)
    if kind is FactorKind.str:
        return value_str
    if kind is FactorKind.json:
        return json.loads(value_str)
    return None


# JSON columns (factors, config, env): strict JSON on both engines (PostgreSQL
# refuses NaN/Infinity tokens; SQLite's json functions too), non-finite floats
# tagged so they read back as floats.
_FLOAT_TAG = "$float"


def _tag(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _tag(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag(v) for v in value]
    return value


def _untag(obj: dict) -> Any:
    return float(obj[_FLOAT_TAG]) if len(obj) == 1 and _FLOAT_TAG in obj else obj


def json_dumps(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere: the rare slow path
        return json.dumps(_tag(value), allow_nan=False)


def json_loads(text: str | bytes) -> Any:
    return json.loads(text, object_hook=_untag)
