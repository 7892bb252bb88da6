"""The progress display: an updating status line on a terminal, exactly one
line per finished cell otherwise."""
import io
import re
import time

from orchestrator.execution.progress import CLEAR, Progress


def visible(text: str) -> str:
    """What a terminal shows of ``text``: without its cursor moves and erases."""
    return re.sub(r"\x1b\[\d*[A-Za-z]|\r", "", text)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run(stream, clock):
    progress = Progress(4, stream, stages={"teacher": 1, "synth": 2, "posteval": 4}, refresh_s=None, clock=clock)
    clock.now += 5
    progress.stage("teacher", "t" * 16, 5.0)
    progress.stage("synth", "s" * 16, 1.0)
    progress.stage("synth", "x" * 16, error="ValueError: boom")
    clock.now += 5
    progress.cell("c1 seed=0", True, "top1=50.00%")
    clock.now += 10
    progress.cell("c2 seed=1", False, "upstream synth failed")
    progress.close()
    return progress


def test_not_a_terminal_prints_exactly_one_line_per_finished_cell():
    out, clock = io.StringIO(), Clock()
    run(out, clock)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("[1/4] done c1 seed=0 top1=50.00%")
    assert "elapsed 10s, eta 30s" in lines[0]  # 10 s for 1 cell of 4
    assert lines[1].startswith("[2/4] FAILED c2 seed=1 upstream synth failed")
    assert "1 failed" in lines[1] and "elapsed 20s, eta 20s" in lines[1]


def test_a_terminal_gets_an_updating_status_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out, clock = FakeTTY(), Clock()
    progress = run(out, clock)
    text = out.getvalue()
    assert text.count(CLEAR) >= 6  # redrawn on every event
    permanent = [seg.split(CLEAR)[-1] for seg in text.split("\n")[:-1]]
    assert any(line.startswith("[1/4] done c1") for line in permanent)
    assert any(line.startswith("[2/4] FAILED c2") for line in permanent)
    assert any("synth xxxxxxxxxx FAILED: ValueError: boom" in line for line in permanent)
    final = text.rstrip("\n").split(CLEAR)[-1]
    assert final.startswith("cells 1 done, 1 failed, 4 total")
    assert "teacher 1/1" in final and "synth 2/2 (1 failed)" in final and "posteval 2/4 (1 failed)" in final
    assert "eta 20s" in final
    assert not progress.live  # closed: no more redraws


def test_the_status_line_refreshes_on_its_own_while_jobs_run():
    out, clock = FakeTTY(), Clock()
    progress = Progress(2, out, refresh_s=0.01, clock=clock)
    before = out.getvalue().count(CLEAR)
    clock.now += 3661
    deadline = 200
    while out.getvalue().count(CLEAR) < before + 3 and deadline:
        time.sleep(0.01)
        deadline -= 1
    progress.close()
    assert "elapsed 1h01m" in out.getvalue()


def test_the_status_line_fits_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    out = FakeTTY()
    progress = Progress(4, out, stages={"teacher": 1, "synth": 2, "posteval": 4}, refresh_s=None, clock=Clock())
    progress.close()
    drawn = [visible(seg) for seg in out.getvalue().replace("\n", "").split(CLEAR)]
    drawn = [seg for seg in drawn if seg]
    assert drawn and all(len(seg) <= 39 for seg in drawn)
    assert drawn[-1].startswith("cells 0 done, 0 failed, 4 total")


def test_eta_is_unknown_before_the_first_cell():
    progress = Progress(3, io.StringIO(), refresh_s=None, clock=Clock())
    assert progress.eta() == "--"
