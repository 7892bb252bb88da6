"""Progress from inside jobs: rd3core's long loops call an optional
progress(done, total, unit, **metrics); the worker's Reporter writes it to the
heartbeat board at most once a second; the driver turns records into per-job
lines with an ETA, epoch rows in the database and the file `status` reads."""
import io
import json
import math
import os
import socket

import pytest
import torch

from orchestrator.execution.jobprogress import Reporter, describe, eta_s, read_run_file, run_file, write_run_file
from orchestrator.execution.progress import Progress
from orchestrator.execution.worker import FileBoard
from orchestrator.query import show_jobs
from rd3core.config import build
from rd3core.data import Split, load_dataset
from rd3core.labels import HardLabels
from rd3core.loop import train
from rd3core.pipeline import TeacherSpec, build_model, make_stored_labels
from rd3core.protocol import Protocol
from rd3core.synth import METHODS, synthesize
from rd3core.synth.random_real import RandomRealParams

ARCH = "convnet2-w8"


class Calls(list):
    def __call__(self, done, total, unit, **metrics):
        self.append((done, total, unit, metrics))


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_dataset("digits")


# --- the loops' callbacks ----------------------------------------------------------------

def test_train_reports_each_epoch_with_its_row(digits):
    calls = Calls()
    protocol = build(Protocol, {"student": ARCH, "epochs": 4, "batch_size": 64, "augment": {"flip": False},
                                "eval": {"interval": 2}})
    small = Split(digits.train.images[:128], digits.train.labels[:128])
    result = train(build_model(ARCH, digits, 0), small, digits.info, protocol, HardLabels(), batch_size=64, seed=0,
                   test=digits.test, progress=calls)
    assert [(d, t, u) for d, t, u, _ in calls] == [(0, 4, "epoch"), (1, 4, "epoch"), (2, 4, "epoch"),
                                                  (3, 4, "epoch"), (4, 4, "epoch")]
    assert calls[0][3] == {}
    assert [c[3] for c in calls[1:]] == result.epochs  # each epoch's row, as history keeps it
    assert "test_top1" in calls[2][3] and "test_top1" not in calls[1][3]  # the evaluated epochs carry it


def test_sre2l_reports_every_iteration_of_every_batch_with_its_loss(digits):
    teacher = build_model("convnet2-w8-bn", digits, 0).eval()
    calls = Calls()
    params = build(METHODS.get("sre2l").params, {"ipc": 3, "iterations": 4, "batch_size": 20})  # 30 images: 2 batches
    synthesize("sre2l", digits, teacher, params, seed=0, progress=calls)
    assert [(d, t, u) for d, t, u, _ in calls] == [(d, 8, "iteration") for d in range(9)]
    losses = [m["loss"] for _, _, _, m in calls[1:]]
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and math.isfinite(float(v)) for v in losses)


def test_a_method_that_does_not_report_is_run_without_the_callback(digits):
    calls = Calls()
    out = synthesize("random_real", digits, None, RandomRealParams(ipc=2), seed=0, progress=calls)
    assert calls == [] and len(out.labels) == 20


def test_stored_label_precompute_reports_every_batch(digits):
    teacher = build_model(ARCH, digits, 0).eval()
    distilled = synthesize("random_real", digits, None, RandomRealParams(ipc=4), seed=0)  # 40 images
    protocol = build(Protocol, {"student": ARCH, "epochs": 6, "batch_size": 16, "labels": {"mode": "stored",
                                                                                            "refresh_every": 2}})
    calls = Calls()
    stored = make_stored_labels(distilled, digits, protocol, {ARCH: teacher}, seed=0, progress=calls)
    assert len(stored.blocks) == 3  # 6 epochs, views redrawn every 2: 3 blocks of 3 steps of 16
    assert [(d, t, u) for d, t, u, _ in calls] == [(d, 9, "batch") for d in range(10)]


def test_a_teacher_reports_its_epochs(digits):
    from rd3core.pipeline import train_teacher

    calls = Calls()
    train_teacher(digits, TeacherSpec(arch=ARCH, epochs=2, batch_size=512), progress=calls)
    assert [(d, t, u) for d, t, u, _ in calls] == [(0, 2, "epoch"), (1, 2, "epoch"), (2, 2, "epoch")]
    assert "test_top1" in calls[-1][3]  # a teacher's last epoch is evaluated


# --- the worker's Reporter ---------------------------------------------------------------

class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class MemoryBoard:
    def __init__(self):
        self.written = []

    def report(self, token, record):
        self.written.append((token, json.loads(record)))


