"""The content-addressed store: keys, atomic publish, verified load, quarantine
of damaged artifacts, and two processes publishing one key at once."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rd3core.artifacts import MANIFEST, PAYLOAD, ArtifactStore, stage_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_key_depends_on_everything_the_stage_uses():
    base = stage_key("synth", 1, {"ipc": 10, "seed": 0}, {"teacher": "abc"})
    assert base == stage_key("synth", 1, {"seed": 0, "ipc": 10}, {"teacher": "abc"})  # order-free
    assert len({base, stage_key("synth", 2, {"ipc": 10, "seed": 0}, {"teacher": "abc"}),
                stage_key("synth", 1, {"ipc": 11, "seed": 0}, {"teacher": "abc"}),
                stage_key("synth", 1, {"ipc": 10, "seed": 0}, {"teacher": "abd"}),
                stage_key("labels", 1, {"ipc": 10, "seed": 0}, {"teacher": "abc"})}) == 5


def test_roundtrip_and_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    payload = {"w": torch.arange(10.0), "meta": {"a": 1}}
    info = store.save("teacher", "k1", payload, {"params": {"arch": "x"}})
    assert info.path == tmp_path / "teacher" / "k1" and info.bytes == (info.path / PAYLOAD).stat().st_size
    loaded = store.load("teacher", "k1")
    assert torch.equal(loaded["w"], payload["w"]) and loaded["meta"] == {"a": 1}
    assert info.meta["params"] == {"arch": "x"} and info.manifest["producer"]["pid"] == os.getpid()
    assert [i.key for i in store.entries()] == ["k1"] and not list(store.leftovers())
    assert store.load("teacher", "nope") is None and not store.exists("teacher", "nope")


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed: only the hash can tell
        path.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_payload_is_quarantined_and_reported_missing(tmp_path, how):
    store = ArtifactStore(tmp_path)
    store.save("synth", "k", {"x": torch.randn(100)})
    _damage(tmp_path / "synth" / "k" / PAYLOAD, how)
    # The planning check looks at sizes only; a truncation is caught there, a flip at load.
    assert store.exists("synth", "k") is (how == "flip")
    assert store.load("synth", "k") is None
    assert not (tmp_path / "synth" / "k").exists()
    assert [x.kind for x in store.leftovers()] == ["corrupt"]
    fresh = {"x": torch.ones(3)}
    store.save("synth", "k", fresh)  # a rebuild publishes a good copy under the same key
    assert torch.equal(store.load("synth", "k")["x"], fresh["x"])


def test_missing_manifest_or_garbage_manifest_is_quarantined(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save("synth", "a", {"x": 1})
    store.save("synth", "b", {"x": 2})
    (tmp_path / "synth" / "a" / MANIFEST).unlink()
    (tmp_path / "synth" / "b" / MANIFEST).write_text("{not json")
    assert store.load("synth", "a") is None and store.load("synth", "b") is None
    assert sorted(x.kind for x in store.leftovers()) == ["corrupt", "corrupt"]


def test_readonly_store_never_writes(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save("synth", "k", {"x": torch.randn(10)})
    _damage(tmp_path / "synth" / "k" / PAYLOAD, "flip")
    ro = ArtifactStore(tmp_path, readonly=True)
    assert ro.load("synth", "k") is None
    assert (tmp_path / "synth" / "k").is_dir() and not list(ro.leftovers())  # not moved
    with pytest.raises(RuntimeError, match="read-only"):
        ro.save("synth", "other", {"x": 1})


def test_remove(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save("teacher", "k", {"x": 1})
    assert store.remove("teacher", "k") and not store.exists("teacher", "k")
    assert not store.remove("teacher", "k") and not list(store.leftovers())


PRODUCER = textwrap.dedent("""
    import pathlib, sys, time, torch
    sys.path.insert(0, {root!r})
    from rd3core import artifacts
    from rd3core.artifacts import ArtifactStore

    def slow_save(obj, path, _save=torch.save):
        # A slow disk: both producers are inside their write when either renames.
        _save(obj, path)
        time.sleep(0.2)

    artifacts.torch.save = slow_save
    store = ArtifactStore(sys.argv[1])
    barrier = pathlib.Path(sys.argv[2])
    (barrier / sys.argv[3]).touch()  # imports done; start when both are
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.001)
    payload = {{"x": torch.arange(500_000, dtype=torch.float32)}}  # 2 MB
    ok = 0
    for i in range(6):
        info = store.save("synth", f"key{{i}}", payload, {{"writer": sys.argv[3]}})
        state = store.load("synth", f"key{{i}}")
        ok += state is not None and torch.equal(state["x"], payload["x"])
        time.sleep(0.2)  # both finish the round before the next key
    print(ok, store.outcomes["published"], store.outcomes["lost"])
""")


def test_two_processes_publishing_the_same_keys_do_not_corrupt_them(tmp_path):
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER.format(root=ROOT))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(barrier), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    counts = [[int(v) for v in o[0].split()] for o in outputs]
    assert [c[0] for c in counts] == [6, 6]  # every save was followed by a verified load
    published, lost = sum(c[1] for c in counts), sum(c[2] for c in counts)
    assert published == 6 and lost >= 1  # the race did happen, and one copy per key won
    store = ArtifactStore(tmp_path / "store")
    entries = list(store.entries(verify=True))
    assert sorted(e.key for e in entries) == [f"key{i}" for i in range(6)]
    assert not list(store.leftovers())  # the loser's temporary copy was dropped
    for e in entries:
        assert json.loads((e.path / MANIFEST).read_text())["meta"]["writer"] in ("a", "b")
