"""The PostgreSQL fixture's contract: without a server the PostgreSQL cases
skip with the reason, and under RD3_REQUIRE_POSTGRES=1 they fail instead."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(**env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens
    env = {**os.environ, "RD3_TEST_POSTGRES_URL": f"postgresql://rd3@127.0.0.1:{port}/postgres", **env}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_db_schema.py::test_models_equal_the_migrated_schema"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unreachable_postgres_skips_with_the_reason():
    proc = run_one(RD3_REQUIRE_POSTGRES=None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 1 skipped" in proc.stdout and "cannot connect" in proc.stdout


def test_unreachable_postgres_fails_when_required():
    proc = run_one(RD3_REQUIRE_POSTGRES="1")
    assert proc.returncode != 0
    assert "PostgreSQL is required" in proc.stdout and "1 passed" in proc.stdout
