"""YAML with a map from key path to line number, so every error can name the
file, the line and the key.

A study file is read defensively: whatever its bytes, :func:`load` returns a
:class:`Source` or raises :class:`YamlSyntaxError` naming the file (and the line
where there is one). The bounds below are far above any real study (the shipped
ones are a few KB, six levels deep, a few hundred values) and keep a malformed or
hostile file from exhausting memory, time or Python's recursion limit.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


MAX_BYTES = 1 << 20  # a study file is at most 1 MiB
MAX_DEPTH = 32  # levels of nested mappings and lists
MAX_VALUES = 100_000  # values once aliases are expanded: a few KB of aliases can stand for billions
# What the results database can store in an integer column (a signed 64-bit integer).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# Text the databases cannot store (PostgreSQL refuses NUL) or no key path should
# hold: control characters other than tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


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
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: PyYAML's own check below names it
                continue
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


def read_text(path: str | Path) -> str:
    """The text of a study file: at most :data:`MAX_BYTES`, UTF-8 (a byte-order
    mark allowed), as YAML files are."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlSyntaxError(str(path), None, f"cannot read the file: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise YamlSyntaxError(str(path), None, f"the file is over {MAX_BYTES // 1024} KiB: expected a study "
                                               f"file of at most {MAX_BYTES // 1024} KiB")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise YamlSyntaxError(str(path), line, f"expected UTF-8 text, got byte 0x{raw[exc.start]:02x} "
                                               "(save the file as UTF-8)") from None


def _shape_problem(root: yaml.Node) -> tuple[yaml.Node, str] | None:
    """(node, message) when the document is deeper than :data:`MAX_DEPTH`, holds
    more than :data:`MAX_VALUES` values once its aliases are expanded, or has an
    alias inside the node it names (a value that contains itself). Iterative, with
    each shared node sized once, so the check itself cannot recurse or blow up."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    sized: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height), aliases expanded
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            open_nodes.discard(id(node))
            kids = [sized[id(c)] for c in children(node)]
            values = 1 + sum(v for v, _ in kids)
            height = 1 + max((h for _, h in kids), default=0)
            if values > MAX_VALUES:
                return node, f"expected at most {MAX_VALUES} values, aliases expanded, got more"
            if height > MAX_DEPTH:
                return node, f"expected at most {MAX_DEPTH} levels of nesting, got more"
            sized[id(node)] = values, height
        elif id(node) in open_nodes:
            return node, "an alias names a value that contains it (a value cannot contain itself)"
        elif id(node) not in sized:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node))
    return None


def load(path: str | Path, text: str | None = None) -> Source:
    path = str(path)
    if text is None:
        text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        shape = _shape_problem(node) if node is not None else None
        data = yaml.load(text, Loader=_UniqueKeyLoader) if shape is None else None
    except yaml.MarkedYAMLError as exc:
        raise YamlSyntaxError(path, *_located(exc, text)) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, at a position in the text
        raise YamlSyntaxError(path, text.count("\n", 0, exc.position) + 1,
                              f"YAML error: unacceptable character #x{exc.character:04x}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(path, None, f"YAML error: {exc}") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise YamlSyntaxError(path, None, f"YAML error: {exc}") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise YamlSyntaxError(path, None, f"YAML error: expected at most {MAX_DEPTH} levels of nesting, "
                                          "got more") from None
    if shape is not None:  # raised here: inside the try the ValueError handler would wrap it again
        raise YamlSyntaxError(path, shape[0].start_mark.line + 1, f"YAML error: {shape[1]}")
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines)
    return Source(path, data, lines)


def unrecordable(data: Any, path: str = ""):
    """(key path, message) for each value that YAML reads but no config can hold,
    store with a result or hash into its id: NaN and infinities, integers beyond
    64 bits, text with control characters (or halves of a UTF-16 pair), mapping
    keys that are not text, and what YAML reads as dates, binary or sets."""
    if isinstance(data, dict):
        for key, value in data.items():
            sub = f"{path}.{_printable(str(key))}" if path else _printable(str(key))
            if not isinstance(key, str):
                yield sub, (f"expected a name as the key, got {type(key).__name__} {key!r} (YAML reads yes/no/on/off "
                            "as booleans and digits as numbers: quote it)")
            elif bad := _bad_text(key):
                yield sub, f"expected a key {bad}"
            yield from unrecordable(value, sub)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from unrecordable(value, f"{path}[{i}]")
    elif isinstance(data, bool) or data is None:
        return
    elif isinstance(data, int) and not INT_MIN <= data <= INT_MAX:
        yield path, (f"expected an integer between -2**63 and 2**63-1 (what the results database stores), "
                     f"got one of {data.bit_length() + 1} bits")
    elif isinstance(data, float) and not math.isfinite(data):
        yield path, f"expected a finite number, got {data}"
    elif isinstance(data, str):
        if bad := _bad_text(data):
            yield path, f"expected text {bad}"
    elif not isinstance(data, (int, float)):
        yield path, (f"expected a number, a string, a list or a mapping, got {type(data).__name__} {data!r} "
                     "(quote it to make it a string)")


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be stored and shown as it is, or None."""
    if found := _CONTROL.search(text):
        return f"without control characters, got {found.group()!r} at character {found.start() + 1}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"of whole characters, got half of a UTF-16 pair ({text[exc.start]!r})"
    return None


def _printable(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii") if _bad_text(text) else text


def dataset_name(path: str | Path) -> str | None:
    """``dataset.name`` of a study file, read leniently (None when the file, its
    YAML or the key is not right: loading the study then says what is wrong)."""
    try:
        data = yaml.safe_load(read_text(path))
        name = data["dataset"]["name"]
    except Exception:  # noqa: BLE001 - any problem is reported by load_study with its line
        return None
    return name if isinstance(name, str) else None