def test_the_reporter_writes_at_a_loops_start_and_end_and_at_most_once_a_second_between():
    board, clock = MemoryBoard(), Clock()
    report = Reporter(board, "job#0", every_s=1.0, keep_rows=3, clock=clock).stage("posteval")
    report(0, 10, "epoch")
    for epoch in range(1, 11):
        clock.now += 0.3
        report(epoch, 10, "epoch", epoch=epoch, loss=torch.tensor(1.0 / epoch), train_top1=0.1 * epoch)
    written = [r["done"] for _, r in board.written]
    # 0 (start), then the first call 1 s after the last write, ..., 10 (end)
    assert written == [0, 4, 8, 10]
    last = board.written[-1][1]
    assert last["stage"] == "posteval" and last["unit"] == "epoch" and last["total"] == 10
    assert last["since"] == [1000.0, 0] and last["t"] == pytest.approx(1003.0)
    assert last["metrics"] == {"epoch": 10.0, "loss": pytest.approx(0.1), "train_top1": pytest.approx(1.0)}
    assert [r["epoch"] for r in last["rows"]] == [8.0, 9.0, 10.0]  # the last keep_rows epochs
    assert eta_s(board.written[1][1]) == pytest.approx(6 * 1.2 / 4)  # 4 epochs in 1.2 s, 6 to go


def test_a_new_loop_restarts_the_rate_and_the_rows():
    board, clock = MemoryBoard(), Clock()
    reporter = Reporter(board, "job#0", clock=clock)
    reporter.stage("posteval")(0, 4, "batch")
    clock.now += 2
    reporter.stage("posteval")(4, 4, "batch")
    clock.now += 1
    reporter.stage("posteval")(0, 3, "epoch")
    record = board.written[-1][1]
    assert record["unit"] == "epoch" and record["since"] == [1003.0, 0] and record["rows"] == []
    assert eta_s(record) is None  # nothing done yet in this loop: no rate


def test_a_board_that_fails_does_not_fail_the_job():
    class Broken:
        def report(self, token, record):
            raise OSError("disk full")

    Reporter(Broken(), "job#0").stage("teacher")(0, 3, "epoch")


def test_the_file_board_keeps_progress_beside_the_beats(tmp_path):
    board = FileBoard(str(tmp_path), "run-1")
    board.beat("posteval:ab#0", 1, "node", 11, "host")
    assert board.progress() == {}
    Reporter(board, "posteval:ab#0").stage("posteval")(0, 5, "epoch")
    assert board.read() == {"posteval:ab#0": (1, "node", 11, "host")}  # the beats' reader sees beats only
    assert board.progress()["posteval:ab#0"]["total"] == 5
    (tmp_path / "run-1.progress" / "torn").write_text('{"sta')  # caught mid-write: not read
    assert set(board.progress()) == {"posteval:ab#0"}
    board.clear(["posteval:ab#0"])
    assert board.read() == {} and board.progress() == {}
    board.report("t#1", "{}")
    board.clear_run()
    assert not (tmp_path / "run-1.progress").exists()


def test_describe_says_where_a_loop_is_and_how_long_is_left():
    record = {"stage": "teacher", "unit": "epoch", "done": 3, "total": 10, "t": 130.0, "since": [100.0, 0],
              "metrics": {"loss": 0.51234, "train_top1": 0.8, "test_top1": 0.755}}
    assert eta_s(record) == pytest.approx(70.0)
    assert describe(record, 70.0, "teacher") == "epoch 3/10 30% loss 0.5123 train 80.0% test 75.5% eta 1m10s"
    assert describe(record, None, "posteval").startswith("(teacher) epoch 3/10")  # rebuilt inside another job
    assert describe(None, None, "synth") == "running"


