"""The resources block's checkpoint interval: what it accepts, how a stage
overrides it, and that it never changes what is computed (cell ids, stage keys)."""
import pytest

from conftest import TINY_STUDY
from orchestrator.execution.plan import build_plan
from orchestrator.study.expand import expand
from orchestrator.study.resources import DEFAULT_CHECKPOINT_EVERY, parse_interval
from orchestrator.study.spec import load_study
from rd3core.artifacts import ArtifactStore


@pytest.mark.parametrize("value, seconds", [(300, 300.0), (2.5, 2.5), ("90s", 90.0), ("5m", 300.0), ("1.5h", 5400.0),
                                            (" 10 ", 10.0), ("0", 0.0), (0, 0.0), ("off", 0.0), (False, 0.0)])
def test_intervals_in_seconds_and_off(value, seconds):
    assert parse_interval(value) == seconds


@pytest.mark.parametrize("value, fragment", [(-1, "expected seconds >= 0"), ("soon", "such as '90s'"),
                                             ("5 days", "such as '90s'"), (True, "or 'off', got True")])
def test_bad_intervals_say_what_was_expected(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_interval(value)


def study(tmp_path, resources: str):
    path = tmp_path / "s.yaml"
    path.write_text(TINY_STUDY.format(name="s") + resources)
    return load_study(path)


def test_default_off_and_per_stage(tmp_path):
    default = study(tmp_path, "").spec.resources
    assert default.for_stage("teacher").checkpoint_every == DEFAULT_CHECKPOINT_EVERY == 300.0
    spec = study(tmp_path, "resources:\n  checkpoint_every: off\n  posteval: {checkpoint_every: 2m}\n").spec.resources
    assert spec.for_stage("teacher").checkpoint_every == 0.0
    assert spec.for_stage("posteval").checkpoint_every == 120.0


def test_the_interval_changes_no_cell_id_or_stage_key(tmp_path):
    store = ArtifactStore(tmp_path / "store", readonly=True)
    plans = [build_plan(expand(study(tmp_path, text)), store) for text in
             ("", "resources:\n  checkpoint_every: 5s\n  teacher: {checkpoint_every: off}\n")]
    assert sorted(plans[0].nodes) == sorted(plans[1].nodes)
    cells = [expand(study(tmp_path, text)) for text in ("", "resources: {checkpoint_every: 1}\n")]
    assert [c.key for c in cells[0]] == [c.key for c in cells[1]]
