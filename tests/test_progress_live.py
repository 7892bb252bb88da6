"""Progress from inside jobs, end to end with real Ray workers: a teacher's
epochs appear in the run's output with an ETA, `status` in another process
shows the running teacher's and then post-evaluation's epoch with an ETA, and
the cell's epoch rows are in the database while it trains and exactly once
after it finished."""
import os
import re
import signal

import pytest

from conftest import run_cli
from orchestrator.execution.jobprogress import read_run_file, run_file
from procs import descendants, finish, kill_all, rows, start_cli, wait_for

EPOCHS = 1200
# Long enough that the teacher reports several epochs between its start and end
# (a job writes its record at most once a second) on the fastest machine here.
TEACHER_EPOCHS = 60
STUDY = f"""\
name: live_progress
dataset: {{name: digits}}
teachers:
  - arch: convnet3-w32
    epochs: {TEACHER_EPOCHS}
    augment: {{crop: pad, padding: 2, flip: false, mix: none}}
methods:
  - {{name: random_real, ipc: 10}}
protocol:
  preset: rd3
  overrides:
    student: convnet3-w16
    epochs: {EPOCHS}
    augment: {{flip: false}}
    eval: {{interval: 100}}
    labels: {{mode: epochwise}}
    loss: {{temperature: 4}}
seeds: [0]
"""


@pytest.mark.slow
def test_jobs_report_progress_to_the_display_the_database_and_status(tiny_study, tmp_path):
    study, out = tiny_study("live_progress", STUDY), tmp_path / "out"
    db, progress_file = out / "rd3.sqlite", run_file(out, "live_progress")
    started = []
    driver = start_cli("run", str(study), "--out", str(out), "--num-cpus", "1", "--heartbeat-s", "0.3")
    try:
        def under_way(stage, total):
            snapshot = read_run_file(progress_file) or {}
            return [j for j in snapshot.get("jobs", []) if j["stage"] == stage and j["record"]
                    and 0 < j["record"]["done"] < total]

        def status_now() -> str:
            # Hold the driver still: its progress file stays as it last wrote it while the job runs on.
            started.extend(descendants(driver.pid))
            os.kill(driver.pid, signal.SIGSTOP)
            try:
                status = run_cli("status", "live_progress", "--out", str(out), timeout=120)
            finally:
                os.kill(driver.pid, signal.SIGCONT)
            assert status.returncode == 0, status.stderr
            assert f"run in progress (driver pid {driver.pid} on " in status.stdout
            return status.stdout

        wait_for(lambda: under_way("teacher", TEACHER_EPOCHS), 300, "the teacher's epochs in the progress file", driver)
        job = [line for line in status_now().splitlines() if line.startswith("  teacher ")]
        assert job and re.match(rf"  teacher [0-9a-f]{{10}} epoch \d+/{TEACHER_EPOCHS} \d+% loss \S+ train \S+% eta \d",
                                job[0]), job

        wait_for(lambda: under_way("posteval", EPOCHS) and rows(
            db, "SELECT count(*) FROM epoch_metric JOIN cell ON cell.id = epoch_metric.cell_id "
                "WHERE cell.status = 'running'")[0][0], 300,
                 "a running post-evaluation's epochs in the progress file and the DB", driver)
        stdout = status_now()
        assert "1 running" in stdout
        job = [line for line in stdout.splitlines() if line.startswith("  posteval ")]
        assert job and re.match(rf"  posteval [0-9a-f]{{10}} epoch \d+/{EPOCHS} \d+% loss \S+ train \S+% "
                                r"(test \S+% )?eta \d", job[0]), stdout

        code, stdout, stderr = finish(driver)
        assert code == 0, stdout + stderr
        teacher = re.findall(rf"^  teacher [0-9a-f]{{10}} epoch (\d+)/{TEACHER_EPOCHS} \d+% loss \S+ train \S+% "
                             r"(?:test \S+% )?eta (\S+)", stdout, re.M)
        assert len([k for k, eta in teacher if 0 < int(k) < TEACHER_EPOCHS and eta[0].isdigit()]) >= 2, stdout
        epochs = [e for (e,) in rows(db, "SELECT epoch FROM epoch_metric ORDER BY epoch")]
        assert epochs == list(range(1, EPOCHS + 1))  # every epoch once, whatever was written while it ran
        assert rows(db, "SELECT count(*) FROM epoch_metric WHERE test_top1 IS NOT NULL")[0][0] == EPOCHS // 100
        assert not progress_file.exists()  # the run ended: status reads the database alone
    finally:
        kill_all(started)
        if driver.poll() is None:
            driver.kill()


@pytest.mark.slow
def test_the_in_process_executor_shows_progress_too(tiny_study, tmp_path):
    """--executor local: no board, the job runs in the driver's thread; its
    records go straight to the display and the database."""
    text = STUDY.replace("name: live_progress", "name: local_progress").replace(f"epochs: {EPOCHS}", "epochs: 100")
    out = tmp_path / "out"
    done = run_cli("run", str(tiny_study("local_progress", text)), "--out", str(out), "--executor", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    teacher = re.findall(rf"^  teacher [0-9a-f]{{10}} epoch (\d+)/{TEACHER_EPOCHS} \d+% loss \S+ train \S+% "
                         r"(?:test \S+% )?eta (\S+)", done.stdout, re.M)
    assert len([k for k, eta in teacher if 0 < int(k) < TEACHER_EPOCHS and eta[0].isdigit()]) >= 2, done.stdout
    assert re.search(r"^  posteval [0-9a-f]{10} epoch \d+/100 ", done.stdout, re.M), done.stdout
    epochs = [e for (e,) in rows(out / "rd3.sqlite", "SELECT epoch FROM epoch_metric ORDER BY epoch")]
    assert epochs == list(range(1, 101))
