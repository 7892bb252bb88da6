"""Engines and the one session scope.

SQLite (the embedded default) gets WAL so readers work while the driver
writes, a busy timeout instead of instant 'database is locked', foreign keys,
and explicit BEGIN so a read-then-write transaction is atomic (SQLAlchemy's
documented pysqlite recipe). PostgreSQL comes by URL (``postgresql://`` means
psycopg 3, the driver the project installs).

``read_only=True`` gives an engine that cannot write, enforced by the database
itself: SQLite opens the file with ``mode=ro`` and ``query_only``; PostgreSQL
sessions default to read-only transactions. Queries typed by users go through it.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .types import json_dumps, json_loads

BUSY_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10
JSON_CODEC = {"json_serializer": json_dumps, "json_deserializer": json_loads}


class DatabaseError(RuntimeError):
    """A database problem a user can fix (bad URL, unreachable server, ...)."""


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def results_url(db: str | None, out: str | Path) -> str:
    """The --db URL, else the embedded default: SQLite in the results folder."""
    return db or sqlite_url(Path(out) / "rd3.sqlite")


def parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"not a database URL: {url!r} ({exc}); expected e.g. sqlite:///results/rd3.sqlite "
                            f"or postgresql://user@host/dbname") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe(url: str | URL) -> str:
    """The URL with any password hidden, for messages."""
    return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL (None: not SQLite, or in memory)."""
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # a URI filename (sqlite:///file:PATH?mode=ro&uri=true)
        return Path(unquote(parsed.database[len("file:"):]))
    return Path(parsed.database)


def make_engine(url: str, read_only: bool = False) -> Engine:
    parsed = parse_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, read_only)
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.get_backend_name() == "postgresql" else {}
        if read_only:
            connect_args["options"] = "-c default_transaction_read_only=on"
            return create_engine(parsed, connect_args=connect_args, poolclass=NullPool, **JSON_CODEC)
        if connect_args:
            # As SQLite's synchronous=NORMAL: a commit does not wait for the
            # server's fsync. A killed driver loses nothing (the server has the
            # commit); only a server crash can drop the last few hundred ms of
            # results, never corrupting anything. One fsync per result would
            # cap a study at the disk's flush rate.
            connect_args["options"] = "-c synchronous_commit=off"
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **JSON_CODEC)
    except (NoSuchModuleError, ImportError) as exc:
        raise DatabaseError(f"unsupported database URL {describe(parsed)!r}: {exc} "
                            f"(supported: sqlite:///PATH, postgresql://...)") from None


def _sqlite_engine(parsed: URL, read_only: bool) -> Engine:
    path = sqlite_path(parsed)
    if read_only:
        if path is None or not path.is_file():
            raise DatabaseError(f"no results database at {path or describe(parsed)} (run a study first, or pass "
                                f"--out DIR / --db URL)")
        # mode=ro: the file is never opened for writing, whatever the SQL says.
        target = f"file:{quote(str(path.resolve()))}?mode=ro"
        engine = create_engine(parsed, creator=lambda: sqlite3.connect(target, uri=True, timeout=BUSY_TIMEOUT_S,
                                                                       check_same_thread=False),
                               poolclass=NullPool, **JSON_CODEC)
    else:
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S}, **JSON_CODEC)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let the "begin" hook below emit BEGIN
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        if read_only:
            cur.execute("PRAGMA query_only=ON")
            # ATTACH would reach other files (and could create one): refused.
            dbapi_conn.set_authorizer(_no_attach)
        else:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL: a crashed process loses no commit; only a power cut can
            # drop the last few (never corrupts). FULL would fsync every result.
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Straight to the driver: this runs once per transaction, i.e. per result.
        conn.connection.driver_connection.execute("BEGIN")

    return engine


def _no_attach(action: int, *_args) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    # A plain Session: sessionmaker() would build a new Session subclass (and
    # its event dispatch) on every call, a measurable cost per result.
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
