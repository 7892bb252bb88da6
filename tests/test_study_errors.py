"""A user mistake in a study file: one clear message naming the file, the
line and the key; exit status 2; nothing written."""
import pytest

from conftest import TINY_STUDY, run_cli

CASES = {
    "unknown_key": (("seeds: [0, 1]", "seeds: [0, 1]\ncolour: blue"), "colour", "unknown key"),
    "wrong_type": (("epochs: 150", "epochs: thirty"), "protocol.overrides.epochs", "expected int"),
    "unknown_dataset": (("{name: digits}", "{name: mnist}"), "dataset.name", "unknown dataset 'mnist'"),
    "unknown_preset": (("preset: rd3", "preset: rd4"), "protocol.preset", "did you mean rd3"),
    "unknown_method": (("name: random_real", "name: random_reel"), "methods[0].name", "unknown method"),
    "bad_yaml": (("seeds: [0, 1]", "seeds: [0, 1"), "", "YAML error"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_study_exits_2_and_writes_nothing(case, tmp_path):
    (old, new), key, expected = CASES[case]
    text = TINY_STUDY.format(name="broken")
    assert old in text
    study = tmp_path / "broken.yaml"
    study.write_text(text.replace(old, new, 1))
    out = tmp_path / "out"
    proc = run_cli("run", str(study), "--out", str(out), "--executor", "local")
    assert proc.returncode == 2, proc.stderr
    assert str(study) in proc.stderr
    assert key in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_error_names_the_line(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(TINY_STUDY.format(name="s").replace("seeds: [0, 1]", "seeds: [0, 1]\ncolour: blue"))
    proc = run_cli("validate", str(study))
    line = study.read_text().splitlines().index("colour: blue") + 1
    assert f"{study}:{line}: colour" in proc.stderr


def test_several_problems_are_reported_at_once(tmp_path):
    study = tmp_path / "s.yaml"
    text = TINY_STUDY.format(name="s").replace("epochs: 150", "epochs: thirty").replace("{name: digits}", "{name: mnist}")
    study.write_text(text)
    proc = run_cli("validate", str(study))
    assert proc.returncode == 2
    assert "mnist" in proc.stderr and "thirty" in proc.stderr
