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


# --- the corpus of malformed studies -------------------------------------------------
# Each file in tests/data/bad_studies/ states what it must produce in header lines
# "# expect: LINE: KEY: FRAGMENT" (LINE or KEY "-" when the message has none).

import re
from pathlib import Path

from orchestrator.cli import main

BAD_DIR = Path(__file__).parent / "data" / "bad_studies"
BAD = sorted(BAD_DIR.glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (?P<line>\d+|-): (?P<key>\S+): (?P<fragment>.+)$")


def expectations(path: Path) -> list[tuple[str, str, str]]:
    found = [EXPECT.match(line) for line in path.read_text().splitlines()]
    return [(m["line"], m["key"], m["fragment"]) for m in found if m]


def test_the_corpus_is_large_and_every_file_states_its_expectation():
    assert len(BAD) >= 25
    for path in BAD:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("study", BAD, ids=lambda p: p.stem)
def test_bad_study_gives_its_message_and_exit_2(study, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(study), "--out", str(out), "--executor", "local"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert lines and all(line.startswith(f"error: {study}") for line in lines), err
    for line, key, fragment in expectations(study):
        prefix = f"error: {study}" + (f":{line}" if line != "-" else "") + ": " + (f"{key}: " if key != "-" else "")
        assert any(l.startswith(prefix) and fragment in l for l in lines), f"wanted {prefix}...{fragment}\n{err}"
    assert not out.exists()


def test_validate_in_a_real_process_reports_all_and_writes_nothing(tmp_path):
    study = BAD_DIR / "several_mistakes.yaml"
    proc = run_cli("validate", str(study), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == len(expectations(study))
    assert list(tmp_path.iterdir()) == []


# --- requests the machine can never meet ------------------------------------------

@pytest.mark.parametrize("resources, flags, key, fragment", [
    ("resources: {posteval: {gpus: 0.5}}", ["--num-gpus", "0"], "resources.posteval.gpus",
     "posteval job asks for 0.5 GPUs but this machine's Ray instance has 0"),
    ("resources: {cpus: 3}", ["--num-cpus", "2"], "resources.cpus",
     "every job asks for 3 CPUs but this machine's Ray instance has 2"),
])
def test_a_request_the_embedded_instance_cannot_meet_is_refused(resources, flags, key, fragment, tmp_path, capsys):
    # Ray would leave such a job pending forever; the run refuses it before
    # starting Ray or writing anything, and so does the dry run.
    study = tmp_path / "big.yaml"
    study.write_text(TINY_STUDY.format(name="big") + resources + "\n")
    line = study.read_text().splitlines().index(resources) + 1
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert main(["run", str(study), "--out", str(out), *flags, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{study}:{line}: {key}: {fragment}" in err and "--executor local" in err
        assert not out.exists()
    # In-process jobs ignore Ray's bookkeeping, and a cluster may grow: neither is refused.
    from orchestrator.execution.driver import RunOptions, check_capacity
    from orchestrator.study.spec import load_study
    check_capacity(load_study(study), RunOptions(out=out, executor="local", num_cpus=2, num_gpus=0))
    check_capacity(load_study(study), RunOptions(out=out, address="127.0.0.1:6379", num_cpus=2, num_gpus=0))
