import pytest

from orchestrator.expand import expand
from orchestrator.spec import StudyError, load_study


def test_cells_are_factor_combinations_times_seeds(tiny_study):
    cells = expand(load_study(tiny_study()))
    assert len(cells) == 2 * 2
    assert {(c.factors["protocol.labels.mode"], c.seed) for c in cells} == {
        ("hard", 0), ("hard", 1), ("epochwise", 0), ("epochwise", 1)}
    assert len({c.key for c in cells}) == len(cells)


def test_ids_are_stable_and_follow_the_config(tiny_study, tmp_path):
    a = {c.key for c in expand(load_study(tiny_study("a")))}
    b = {c.key for c in expand(load_study(tiny_study("a")))}
    assert a == b
    text = tiny_study("c").read_text().replace("epochs: 150", "epochs: 151")
    changed = {c.key for c in expand(load_study(tiny_study("c", text)))}
    assert not (a & changed)


def test_study_name_does_not_change_cell_ids(tiny_study):
    # The id hashes the resolved config only, so identical cells in two studies match.
    assert {c.key for c in expand(load_study(tiny_study("one")))} == \
        {c.key for c in expand(load_study(tiny_study("two")))}


def test_seeds_are_shared_across_levels(tiny_study):
    cells = expand(load_study(tiny_study()))
    by_level = {}
    for c in cells:
        by_level.setdefault(c.factors["protocol.labels.mode"], set()).add(c.seed)
    assert by_level["hard"] == by_level["epochwise"]


def test_bad_factor_level_names_the_factor(tiny_study):
    text = tiny_study().read_text().replace("[hard, epochwise]", "[hard, telepathy]")
    with pytest.raises(StudyError) as exc:
        expand(load_study(tiny_study("bad", text)))
    assert "labels.mode" in str(exc.value) and "telepathy" in str(exc.value)
