"""The heartbeat boards: the key-value store's where it is known to work, files
otherwise (orchestrator.execution.worker.choose_board), so that liveness never
silently depends on Ray internals."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.execution.worker import BOARD_ENV, FileBoard, choose_board

ROOT = Path(__file__).resolve().parents[1]


def test_file_board_round_trip(tmp_path):
    board = FileBoard(str(tmp_path), "run-1")
    assert board.read() == {}  # nothing beaten yet: no folder
    board.beat("posteval:ab#0", 1, "node-a", 11, "host a")
    board.beat("teacher/x#1", 1, "node-b", 12, "h")
    board.beat("posteval:ab#0", 2, "node-a", 11, "host a")  # a rewrite, not a second file
    assert board.read() == {"posteval:ab#0": (2, "node-a", 11, "host a"), "teacher/x#1": (1, "node-b", 12, "h")}
    (tmp_path / "run-1" / "half.123.tmp").write_text("")  # a beat caught mid-write is not read
    (tmp_path / "run-1" / "torn").write_text("3 node")  # nor one that does not parse
    assert set(board.read()) == {"posteval:ab#0", "teacher/x#1"}
    board.clear(["teacher/x#1", "never-beaten"])
    assert set(board.read()) == {"posteval:ab#0"}
    FileBoard(str(tmp_path), "run-2").beat("t", 1, "n", 1, "h")
    board.clear_run()
    assert board.read() == {} and FileBoard(str(tmp_path), "run-2").read() == {"t": (1, "n", 1, "h")}


def fake_ray(version="2.60.0"):
    return SimpleNamespace(__version__=version)


@pytest.mark.parametrize("env, address, tested, why", [
    ("files", None, True, "RD3_HEARTBEATS=files"),
    ("", "ray://head:10001", True, "Ray Client"),
    ("", None, False, "Ray 2.60.0 is not the tested release"),
    ("", None, True, "key-value store failed"),  # no Ray instance here: the probe write fails
])
def test_choose_board_falls_back_to_files_and_says_why(tmp_path, monkeypatch, env, address, tested, why):
    monkeypatch.setenv(BOARD_ENV, env)
    board, note = choose_board(fake_ray(), "run", str(tmp_path), address, tested)
    assert isinstance(board, FileBoard) and board.path == os.path.join(str(tmp_path), "run")
    assert why in note and str(tmp_path) in note


def test_the_tested_ray_keeps_the_key_value_store(tmp_path):
    """A real embedded instance (in a process of its own, as a driver runs it):
    the probe passes, the executor beats to the key-value store and says nothing;
    progress records live beside the beats and are cleared with them."""
    code = f"""
from orchestrator.execution.runner import RayExecutor
from orchestrator.execution.worker import Board
ex = RayExecutor({str(tmp_path / 'artifacts')!r}, num_cpus=1)
try:
    ex.board.beat("job#0", 1, "node", 7, "host")
    print(type(ex.board).__name__, ex.board.read())
    ex.board.report("job#0", '{{"done": 1}}')  # a progress record: beside the beat, not in it
    print(ex.board.read(), ex.board.progress())
    ex.board.clear(["job#0"])
    print(ex.board.read(), ex.board.progress())
    ex.board.report("job#1", '{{"done": 2}}')
    ex.board.clear_run()
    print(ex.board.read(), ex.board.progress())
finally:
    ex.close()
"""
    env = {k: v for k, v in os.environ.items() if k != BOARD_ENV}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Board {'job#0': (1, 'node', 7, 'host')}",
                                        "{'job#0': (1, 'node', 7, 'host')} {'job#0': {'done': 1}}", "{} {}", "{} {}"]
    assert "heartbeats through files" not in done.stderr
