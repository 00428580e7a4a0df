"""Running one tenant statement in an actor: its budgets, hooks, rows and operation.

The per-statement half of the actor's SQL runner (the batch and its transaction:
``_batch.py``): the progress handler that enforces the time budget, the temporary-storage
limit and the slow lane's slice; the exec trace that learns what a statement does before
it runs; fetching rows within the result limit; and applying one operation (SQL, a
batch of statements, key-value, an actor class's method).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import apsw

from . import _idempotency as idempotency
from ._config import ActorConfig
from ._errors import BadRequest, Error, Forbidden, QuotaExceeded, TooLarge, no_class_error
from ._kvstore import apply_kv
from ._ops import (
    Batch,
    BatchResult,
    KvDelete,
    KvGet,
    KvList,
    KvPut,
    Op,
    Params,
    Result,
    Sql,
    SqlResult,
)
from ._sandbox import Authorizer
from ._sqlerrors import map_error as _map_error

PROGRESS_STEPS = 1000
"""VM instructions between two looks at the clock while a statement runs."""

_FETCH_CHUNK = 256
_SCHEMA_SQL_MAX = 1024
clock = time.monotonic
NO_DEADLINE = float("inf")
KV_OPS = frozenset((KvGet, KvPut, KvDelete, KvList))
ONE_STATEMENT = frozenset((Sql, *KV_OPS))
"""Operations that run one statement: they need no savepoint of their own."""


class Preempted(Exception):
    """A read-only statement ran past the inline slice: it goes to the slow lane."""


class StatementExec:
    """A mixin of the actor (through StatementRunner): one statement, one operation."""

    # owned by Actor
    key: str
    config: ActorConfig
    conn: apsw.Connection | None
    _auth: Authorizer | None
    _cursor: apsw.Cursor | None
    runtime: Any
    schema_changed: bool

    def init_statements(self) -> None:
        self._deadline = NO_DEADLINE
        self._stmt_count = 0
        self._single = True  # the running call allows one statement only
        self._call_wrote = False  # the running call has started a write
        self._readonly = False  # the running call may not write (a read-only token)
        self._refused_write = False  # _exec_trace stopped a write of a read-only call
        self._description: tuple[tuple[str, str | None], ...] = ()
        self._schema_sql: dict[str, None] = {}  # texts of statements that change the schema
        self._idem_count = 0
        # the slow lane: a read-only call still running after config.inline_slice_s on
        # the event loop is stopped there and run again in a worker thread (pool.py)
        self._preemptible = False  # the running statement may be stopped for that
        self._slice_end = NO_DEADLINE
        self._preempt = False  # _progress stopped the statement for the slow lane
        self.in_slow_lane = False
        # temporary storage (sorts, materialized subqueries: temp_store=memory) of the
        # running statement, as the growth of SQLite's heap since it started
        self._mem_start = 0
        self._temp_exceeded = False

    # ------------------------------------------------------------------ SQLite hooks

    def _progress(self) -> bool:
        if self._preemptible and clock() > self._slice_end:
            self._preempt = True
            return True
        return self.over_budget()

    def over_budget(self) -> bool:
        """Whether the running tenant statement must stop: past its time budget, or its
        temporary storage past ``max_temp_bytes`` (noted for the error). The progress
        handler asks inline; in the slow lane the pool's watchdog asks from the loop."""
        deadline = self._deadline
        if deadline == NO_DEADLINE:
            return False  # no tenant statement runs (shardlite's own, or none)
        if clock() > deadline:
            return True
        # the growth of the process's SQLite heap since the statement started: a rough
        # measure (others allocate and free meanwhile), see actor/DESIGN.md
        limit = self.config.max_temp_bytes
        if limit and apsw.memory_used() - self._mem_start > limit:
            self._temp_exceeded = True
            return True
        return False

    def _exec_trace(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        # Called after a tenant statement is prepared and before it runs: the one place
        # where the column names of a query that returns no rows can still be read, and
        # where we learn that the call writes (then a failure of the call must undo its
        # writes, which SQLite does not always do: OR FAIL, RAISE(FAIL), a RETURNING
        # write whose rows cannot be sent). Keep it lean: it runs for every call.
        if cursor.has_vdbe:  # not just whitespace or comments
            self._stmt_count += 1
            if self._stmt_count > 1 and self._single:
                return False
            if not cursor.is_readonly:
                self._preemptible = False
                if self._readonly or self.in_slow_lane:
                    self._refused_write = True
                    return False
                self._call_wrote = True
                auth = self._auth
                if auth is not None and auth.schema_op:  # noted when it was prepared
                    auth.schema_op = False
                    self._note_schema_sql(sql)
                if sql in self._schema_sql:  # a cached statement is not prepared again
                    self.schema_changed = True
            self._description = cursor.get_description()
        return True

    def _note_schema_sql(self, sql: str) -> None:
        # bounded, and larger than apsw's statement cache (100): every cached statement
        # that changes the schema is still remembered when it runs again
        schema_sql = self._schema_sql
        schema_sql[sql] = None
        if len(schema_sql) > _SCHEMA_SQL_MAX:
            del schema_sql[next(iter(schema_sql))]

    def _internal(self, sql: str) -> None:
        """Run one of shardlite's own row-less statements (trusted by the authorizer).

        Trusted on every run, not only the first: SQLite prepares a cached statement
        again after a schema change, and asks the authorizer again then.
        """
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = NO_DEADLINE  # the budget is the tenant's, not ours
        try:
            self.conn.execute(sql)
        finally:
            auth.trusted = False

    # ------------------------------------------------------------------ one operation

    def _idem_lookup(self, key: str, op: Op) -> Result | None:
        idempotency.check_key(key)
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = NO_DEADLINE
        try:
            return idempotency.lookup(self.conn, key, op)
        finally:
            auth.trusted = False

    def _idem_record(self, key: str, op: Op, result: Result) -> None:
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = NO_DEADLINE
        self._idem_count += 1
        try:
            idempotency.record(
                self.conn, key, op, result, ttl_s=self.config.idempotency_ttl_s, n=self._idem_count
            )
        finally:
            auth.trusted = False

    def _reset_cursor(self) -> None:
        """A fresh cursor: a statement that failed mid-way must not stay in progress."""
        assert self.conn is not None
        if self._cursor is not None:
            self._cursor.close(True)
        cursor = self.conn.cursor()
        cursor.exec_trace = self._exec_trace
        self._cursor = cursor

    def _apply(self, op: Op) -> Result:
        if type(op) is Sql:
            return self._exec_sql(op.sql, op.params)
        if type(op) is Batch:
            if not op.statements:
                raise BadRequest("batch has no statements")
            results = []
            for i, stmt in enumerate(op.statements):
                try:
                    results.append(self._exec_sql(stmt.sql, stmt.params))
                except Error as exc:
                    exc.message = f"statement {i}: {exc.message}"
                    exc.details["index"] = i
                    raise
                except apsw.Error as exc:
                    err = _map_error(exc, self._auth)
                    err.message = f"statement {i}: {err.message}"
                    err.details["index"] = i
                    raise err from None
            return BatchResult(results)
        if type(op) in KV_OPS:
            return self._apply_kv(op)
        if self.runtime is None:
            raise no_class_error(self.key, op)
        return self.runtime.apply(self, op)  # type: ignore[no-any-return]

    def _exec_sql(self, sql: str, params: Params) -> SqlResult:
        conn = self.conn
        cursor = self._cursor
        assert conn is not None and cursor is not None
        self._stmt_count = 0
        config = self.config
        now = clock()
        self._mem_start = apsw.memory_used()  # before the deadline: see over_budget()
        self._slice_end = now + config.inline_slice_s
        self._preempt = self._temp_exceeded = False
        self._deadline = now + config.statement_timeout_s
        before = conn.total_changes()
        try:
            cursor.execute(sql, params if params is not None else ())
            rows = _fetch(cursor, config.max_result_bytes)
        except apsw.InterruptError:
            if self._preempt:
                self._reset_cursor()
                raise Preempted from None
            if self._temp_exceeded:
                raise QuotaExceeded(
                    "the statement's temporary storage (sorts, grouping, subqueries, index "
                    "builds, the undo journal of a large UPDATE or DELETE) passed "
                    f"{config.max_temp_bytes} bytes (--max-temp-bytes) and it was stopped; "
                    "nothing was written. An index matching the ORDER BY or GROUP BY "
                    "avoids a sort; split large updates"
                ) from None
            raise
        except apsw.ExecTraceAbort:
            if self._refused_write:
                self._refused_write = False
                raise Forbidden(
                    "the token is read-only and this statement writes (or changes the schema)"
                ) from None
            raise BadRequest(
                "sql holds more than one statement; send one per request, or use a batch"
            ) from None
        except UnicodeDecodeError as exc:
            raise BadRequest(
                f"a text value in the result is not valid UTF-8 ({exc.reason})"
            ) from None
        finally:
            self._preemptible = False  # one statement per preemptible call
            self._deadline = NO_DEADLINE  # a budget exists only while a statement runs
        if self._stmt_count == 0:
            raise BadRequest("sql is empty: it holds no statement")
        description = self._description
        return SqlResult(
            [d[0] for d in description] if description else [],
            rows,
            conn.changes() if conn.total_changes() != before else 0,
            conn.last_insert_rowid(),
        )

    def _apply_kv(self, op: Op) -> Result:
        conn, auth = self.conn, self._auth
        assert conn is not None and auth is not None
        self._deadline = NO_DEADLINE
        return apply_kv(conn, auth, op, self.config.max_value_bytes)


def _fetch(cursor: apsw.Cursor, limit: int) -> list[tuple[Any, ...]]:
    """All rows of the running statement, stopping as soon as they pass ``limit`` bytes."""
    rows = list(itertools.islice(cursor, _FETCH_CHUNK))
    size = _size(rows)
    while size <= limit and len(rows) % _FETCH_CHUNK == 0:
        chunk = list(itertools.islice(cursor, _FETCH_CHUNK))
        if not chunk:
            break
        size += _size(chunk)
        rows += chunk
    if size > limit:
        raise TooLarge(
            f"the result is larger than {limit} bytes; select fewer rows (LIMIT/OFFSET) or columns"
        )
    return rows


def _size(rows: list[tuple[Any, ...]]) -> int:
    size = 0
    for row in rows:
        for v in row:
            size += len(v) if isinstance(v, (str, bytes)) else 9
    return size


def describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no value for named parameter {exc.args[0]!r}"
    return str(exc)
