"""Every preset loads and validates for every dataset family, names its source,
and carries the facts its method's official code uses."""

import pytest
import yaml

from rd3core.config import ConfigError, build, to_dict
from rd3core.protocol import PRESETS, Protocol, batch_size_for, list_presets, preset_data, resolve_protocol

FAMILIES = ["digits", "cifar", "tiny", "imagenet"]


def test_the_issue_presets_exist():
    assert {"sre2l", "cda", "rded", "gvbsm", "edc", "dwa", "lpld", "scdd", "ddranking", "rd3"} <= set(list_presets())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_validates_and_round_trips(name, family):
    p = resolve_protocol(name, family)
    assert isinstance(p, Protocol)
    assert build(Protocol, to_dict(p)) == p
    raw = preset_data(name)
    assert len(raw["source"]) > 20
    assert set(raw) <= {"source", "notes", "protocol", "families"}
    assert set(raw.get("families") or {}) <= set(FAMILIES)


@pytest.mark.parametrize("name", list_presets())
def test_any_field_can_be_overridden_and_bad_overrides_are_reported(name):
    assert resolve_protocol(name, "cifar", {"epochs": 7, "optim": {"lr": 0.5}}).optim.lr == 0.5
    with pytest.raises(ConfigError) as exc:
        resolve_protocol(name, "cifar", {"optim": {"lrr": 1}})
    assert "optim.lrr" in str(exc.value)


def test_methods_with_stored_labels_in_their_official_code():
    assert resolve_protocol("sre2l", "imagenet").labels.mode == "stored"
    assert resolve_protocol("sre2l", "cifar").labels.mode == "epochwise"  # CIFAR-100 script: on the fly
    for name in ("gvbsm", "edc", "lpld"):
        assert resolve_protocol(name, "imagenet").labels.mode == "stored"
    assert resolve_protocol("gvbsm", "imagenet").labels.combine == "norm_mean"
    assert len(resolve_protocol("edc", "imagenet").labels.teachers) == 4
    assert resolve_protocol("rded", "imagenet").labels.mode == "epochwise"


def test_recipes_follow_the_official_code():
    rded = resolve_protocol("rded", "imagenet")
    assert rded.schedule.zeta == 2 and rded.schedule.per == "epoch" and rded.optim.no_decay_norm_bias
    assert rded.augment.shuffle_patches == 2 and rded.augment.scale == (0.5, 1.0)
    assert resolve_protocol("rded", "cifar").augment.shuffle_patches == 1
    assert rded.eval.best_after_fraction == 0.8
    assert rded.schedule.factor(rded.epochs, rded.epochs) == pytest.approx(0.5)  # smoothed cosine ends at 0.5x
    edc = resolve_protocol("edc", "cifar")
    assert edc.ema_decay == 0.99 and edc.augment.randaugment == (2, 9) and edc.loss.kind == "mse"
    sre2l_tiny = resolve_protocol("sre2l", "tiny")
    assert sre2l_tiny.optim.name == "sgd" and sre2l_tiny.schedule.warmup_epochs == 5 and sre2l_tiny.loss.t_squared
    assert resolve_protocol("sre2l", "cifar").augment.mix == "mixup"
    gv = resolve_protocol("gvbsm", "cifar")
    assert gv.optim.name == "sgd" and gv.loss.gamma == 0.15 and gv.epochs == 1000
    rd3 = resolve_protocol("rd3", "imagenet")
    assert (rd3.epochs, rd3.batch_size, rd3.labels.mode, rd3.loss.kind) == (400, 50, "epochwise", "kl")


@pytest.mark.parametrize("ipc, classes, family, expected", [
    (1, 10, "cifar", 10), (10, 10, "cifar", 50), (50, 10, "cifar", 100),
    (10, 100, "cifar", 100), (50, 1000, "imagenet", 200), (1, 1000, "imagenet", 20),
    (10, 200, "tiny", 100), (50, 200, "tiny", 100),
    (1, 2, "cifar", 2),  # capped at IPC x classes
    (20, 10, "cifar", 50),  # not in RDED's table: nearest rung below
])
def test_rded_batch_rule(ipc, classes, family, expected):
    assert batch_size_for(resolve_protocol("rded", family), ipc, classes, family) == expected
    assert batch_size_for(resolve_protocol("rd3", family), ipc, classes, family) == 50


def test_preset_files_are_plain_data():
    for name in list_presets():
        text = PRESETS.get(name).read_text()
        assert isinstance(yaml.safe_load(text), dict)
