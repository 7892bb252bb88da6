"""The stage cache through the command line (in-process, local executor):
damaged artifacts are rebuilt with unchanged results, ``run --dry-run`` reports
and writes nothing, ``cache list`` and ``cache gc`` show and prune the store."""
import hashlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from orchestrator.execution import jobs
from orchestrator.cli import main
from rd3core.artifacts import PAYLOAD, ArtifactStore

STUDY = """\
name: {name}
dataset: {{name: digits}}
teachers:
  - arch: convnet3-w16-bn
    epochs: 2
    augment: {{crop: pad, padding: 2, flip: false, mix: none}}
methods:
{methods}
protocol:
  preset: rd3
  overrides: {{student: convnet3-w16, epochs: 4, augment: {{flip: false}}, labels: {{mode: epochwise}}}}
seeds: {seeds}
"""
RANDOM = "  - {name: random_real, ipc: 2}"
RDED = "  - {name: rded, ipc: 2, candidates_per_class: 20}"


def write(tmp_path: Path, name: str, methods: list[str], seeds: str = "[0]") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, methods="\n".join(methods), seeds=seeds))
    return path


def top1(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT c.cell_key, m.value FROM cell c JOIN metric m ON m.cell_id = c.id "
                                "WHERE m.name = 'top1'"))


