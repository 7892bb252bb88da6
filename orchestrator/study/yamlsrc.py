"""YAML with a map from key path to line number, so every error can name the
file, the line and the key."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Source:
    path: str
    data: Any
    lines: dict[str, int]  # dotted key path ("a.b[2].c") -> 1-based line

    def line_of(self, key_path: str) -> int | None:
        """Line of ``key_path`` or of its nearest ancestor that is in the file."""
        probe = key_path
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return None

    def where(self, key_path: str) -> str:
        line = self.line_of(key_path)
        return f"{self.path}:{line}" if line else self.path


class YamlSyntaxError(ValueError):
    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _walk(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            lines.setdefault(key, key_node.start_mark.line + 1)
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{path}[{i}]"
            lines.setdefault(key, item.start_mark.line + 1)
            _walk(item, key, lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _located(exc: yaml.MarkedYAMLError, text: str) -> tuple[int | None, str]:
    """The line to blame and the message. A construct left open (an unclosed
    bracket or quote) fails only at the end of the file: blame where it opened."""
    problem, context = exc.problem_mark, exc.context_mark
    message = f"YAML error: {exc.problem or exc}"
    if context is not None and exc.context:
        message += f" ({exc.context} that starts on line {context.line + 1})"
    at_end = problem is not None and problem.index >= len(text.rstrip())
    mark = context if (at_end and context is not None) or problem is None else problem
    return (mark.line + 1 if mark else None), message


def load(path: str | Path, text: str | None = None) -> Source:
    path = str(path)
    if text is None:
        text = Path(path).read_text()
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise YamlSyntaxError(path, *_located(exc, text)) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(path, None, f"YAML error: {exc}") from None
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines)
    return Source(path, data, lines)


def unrecordable(data: Any, path: str = ""):
    """(key path, message) for each value that YAML reads but no config can hold,
    store with a result or hash into its id: NaN and infinities, and what YAML
    reads as dates, binary or sets."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from unrecordable(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from unrecordable(value, f"{path}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        yield path, f"expected a finite number, got {data}"
    elif not isinstance(data, (str, int, float, bool, type(None))):
        yield path, (f"expected a number, a string, a list or a mapping, got {type(data).__name__} {data!r} "
                     "(quote it to make it a string)")


def dataset_name(path: str | Path) -> str | None:
    """``dataset.name`` of a study file, read leniently (None when the file, its
    YAML or the key is not right: loading the study then says what is wrong)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        name = data["dataset"]["name"]
    except Exception:  # noqa: BLE001 - any problem is reported by load_study with its line
        return None
    return name if isinstance(name, str) else None
