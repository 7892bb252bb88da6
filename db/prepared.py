"""The driver's per-result statements, run on the DBAPI cursor.

A result is about ten small statements. Through ``Connection.execute`` each
pays 40-70 us of SQLAlchemy bookkeeping (parameter construction, execution
context, result wrapping) on these CPUs, against about 1 us for the cursor
call itself: the bookkeeping alone held the driver near 1,000 results/s
(bench/db_scale.py). A ``Prepared`` statement is compiled once per dialect by
SQLAlchemy (the same SQL it would send, each parameter through its column
type's own bind processor: enums, UTC datetimes, JSON), then runs on the
connection's cursor inside the caller's transaction. DBAPI errors surface as
SQLAlchemy's ``DBAPIError`` (disconnects invalidate the connection), as with
``Connection.execute``, and a value its type refuses as ``StatementError``;
cursor-execute events are not fired (none is used).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Executable


@dataclass(frozen=True)
class _Plan:
    sql: str
    names: tuple[str, ...]  # bind names in the order the driver takes them
    positional: bool  # tuples (qmark/format) or dicts (pyformat)
    defaults: dict[str, Any]  # binds with a fixed value (literals in the statement)
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]


class Prepared:
    """``statement`` (a Core insert/update/delete/select), compiled once per
    dialect; ``insert_columns`` restricts an INSERT to those columns."""

    def __init__(self, statement: Executable, insert_columns: Sequence[str] | None = None):
        self.statement = statement
        self.insert_columns = list(insert_columns) if insert_columns is not None else None
        self._plans: weakref.WeakKeyDictionary[Dialect, _Plan] = weakref.WeakKeyDictionary()

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> None:
        self._run(conn, params, many=False)

    def executemany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self._run(conn, rows, many=True)

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first column of the first row (a SELECT, or RETURNING)."""
        return self._run(conn, params, many=False, fetch=True)

    def _plan(self, dialect: Dialect) -> _Plan:
        plan = self._plans.get(dialect)
        if plan is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=self.insert_columns)
            names = tuple(compiled.positiontup) if dialect.positional else tuple(compiled.binds)
            processors = []
            for name in dict.fromkeys(names):
                process = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors.append((name, process))
            defaults = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
            plan = self._plans[dialect] = _Plan(str(compiled), names, dialect.positional, defaults,
                                                tuple(processors))
        return plan

    @staticmethod
    def _bind(plan: _Plan, params: Mapping[str, Any]):
        values = {**plan.defaults, **params} if plan.defaults else dict(params)
        for name, process in plan.processors:
            values[name] = process(values[name])
        if plan.positional:
            return tuple(values[name] for name in plan.names)
        return {name: values[name] for name in plan.names}

    def _run(self, conn: Connection, params, many: bool, fetch: bool = False) -> Any:
        plan = self._plan(conn.dialect)
        try:
            bound = [self._bind(plan, row) for row in params] if many else self._bind(plan, params)
        except Exception as exc:  # a value its type refuses: as Connection.execute reports it
            raise StatementError(f"({type(exc).__module__}.{type(exc).__name__}) {exc}", plan.sql, params,
                                 exc) from exc
        dbapi_conn = conn.connection.dbapi_connection
        cursor = dbapi_conn.cursor()
        try:
            if many:
                cursor.executemany(plan.sql, bound)
            else:
                cursor.execute(plan.sql, bound)
            if fetch:
                row = cursor.fetchone()
                return None if row is None else row[0]
            return None
        except conn.dialect.loaded_dbapi.Error as exc:
            invalidated = conn.dialect.is_disconnect(exc, dbapi_conn, cursor)
            if invalidated:
                conn.invalidate(exc)
            raise DBAPIError.instance(plan.sql, bound, exc, conn.dialect.loaded_dbapi.Error,
                                      connection_invalidated=invalidated, dialect=conn.dialect) from exc
        finally:
            cursor.close()
