"""Real processes for the execution tests: start the CLI as a user would,
find the Ray worker that runs a job (its process title is ``ray::rd3:<stage>``)
among the driver's descendants only (other people's Ray jobs on the machine are
never touched), and clean up whatever a test started."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def children() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def descendants(pid: int) -> list[int]:
    parents = children()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    """The predicate's first truthy value; fails after ``timeout`` seconds, or at
    once if ``proc`` exited meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n" + proc.stderr.read())
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_worker(driver: subprocess.Popen, stage: str = "posteval", exclude=()) -> int | None:
    """The pid of a Ray worker of this driver that is running a ``stage`` job."""
    for pid in descendants(driver.pid):
        if pid not in exclude and title(pid).startswith(f"ray::rd3:{stage}") and alive(pid):
            return pid
    return None


def kill_all(pids) -> None:
    """SIGKILL the processes a test started (by id), if any is left."""
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


def attempts(db: Path) -> dict[str, list[tuple]]:
    """cell key -> its attempts' (number, status, error_type), in order."""
    out: dict[str, list[tuple]] = {}
    for key, number, status, error in rows(db, "SELECT c.cell_key, a.number, a.status, a.error_type FROM attempt a "
                                               "JOIN cell c ON c.id = a.cell_id ORDER BY c.cell_key, a.number"):
        out.setdefault(key, []).append((number, status, error))
    return out


def assert_one_result_per_cell(db: Path, cells: int) -> None:
    """Every cell done, with exactly one result (one top1, one set of epoch rows)
    from exactly one done attempt, and no attempt left running."""
    assert rows(db, "SELECT count(*), sum(status = 'done') FROM cell") == [(cells, cells)]
    top1 = rows(db, "SELECT cell_id, count(*) FROM metric WHERE name = 'top1' GROUP BY cell_id")
    assert len(top1) == cells and all(n == 1 for _, n in top1)
    assert rows(db, "SELECT count(*) FROM (SELECT cell_id, name FROM metric GROUP BY cell_id, name "
                    "HAVING count(*) > 1)") == [(0,)]
    assert rows(db, "SELECT count(*) FROM (SELECT cell_id, epoch FROM epoch_metric GROUP BY cell_id, epoch "
                    "HAVING count(*) > 1)") == [(0,)]
    done = rows(db, "SELECT cell_id, count(*) FROM attempt WHERE status = 'done' GROUP BY cell_id")
    assert len(done) == cells and all(n == 1 for _, n in done)
    assert rows(db, "SELECT count(*) FROM attempt WHERE status IN ('running', 'pending')") == [(0,)]
    # Each result belongs to the cell's done attempt.
    assert rows(db, "SELECT count(*) FROM metric m JOIN attempt a ON a.id = m.attempt_id "
                    "WHERE a.status != 'done' OR a.cell_id != m.cell_id") == [(0,)]
