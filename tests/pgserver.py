"""A real PostgreSQL server for the database tests.

RD3_TEST_POSTGRES_URL (a role that may CREATE DATABASE) is used when set;
otherwise a throwaway server is started with initdb/pg_ctl on loopback in a
temporary folder (as the 'postgres' or 'nobody' user when running as root:
PostgreSQL refuses to run as root). Each test gets a fresh database.
When neither works the PostgreSQL tests skip with the reason, or fail when
RD3_REQUIRE_POSTGRES=1 (CI sets it: a skipped engine must not pass as tested).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ENV_URL = "RD3_TEST_POSTGRES_URL"
ENV_REQUIRE = "RD3_REQUIRE_POSTGRES"


def unavailable(reason: str):
    if os.environ.get(ENV_REQUIRE) == "1":
        pytest.fail(f"PostgreSQL is required ({ENV_REQUIRE}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason} (set {ENV_URL}, or install postgresql: "
                f"apt-get install -y postgresql)")


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """initdb + pg_ctl in a temporary folder, listening on 127.0.0.1 only."""

    def __init__(self):
        self.base: Path | None = None
        self.data: Path | None = None
        self.prefix: list[str] = []
        self.pg_ctl: str | None = None

    def start(self) -> str:
        initdb, self.pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if not initdb or not self.pg_ctl:
            raise RuntimeError("initdb/pg_ctl not found (on PATH or under /usr/lib/postgresql/*/bin)")
        self.base = Path(tempfile.mkdtemp(prefix="rd3-pg-"))
        if os.geteuid() == 0:
            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            runuser = shutil.which("runuser")
            if user is None or runuser is None:
                raise RuntimeError("running as root and no 'postgres'/'nobody' user or runuser to start the server")
            shutil.chown(self.base, user)
            self.prefix = [runuser, "-u", user, "--"]
        self.data = self.base / "data"
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "rd3", "-E", "UTF8", "--no-sync")
        port = free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {self.base} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")
        return f"postgresql+psycopg://rd3@127.0.0.1:{port}/postgres"

    def stop(self) -> None:
        if self.data is not None and self.data.exists():
            subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()} {tail}")


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class Databases:
    """Creates a fresh database per test on an admin URL."""

    def __init__(self, admin_url: str):
        url = make_url(admin_url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        self.url = url
        self.admin = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})

    def check(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(self) -> str:
        name = f"rd3_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        self.admin.dispose()
