"""Paths into plain YAML data (nested dicts and lists) and copies with one
location changed: what the tests that mutate studies node by node share."""
from __future__ import annotations

from typing import Any, Iterator


def paths(data: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every location in ``data``, the root ``()`` first, as tuples of keys and indices."""
    yield prefix
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield from paths(value, prefix + (key,))


def leaf_paths(data: Any) -> list[tuple]:
    """The locations that hold a scalar."""
    return [p for p in paths(data) if not isinstance(at(data, p), (dict, list))]


def at(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def replaced(data: Any, path: tuple, value: Any) -> Any:
    """A copy of ``data`` with ``value`` at ``path`` (``data`` is left as it is)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, head: replaced(data[head], rest, value)}
    return [replaced(v, rest, value) if i == head else v for i, v in enumerate(data)]


def deleted(data: Any, path: tuple) -> Any:
    """A copy of ``data`` without the key or item at ``path`` (not the root)."""
    head, rest = path[0], path[1:]
    if rest:
        return replaced(data, (head,), deleted(data[head], rest))
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k != head}
    return [v for i, v in enumerate(data) if i != head]
