"""The study loader against whatever a file holds: the shipped studies mutated at
the byte, YAML and value level, and the known hazards (huge files, deep nesting,
alias bombs, giant integers, control characters). For every input, ``validate``
either accepts the study or exits 2 with ``file[:line]: ...`` lines, never a
traceback; ``run`` of a refused file writes nothing.

Bounded for CI: a fixed number of examples per strategy, derandomized (the same
examples on every run, so a failure reproduces), no deadline (CPU speed drifts).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import plaintree
from conftest import ROOT
from orchestrator.cli import main
from orchestrator.study import yamlsrc
from orchestrator.study.spec import bounded_fields, list_bounds
from rd3core.config import ConfigError, bounds_of, build, describe_bounds, field_types

SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))
TEXTS = {p.name: p.read_bytes() for p in SHIPPED}

# No shrinking: a failure prints the example that failed, and shrinking a slow
# property can take minutes of CI.
FUZZ = settings(max_examples=int(os.environ.get("RD3_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _datasets_anywhere(monkeypatch, tmp_path_factory):
    """The CIFAR and ImageNet studies name their data by environment variable;
    an empty tree is enough to validate them."""
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "test"):
        (root / split).mkdir()
    for name in ("CIFAR10", "CIFAR100", "IMAGENET1K"):
        monkeypatch.setenv(f"RD3_DATA_{name}", str(root))


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def check(payload: bytes, *, value_level: bool = False) -> str:
    """Validate ``payload`` as a study file; assert the loader's contract. Returns
    'ok' or 'refused'. ``value_level``: the YAML is a well-formed mapping, so every
    problem must name its line and key path."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # anything written lands here
        folder = Path(tmp)
        study = folder / "study.yaml"
        study.write_bytes(payload)
        try:
            rc, out, err = _cli("validate", str(study))
        except BaseException as exc:  # noqa: BLE001 - any escape is the failure this test looks for
            raise AssertionError(f"validate raised {exc!r} for {payload[:300]!r}") from exc
        assert rc in (0, 2), (rc, err, payload[:300])
        assert "Traceback" not in err + out
        if rc == 0:
            assert out.startswith(f"{study}: ok ("), out
            assert _listing(folder) == ["study.yaml"], "validate wrote files"
            return "ok"
        lines = err.splitlines()
        assert lines, "refused without saying why"
        where = re.escape(str(study))
        form = rf"error: {where}:\d+: [^:\s]+: \S" if value_level else rf"error: {where}(:\d+)?: \S"
        for line in lines:
            assert re.match(form, line), (line, payload[:300])
        rc, _, _ = _cli("run", str(study), "--out", str(folder / "out"))
        assert rc == 2
        assert _listing(folder) == ["study.yaml"], "a refused study wrote files"
        return "refused"


def test_the_shipped_studies_are_valid():
    for path in SHIPPED:
        assert check(TEXTS[path.name]) == "ok", path


# -- byte level ---------------------------------------------------------------------

_INSERTS = st.one_of(st.binary(max_size=8), st.sampled_from([b"\x00", b"\t", b"\r", b"\x1b[2J", b"\xff\xfe",
                                                             b"\xef\xbb\xbf", b": ", b"- ", b"{", b"[", b"'",
                                                             b'"', b"&a ", b"*a", b"!!python/object ", b"\n  "]))
_EDIT = st.one_of(
    st.tuples(st.just("insert"), st.floats(0, 1), _INSERTS),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
)


def _edit(raw: bytes, op: str, where: float, arg) -> bytes:
    at = int(where * len(raw))
    if op == "insert":
        return raw[:at] + arg + raw[at:]
    if op == "delete":
        return raw[:at] + raw[at + arg:]
    if op == "truncate":
        return raw[:at]
    return raw[:at] + bytes([arg]) + raw[at + 1:] if at < len(raw) else raw


@FUZZ
@given(name=st.sampled_from(sorted(TEXTS)), edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_byte_level_mutations(name, edits):
    raw = TEXTS[name]
    for edit in edits:
        raw = _edit(raw, *edit)
    event(check(raw))


@FUZZ
@given(name=st.sampled_from(sorted(TEXTS)), encoding=st.sampled_from(["utf-16", "utf-16-be", "utf-32", "latin-1",
                                                                       "cp1252", "utf-8-sig"]))
def test_other_encodings(name, encoding):
    text = TEXTS[name].decode() + "\n# café ß €\n"
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        raw = text.encode(encoding, "replace")
    assert check(raw) == ("ok" if encoding == "utf-8-sig" else "refused")


# -- YAML and value level ---------------------------------------------------------------

_NUMBERS = st.one_of(
    st.integers(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308, -1e308, 0.5, 1.5]))
_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, st.text(max_size=20),
                     st.sampled_from(["", "\x00", "a\x07b", "\ud800", "é", "x" * 5000, "yes", "~", "1e3"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.booleans()), inner, max_size=4)),
    max_leaves=12)


def _dump(data) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=1000).encode("utf-8", "surrogatepass")