# --- the display -------------------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: lines, carriage return, cursor up
    (ESC[nA), erase line (ESC[K), erase below (ESC[J); enough for the display."""
    import re

    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[\d*[AJK]|\r|\n|[^\x1b\r\n]+", text):
        if token == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token == "\r":
            col = 0
        elif token.endswith("A"):
            row = max(0, row - int(token[2:-1] or 1))
        elif token.endswith("K"):
            rows[row] = rows[row][:col]
        elif token.endswith("J"):
            rows[row] = rows[row][:col]
            del rows[row + 1:]
        else:
            rows[row] = rows[row][:col].ljust(col) + token + rows[row][col + len(token):]
            col += len(token)
    return rows


def record(done, total=10, t=None, stage="teacher", unit="epoch", **metrics):
    return {"stage": stage, "unit": unit, "done": done, "total": total, "t": 100.0 + 2 * done if t is None else t,
            "since": [100.0, 0], "metrics": metrics}


def test_not_a_terminal_prints_one_line_per_job_update():
    out, clock = io.StringIO(), Clock(50.0)
    progress = Progress(2, out, stages={"teacher": 1, "posteval": 2}, refresh_s=None, clock=clock)
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(0))])
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(0))])  # nothing new: no line
    clock.now += 4
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(2, loss=1.5, train_top1=0.5)),
                   ("synth:s", "synth", "s" * 16, None)])  # a job that reports nothing: no line
    progress.job_done("teacher:t")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert lines == ["  teacher tttttttttt epoch 0/10 0% eta --  (0/2 cells, elapsed 0s, eta --)",
                     "  teacher tttttttttt epoch 2/10 20% loss 1.5 train 50.0% eta 16s  (0/2 cells, elapsed 4s, "
                     "eta --)"]


def test_a_terminal_shows_a_table_of_running_jobs_above_the_status_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out, clock = FakeTTY(), Clock(50.0)
    progress = Progress(2, out, stages={"teacher": 1, "posteval": 2}, refresh_s=None, clock=clock)
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(2)), ("posteval:p", "posteval", "p" * 16,
                                                                   record(5, 50, stage="posteval"))])
    shown = screen(out.getvalue())
    assert shown[0].startswith("  teacher tttttttttt epoch 2/10 20% eta 16s")
    assert shown[1].startswith("  posteval pppppppppp epoch 5/50 10% eta 1m30s")
    assert shown[2].startswith("cells 0 done, 0 failed, 2 total")
    assert len(shown) == 3
    clock.now += 6  # a redraw counts the ETA down between records
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(2)), ("posteval:p", "posteval", "p" * 16,
                                                                   record(5, 50, stage="posteval"))])
    assert screen(out.getvalue())[0].startswith("  teacher tttttttttt epoch 2/10 20% eta 10s")
    progress.job_done("teacher:t")
    progress.cell("pppppppppp seed=0", True, "top1=50.00%")  # a permanent line goes above the table
    shown = screen(out.getvalue())
    assert shown[0].startswith("[1/2] done pppppppppp seed=0")
    assert shown[1].startswith("  posteval pppppppppp epoch 5/50")
    assert shown[2].startswith("cells 1 done, 0 failed, 2 total") and len(shown) == 3
    progress.job_done("posteval:p")
    progress.close()
    shown = screen(out.getvalue())
    assert shown[0].startswith("[1/2] done") and shown[1].startswith("cells 1 done") and shown[2] == ""


# --- the run's progress file and `status` --------------------------------------------------

def test_status_shows_the_jobs_of_a_run_in_progress(tmp_path):
    progress = Progress(4, io.StringIO(), refresh_s=None, clock=Clock(10.0))
    progress.jobs([("teacher:t", "teacher", "t" * 16, record(3, loss=0.7))])
    path = run_file(tmp_path, "tiny")
    write_run_file(path, {**progress.snapshot(), "updated": 1000.0, "pid": os.getpid(), "host": socket.gethostname()})
    assert read_run_file(path)["jobs"][0]["label"] == "teacher tttttttttt"
    out = io.StringIO()
    show_jobs(tmp_path, "tiny", out, now=1002.0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"run in progress (driver pid {os.getpid()} on ")
    assert "updated 2 s ago): cells 0 done, 0 failed, 4 total" in lines[0]
    assert lines[1] == "  teacher tttttttttt epoch 3/10 30% loss 0.7 eta 12s"  # 14 s left when written, 2 s ago
    out = io.StringIO()
    show_jobs(tmp_path, "tiny", out, now=1100.0)
    assert "the run may have stopped" in out.getvalue()
    out = io.StringIO()
    show_jobs(tmp_path, "other", out)
    assert out.getvalue() == ""  # no run in progress: nothing


def test_status_says_when_the_driver_is_gone(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_run_file(run_file(tmp_path, "tiny"), {"status": "cells 0 done", "jobs": [], "updated": 1000.0,
                                                "pid": int(gone.stdout), "host": socket.gethostname()})
    out = io.StringIO()
    show_jobs(tmp_path, "tiny", out, now=1001.0)
    assert f"its driver (pid {int(gone.stdout)}) is no longer running" in out.getvalue()


def test_the_driver_hears_the_progress_of_the_jobs_that_beat():
    """RayExecutor.check against a board it reads (no Ray instance): each running
    job with its record; a job not yet beating is not reported, whatever it wrote."""
    from collections import deque

    from orchestrator.execution.plan import Node
    from orchestrator.execution.runner import RayExecutor

    class Cluster:
        def nodes(self):
            return [{"NodeID": "n1", "Alive": True}]

    class Board:
        def read(self):
            return {"a": (1, "n1", 11, "h"), "b": (1, "n1", 12, "h")}

        def progress(self):
            return {"a": record(3), "queued": record(1)}

    seen = []
    nodes = {t: Node("teacher", t * 16, (), {}) for t in ("a", "b", "queued")}
    executor = RayExecutor.__new__(RayExecutor)
    executor.ray, executor.board, executor.beats, executor.lost = Cluster(), Board(), {}, deque()
    executor.heartbeat_s, executor.on_tick, executor.on_progress = 1.0, None, seen.append
    executor.pending = {f"ref-{t}": (node, t) for t, node in nodes.items()}
    executor.check()
    assert seen == [[(nodes["a"], record(3)), (nodes["b"], None)]]