def built(stdout: str) -> dict[str, int]:
    return json.loads(re.search(r"^stages built: (.*)$", stdout, re.M).group(1))


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run(capsys, *args) -> str:
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One study (random_real + rded, one seed), run once; tests copy nothing and
    rerun against fresh databases so the store is shared and the first DB kept."""
    tmp = tmp_path_factory.mktemp("cache")
    study = write(tmp, "cached", [RANDOM, RDED])
    out = tmp / "out"
    assert main(["run", str(study), "--out", str(out), "--executor", "local"]) == 0
    return study, out


def test_damaged_artifacts_are_rebuilt_and_results_unchanged(first_run, capsys, tmp_path):
    study, out = first_run
    store = ArtifactStore(out / "artifacts")
    before = top1(out / "rd3.sqlite")
    synths = [i for i in store.entries() if i.stage == "synth"]
    (teacher,) = [i for i in store.entries() if i.stage == "teacher"]
    payload = synths[0].path / PAYLOAD
    payload.write_bytes(payload.read_bytes()[:100])  # truncated: the plan sees it
    data = bytearray((teacher.path / PAYLOAD).read_bytes())
    data[-30] ^= 0xFF  # same size, wrong bytes: only the hash check on load sees it
    (teacher.path / PAYLOAD).write_bytes(bytes(data))
    jobs._TEACHERS.clear()  # a fresh worker: no teacher already in memory
    stdout = run(capsys, "run", str(study), "--out", str(out), "--executor", "local",
                 "--db", f"sqlite:///{tmp_path / 'again.sqlite'}")
    assert "synth        1 to run,    1 cached" in stdout and "teacher      0 to run,    1 cached" in stdout
    assert re.search(r"teacher \w+ rebuilt \(missing or corrupt", stdout)
    # The teacher is rebuilt once (by whichever job needed it first), the truncated set once.
    assert built(stdout) == {"synth": 1, "teacher": 1}
    assert top1(tmp_path / "again.sqlite") == before  # same keys, same numbers
    assert sorted(x.kind for x in store.leftovers()) == ["corrupt", "corrupt"]
    assert all(store.info(i.stage, i.key, verify=True) for i in store.entries())


def test_dry_run_reports_and_writes_nothing(first_run, capsys, tmp_path):
    study, out = first_run
    fresh = run(capsys, "run", str(study), "--out", str(tmp_path / "nothing"), "--dry-run")
    assert "2 cells, 0 already done, 2 to run" in fresh
    assert "teacher      1 to run,    0 cached" in fresh and "synth        2 to run,    0 cached" in fresh
    assert "no history" in fresh and not (tmp_path / "nothing").exists()

    more = write(tmp_path, "cached", [RANDOM, RDED], seeds="[0, 1]")  # same study, one more seed
    snapshot = tree_digest(out)
    stdout = run(capsys, "run", str(more), "--out", str(out), "--dry-run")
    assert "4 cells, 2 already done, 2 to run" in stdout
    assert "teacher      0 to run,    1 cached" in stdout and "synth        2 to run,    0 cached" in stdout
    assert re.search(r"synth +~[\d.]+s for 2 run\(s\)", stdout) and re.search(r"posteval +~[\d.]+s for 2 run", stdout)
    assert tree_digest(out) == snapshot  # not a byte written: DB, artifacts, summaries


def test_cache_list_and_gc(first_run, capsys, tmp_path):
    study, out = first_run
    listing = run(capsys, "cache", "list", "--out", str(out))
    assert re.search(r"^teacher +\w{24} +[\d.]+ kB .* digits convnet3-w16-bn", listing, re.M)
    assert re.search(r"^synth +\w{24} .* digits rded seed=0 teacher=\w{8}", listing, re.M)
    store = ArtifactStore(out / "artifacts")
    old_tmp = out / "artifacts" / "synth" / ".tmp-abandoned-1234"
    old_tmp.mkdir()
    (old_tmp / PAYLOAD).write_bytes(b"x" * 10)
    os.utime(old_tmp / PAYLOAD, (time.time() - 7200, time.time() - 7200))
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    fresh_tmp = out / "artifacts" / "synth" / ".tmp-inflight-5678"
    fresh_tmp.mkdir()
    assert "leftover tmp" in run(capsys, "cache", "list", "--out", str(out))

    # Another study that needs the teacher and random_real, not rded.
    other = write(tmp_path, "other", [RANDOM])
    keys = {(i.stage, i.key) for i in store.entries()}
    dry = run(capsys, "cache", "gc", str(other), "--out", str(out), "--dry-run")
    assert "would remove synth" in dry and "rded" in dry and "would remove leftover tmp" in dry
    assert {(i.stage, i.key) for i in store.entries()} == keys and old_tmp.exists()

    assert main(["cache", "gc", "no_such_study", "--out", str(out)]) == 2  # unknown: nothing removed
    assert "no such study file" in capsys.readouterr().err
    assert {(i.stage, i.key) for i in store.entries()} == keys

    only_leftovers = run(capsys, "cache", "gc", "--out", str(out))
    assert not old_tmp.exists() and fresh_tmp.exists()  # a publish in flight is left alone
    assert not [x for x in store.leftovers() if x.kind == "corrupt"]
    assert {(i.stage, i.key) for i in store.entries()} == keys and "kept" in only_leftovers

    pruned = run(capsys, "cache", "gc", str(other), "--out", str(out))
    left = {i.stage: i for i in store.entries()}
    assert sorted(i.stage for i in store.entries()) == ["synth", "teacher"]
    assert "random_real" in str(left["synth"].meta["params"]) and "removed synth" in pruned
    # The kept study still runs from the cache alone.
    stdout = run(capsys, "run", str(other), "--out", str(out), "--executor", "local",
                 "--db", f"sqlite:///{tmp_path / 'other.sqlite'}")
    assert built(stdout) == {}
    # A study recorded in the DB can be named instead of its file.
    by_name = run(capsys, "cache", "gc", "other", "--out", str(out), "--db", f"sqlite:///{tmp_path / 'other.sqlite'}",
                  "--dry-run")
    assert "would remove 0 item(s)" in by_name


def test_checkpoints_are_listed_and_orphans_pruned(first_run, capsys, tmp_path):
    from rd3core.checkpoint import Checkpoint
    from orchestrator.study.expand import expand
    from orchestrator.study.spec import load_study

    study, out = first_run
    store = ArtifactStore(out / "artifacts")
    other = write(tmp_path, "other", [RANDOM])
    [cell] = expand(load_study(other))
    teacher = next(i.key for i in store.entries() if i.stage == "teacher")
    # One checkpoint of a published teacher (its job died before removing it), one of
    # an unfinished synthesis no study here needs, one of other's post-evaluation.
    for stage, key, at in [("teacher", teacher, "epoch 1"), ("synth", "0" * 24, "batch 1 iteration 7"),
                           ("posteval", cell.key, "epoch 2")]:
        Checkpoint(store.checkpoint(stage, key), 1.0).save({"w": torch.zeros(3)}, at)
    crashed = store.checkpoint("teacher", teacher).path.with_name(f".tmp-{teacher}.pt-dead")
    crashed.write_bytes(b"x" * 5)
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))

    listing = run(capsys, "cache", "list", "--out", str(out))
    assert re.search(rf"^checkpoint teacher +{teacher} .* at epoch 1$", listing, re.M)
    assert re.search(r"^checkpoint synth +0{24} .* at batch 1 iteration 7$", listing, re.M)
    assert "3 checkpoints" in listing and f"leftover tmp      {crashed}" in listing

    plain = run(capsys, "cache", "gc", "--out", str(out))
    assert f"removed checkpoint teacher {teacher}" in plain and "its artifact is published" in plain
    assert not crashed.exists()
    assert {(c.stage, c.key) for c in store.checkpoints()} == {("synth", "0" * 24), ("posteval", cell.key)}

    named = run(capsys, "cache", "gc", str(other), "--out", str(out))
    assert "removed checkpoint synth" in named and "no study named needs it" in named
    assert [(c.stage, c.key) for c in store.checkpoints()] == [("posteval", cell.key)]
    store.checkpoint("posteval", cell.key).remove()