@FUZZ
@given(name=st.sampled_from(sorted(TEXTS)), pick=st.floats(0, 1), value=_VALUES,
       action=st.sampled_from(["replace", "replace", "delete", "rename"]))
def test_yaml_level_mutations(name, pick, value, action):
    data = yaml.safe_load(TEXTS[name])
    places = [p for p in plaintree.paths(data) if p]
    path = places[min(int(pick * len(places)), len(places) - 1)]
    if action == "replace":
        data = plaintree.replaced(data, path, value)
    elif action == "delete":
        data = plaintree.deleted(data, path)
    else:  # a mapping key changed to whatever the value is (hashable scalars only)
        key = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        parent = path[:-1]
        node = plaintree.at(data, parent)
        if isinstance(node, dict):
            renamed = {(key if k == path[-1] else k): v for k, v in node.items()}
            data = plaintree.replaced(data, parent, renamed)
    event(check(_dump(data)))


@FUZZ
@given(name=st.sampled_from(sorted(TEXTS)), pick=st.floats(0, 1), value=_SCALARS)
def test_value_level_mutations(name, pick, value):
    """A leaf value of a shipped study replaced by any scalar: accepted, or
    refused with the line and the key path of what is wrong."""
    data = yaml.safe_load(TEXTS[name])
    leaves = [p for p in plaintree.leaf_paths(data) if p]
    path = leaves[min(int(pick * len(leaves)), len(leaves) - 1)]
    event(check(_dump(plaintree.replaced(data, path, value)), value_level=True))


# -- the known hazards, each once -------------------------------------------------------------

BASE = TEXTS["protocol_ablation.yaml"]
_BOMB = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("payload, says", [
    (BASE + b"\n#" + b"x" * yamlsrc.MAX_BYTES, "at most 1024 KiB"),
    (b"a: " + b"[" * 5000 + b"]" * 5000, "levels of nesting"),
    (b"a: " + b"[" * 40 + b"]" * 40, "at most 32 levels of nesting"),
    (_BOMB, "values, aliases expanded"),
    (b"a: &a [*a]\n", "contains it"),
    (BASE.replace(b"seeds: [0, 1, 2]", b"seeds: [0, 1, " + b"9" * 5000 + b"]"), "digits"),
    (BASE.replace(b"seeds: [0, 1, 2]", b"seeds: [0, 1, 99999999999999999999]"), "2**63-1"),
    (BASE.replace(b"epochs: 20", b"epochs: .nan"), "finite"),
    (BASE.replace(b"name: protocol_ablation", b'name: "abl\\0ation"'), "control characters"),
    (BASE.replace(b"name: protocol_ablation", b'name: "\\ud800"'), "UTF-16 pair"),
    (BASE.replace(b"dataset: {name: digits}", b"dataset: {name: digits}\non: 1"), "name as the key"),
    (BASE.replace(b"seeds: [0, 1, 2]", b"seeds: !!binary aGVsbG8="), "bytes"),
    (BASE.replace(b"seeds: [0, 1, 2]", b"? [a, b]\n: 1\nseeds: [0, 1, 2]"), "unhashable"),
    (b"\xff\xfe" + BASE, "UTF-8"),
    (b"", "mapping"),
    (b"---\na: 1\n---\nb: 2\n", "single document"),
])
def test_named_hazards_are_refused_with_the_limit_named(payload, says):
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study.yaml"
        study.write_bytes(payload)
        rc, _, err = _cli("validate", str(study))
    assert rc == 2 and says in err, err[:500]
    assert all(line.count(str(study)) == 1 for line in err.splitlines()), err[:500]  # one message, not wrapped
    assert check(payload) == "refused"



# -- the documented bounds ------------------------------------------------------------------

def _beyond(op: str, limit: float, integer: bool) -> tuple[float, float | None]:
    """A value just outside a bound and one on its edge (None for an open bound)."""
    step = 1 if integer else max(abs(limit) * 1e-6, 1e-9)
    outside = {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[op]
    edge = limit if op in ("ge", "le") else None
    return (int(outside) if integer else outside), (edge if edge is None or not integer else int(edge))


@pytest.mark.parametrize("key, cls, f", list(bounded_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_listed_bound_is_enforced_at_its_edge(key, cls, f):
    integer = int in (field_types(cls)[f.name], *typing.get_args(field_types(cls)[f.name]))
    for op, limit in bounds_of(f).items():
        outside, edge = _beyond(op, limit, integer)
        with pytest.raises(ConfigError) as refused:
            build(cls, {f.name: outside})
        said = [p.message for p in refused.value.problems if p.path == f.name]
        assert said and said[0].startswith(f"expected {describe_bounds({op: limit})}, got "), (key, said)
        if edge is not None:
            try:
                build(cls, {f.name: edge})
            except ConfigError as exc:  # other keys may be required; this one must be fine
                assert f.name not in {p.path for p in exc.problems}, (key, edge, exc.problems)


def test_list_bounds_prints_every_bound_once(capsys):
    assert main(["list", "bounds"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == list_bounds() and len(set(printed)) == len(printed)
    assert "protocol.epochs: >= 1, <= 100000" in printed and "methods[name=sre2l].iterations: >= 0, <= 1000000" in printed
