from dataclasses import dataclass

import pytest

from rd3core.config import ConfigError, added_field, build, set_path, stable_hash, to_dict
from rd3core.protocol import Protocol, resolve_protocol


def test_unknown_and_wrong_typed_keys_are_all_reported():
    with pytest.raises(ConfigError) as exc:
        build(Protocol, {"epoch": 3, "batch_size": "big", "optim": {"lr": "fast"}})
    paths = {p.path for p in exc.value.problems}
    assert paths == {"epoch", "batch_size", "optim.lr"}
    assert "unknown key" in str(exc.value)


def test_validate_adds_cross_field_problems():
    with pytest.raises(ConfigError) as exc:
        build(Protocol, {"epochs": 0, "student": "convnet9", "labels": {"mode": "hard", "refresh_every": 3}})
    paths = {p.path for p in exc.value.problems}
    assert {"epochs", "student", "labels.refresh_every"} <= paths


def test_round_trip_and_stable_hash():
    p = resolve_protocol("rded", "cifar", {"epochs": 7})
    again = build(Protocol, to_dict(p))
    assert again == p
    assert stable_hash(p) == stable_hash(again)
    assert stable_hash(p) != stable_hash(resolve_protocol("rded", "cifar", {"epochs": 8}))


@dataclass(frozen=True)
class Before:
    a: int = 1


@dataclass(frozen=True)
class After:
    a: int = 1
    b: tuple[int, int] = added_field((0, 0))


def test_an_added_field_at_its_default_keeps_the_hash_it_had_before():
    assert to_dict(After()) == to_dict(Before()) == {"a": 1}
    assert stable_hash(After(a=2)) == stable_hash(Before(a=2))
    assert to_dict(After(b=(0, 1))) == {"a": 1, "b": [0, 1]} and stable_hash(After(b=(0, 1))) != stable_hash(After())
    assert build(After, to_dict(After(b=(0, 1)))) == After(b=(0, 1)) and build(After, {"a": 1}) == After()
    p = resolve_protocol("edc", "cifar")
    assert "randaugment_equalize" not in to_dict(p)["augment"]
    on = resolve_protocol("edc", "cifar", {"augment": {"randaugment_equalize": True}})
    assert to_dict(on)["augment"]["randaugment_equalize"] is True and stable_hash(on) != stable_hash(p)
    assert build(Protocol, to_dict(on)) == on


def test_set_path_creates_intermediate_mappings():
    assert set_path({"a": 1}, "b.c.d", 2) == {"a": 1, "b": {"c": {"d": 2}}}
