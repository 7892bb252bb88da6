import pytest

from rd3core.config import ConfigError, build, set_path, stable_hash, to_dict
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


def test_set_path_creates_intermediate_mappings():
    assert set_path({"a": 1}, "b.c.d", 2) == {"a": 1, "b": {"c": {"d": 2}}}
