"""Create or upgrade the schema through Alembic before anything else touches
the database; refuse a database written by newer code."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from . import views
from .session import DatabaseError, describe

MIGRATIONS = Path(__file__).parent / "migrations"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def explain(engine: Engine, exc: DBAPIError) -> DatabaseError:
    """A driver error as a message a user can act on (no traceback)."""
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    where = describe(engine.url)
    if "readonly" in detail.replace("-", "").replace(" ", "").lower():
        return DatabaseError(f"the results database {where} is read-only ({detail}); pass a writable --out or --db")
    if "unable to open database file" in detail:
        return DatabaseError(f"cannot open the results database {where} ({detail}): does its folder exist and "
                             f"is it writable?")
    if engine.dialect.name != "sqlite" and any(w in detail.lower() for w in ("connection", "could not connect",
                                                                               "timeout", "resolve host")):
        return DatabaseError(f"cannot connect to the results database {where}: {detail} (is the server running, "
                             f"and are the URL's host, port, user and database right?)")
    return DatabaseError(f"cannot use the results database {where}: {detail}")


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DBAPIError as exc:
        raise explain(engine, exc) from None


def check_revision(engine: Engine) -> str | None:
    """The database's revision; DatabaseError if newer code wrote it."""
    current = current_revision(engine)
    script = ScriptDirectory.from_config(_config())
    if current is not None:
        try:
            script.get_revision(current)
        except CommandError:
            raise DatabaseError(
                f"the results database {describe(engine.url)} has schema revision {current!r}, newer than this "
                f"code knows (head {script.get_current_head()!r}); upgrade rd3bench to use it") from None
    return current


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; refuse a database from newer code."""
    _migrate(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to ``revision`` (what an older release reads)."""
    _migrate(engine, command.downgrade, revision)


def _migrate(engine: Engine, step, revision: str) -> None:
    current = check_revision(engine)
    head = head_revision()
    target = head if revision == "head" else revision
    cfg = _config()
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # Batch migrations rebuild tables (copy, drop, rename): with
                # foreign keys on, dropping a parent would cascade into its
                # children. Off for the migration (only outside a transaction),
                # checked after it, on again for whoever gets this connection next.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    cfg.attributes["connection"] = conn
                    moving = current != target
                    if moving:
                        # The views are derived (db/views.py): no migration step
                        # meets them, and this code rebuilds them at head.
                        views.drop_views(conn)
                    step(cfg, revision)
                    if moving and target == head:
                        views.create_views(conn)
                    # A write that changes nothing: a read-only file or server
                    # fails here, before any job runs, not at the first result.
                    conn.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
                    if engine.dialect.name == "sqlite":
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise DatabaseError(f"schema migration of {describe(engine.url)} would break foreign "
                                                f"keys: {broken[:5]}")
            finally:
                if engine.dialect.name == "sqlite":
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
    except DBAPIError as exc:
        raise explain(engine, exc) from None
