"""The actor: the one owner of one SQLite file, and its group-commit batch loop.

An actor is not a task. It is a serialized executor: callers append :class:`Call` s to
its mailbox and the pool runs :meth:`Actor.run_batch` on the event-loop thread, with no
``await`` inside, so two batches of one actor never interleave and no lock is needed.
A batch is one transaction: every call in it runs (a multi-statement call inside its own
SAVEPOINT), the batch commits once, and the replies go to the durability policy, which
releases them when the commit is durable (the output gate).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import apsw
import trio

from . import _idempotency as idempotency
from ._capture import RowCapture, load_tables
from ._config import ActorConfig
from ._connection import LSN_GET, LSN_SET, open_actor_db
from ._errors import (
    BadRequest,
    Error,
    Forbidden,
    Internal,
    TooLarge,
    no_class_error,
)
from ._kvstore import apply_kv
from ._ops import (
    Batch,
    BatchResult,
    Inline,
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
from ._sandbox import Authorizer, internal_sql
from ._sqlerrors import map_error as _map_error

if TYPE_CHECKING:
    from ._durability import DurabilityPolicy

log = logging.getLogger("shardlite.actor")

PROGRESS_STEPS = 1000
"""VM instructions between two looks at the clock while a statement runs."""

_SCHEMA_SQL_MAX = 1024
_clock = time.monotonic
_NO_DEADLINE = float("inf")
# Transaction control is internal SQL too: a tenant's "COMMIT" must never hit our cached
# statement, which SQLite would run without asking the authorizer again.
_BEGIN = internal_sql("BEGIN")
_COMMIT = internal_sql("COMMIT")
_ROLLBACK = internal_sql("ROLLBACK")
_SAVEPOINT = internal_sql("SAVEPOINT call")
_RELEASE = internal_sql("RELEASE call")
_ROLLBACK_TO = internal_sql("ROLLBACK TO call")
_KV_OPS = frozenset((KvGet, KvPut, KvDelete, KvList))
_ONE_STATEMENT = frozenset((Sql, *_KV_OPS))
"""Operations that run one statement: they need no savepoint of their own."""


class Sink(Protocol):
    """Where a call's result goes: an RPC connection, an HTTP waiter, ..."""

    def deliver(self, tag: Any, result: Result | Error) -> None: ...


class Exclusive:
    """A mailbox entry that needs the actor to itself (delete, export, ...).

    It runs after every call queued before it and before any call queued after it;
    ``fn`` is awaited by the pool while the actor is BUSY, its result is delivered like
    any other call's.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Actor], Awaitable[Any]]) -> None:
        self.fn = fn


class Call:
    """One request in an actor's mailbox."""

    __slots__ = ("idem", "op", "readonly", "sink", "tag")

    def __init__(
        self,
        op: Op | Exclusive | Inline,
        sink: Sink,
        tag: Any = None,
        idem: str | None = None,
        readonly: bool = False,
    ) -> None:
        self.op = op
        self.sink = sink
        self.tag = tag
        self.idem = idem  # an idempotency key
        self.readonly = readonly  # a read-only token: any statement that writes is refused


Replies = tuple[list[Call], list["Result | Error"]]
"""A committed batch's calls and their results, waiting for the output gate."""


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    BUSY = "busy"
    """A blocking operation (checkpoint, close, export) runs in a worker thread."""


class _TxnLost(Exception):
    """SQLite rolled back the whole transaction (interrupt, disk full, ...)."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


class Actor:
    """Owner of one SQLite file. Create through :class:`ActorPool`, not directly."""

    def __init__(
        self,
        key: str,
        path: str,
        config: ActorConfig,
        durability: DurabilityPolicy,
    ) -> None:
        self.key = key
        self.path = path
        self.config = config
        self.durability = durability
        self.state = State.CLOSED
        self.mailbox: deque[Call] = deque()
        self.scheduled = False
        self.last_used = 0.0
        self.conn: apsw.Connection | None = None
        self._auth: Authorizer | None = None
        self._cursor: apsw.Cursor | None = None
        self._deadline = _NO_DEADLINE
        self._stmt_count = 0
        self._single = True  # the running call allows one statement only
        self._call_wrote = False  # the running call has started a write
        self._readonly = False  # the running call may not write (a read-only token)
        self._refused_write = False  # _exec_trace stopped a write of a read-only call
        self._description: tuple[tuple[str, str | None], ...] = ()
        self._wrote = False
        self.wal_pages = 0
        # durability bookkeeping, owned by the DurabilityPolicy
        self.written_gen = 0
        self.synced_gen = 0
        self.flushing = False
        self.pending: deque[tuple[int, list[Call], list[Result | Error], bool]] = deque()
        """Committed batches waiting for the output gate: (position, calls, results,
        whether the shard log holds them)."""
        self.wal_fd: int | None = None
        self.dir_sync_needed = False
        """The WAL's directory entry must be synced on the next flush (fdatasync_wal)."""
        self.broken = False
        self.cooling = False  # paused after hogging the event loop (see ActorPool.run_ready)
        self.want_checkpoint = False
        self.released: trio.Event | None = None
        # durability=log: the shard log's bookkeeping (see _logdurability.py)
        self.capture: RowCapture | None = None
        self.log_shard: Any = None  # the shard log's state for this file's shard
        self.last_lsn = 0  # LSN of the last batch that wrote
        self.file_lsn = 0  # everything up to this LSN is durable in the file itself
        self.needs_file_sync = False  # an unlogged batch waits for the file's fdatasync
        self.schema_changed = False  # the running batch changes the schema or header
        self._schema_sql: dict[str, None] = {}  # texts of statements that do
        self._idem_count = 0
        # actor classes (see _appruntime.py): set by the pool when an app is configured
        self.app: Any = None  # the ClassInfo serving this key, or None
        self.runtime: Any = None  # the AppRuntime
        self.instance: Any = None  # the class's instance while the file is open
        self.app_ready = False  # instance made and migrations run since the open
        self.alarms_dirty = False  # the running transaction changed alarms
        self.written: set[str] | None = None
        """While its shard is being moved: the set of keys written since their copy."""
        # counters for statistics()
        self.batches = 0
        self.calls = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self, *, create: bool = True, initial_lsn: int = 0) -> None:
        """Open (or create) the file. Blocking (creating syncs the header): worker thread."""
        new_file = create and not os.path.lexists(self.path)
        conn, auth = open_actor_db(
            self.path, self.key, self.config, create=create, initial_lsn=initial_lsn
        )
        if new_file:
            # a new file must survive a power cut whole, name and first transaction
            # (its tables, its key, its starting LSN) included
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            fanout = os.path.dirname(self.path)
            sync_directory(fanout)
            sync_directory(os.path.dirname(fanout))
        self.conn = conn
        self._auth = auth
        conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        conn.set_wal_hook(self._wal_hook)
        cursor = conn.cursor()
        cursor.exec_trace = self._exec_trace
        self._cursor = cursor
        # the WAL is created anew after every open: its directory entry needs a sync
        self.dir_sync_needed = True
        self.durability.opened(self)

    def start_capture(self) -> None:
        """durability=log: record the rows each batch changes, from the LSN the file holds."""
        conn, auth = self.conn, self._auth
        assert conn is not None and auth is not None
        auth.trusted = True
        try:
            self.file_lsn = self.last_lsn = int(conn.execute(LSN_GET).fetchall()[0][0])  # type: ignore[arg-type]
        finally:
            auth.trusted = False
        self.reload_tables()

    def reload_tables(self) -> None:
        """What the capture knows of the tables (after a schema change). Not durability:
        ``file_lsn`` moves only when the file is synced."""
        conn, auth = self.conn, self._auth
        assert conn is not None and auth is not None
        auth.trusted = True
        try:
            tables = load_tables(conn)
        finally:
            auth.trusted = False
        if self.capture is None:
            self.capture = RowCapture()
            conn.preupdate_hook(self.capture.hook)
        self.capture.tables = tables
        self.capture.reset()

    def take_record(self) -> bytes | None:
        """The shard-log record of the open transaction (None: it cannot be logged)."""
        conn, auth, capture = self.conn, self._auth, self.capture
        assert conn is not None and auth is not None and capture is not None
        auth.trusted = True
        self._deadline = _NO_DEADLINE
        try:
            return capture.take(conn)
        finally:
            auth.trusted = False

    def write_lsn(self, lsn: int) -> None:
        """Record in the file, inside the open transaction, the log position it reaches."""
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = _NO_DEADLINE
        try:
            self.conn.execute(LSN_SET, (lsn,))
        finally:
            auth.trusted = False

    @property
    def busy(self) -> bool:
        return self.state is State.BUSY

    def close(self) -> None:
        """Close the file. Run :meth:`checkpoint_blocking` first, in a worker thread.

        apsw holds the GIL through ``close()``, which checkpoints whatever the WAL still
        holds: in a worker thread that stalls the event loop anyway, and the loop thread
        then waits up to a GIL switch interval (5 ms) after each SQLite call that
        released it. After a checkpoint the close itself is quick: run it inline.
        """
        conn, self.conn, self._cursor = self.conn, None, None
        self.capture = None  # its preupdate hook belongs to this connection: a reopen makes anew
        self.instance = None
        self.app_ready = False
        try:
            if conn is not None:
                conn.close()
        finally:
            if self.wal_fd is not None:
                os.close(self.wal_fd)
                self.wal_fd = None

    def size_bytes(self) -> int:
        """About how large an exported copy of the file would be."""
        conn, auth = self.conn, self._auth
        assert conn is not None and auth is not None
        auth.trusted = True
        try:
            return int(conn.pragma("page_count")) * int(conn.pragma("page_size"))
        finally:
            auth.trusted = False

    def checkpoint_blocking(self) -> None:
        """Copy the WAL into the database and truncate it. Blocking: worker thread."""
        if self.conn is not None:
            self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            self.wal_pages = 0

    def export_blocking(self, dest: str) -> None:
        """Write a consistent copy of the file to ``dest`` (backup API). Worker thread."""
        assert self.conn is not None
        out = apsw.Connection(dest)
        try:
            with out.backup("main", self.conn, "main") as backup:
                backup.step(-1)
        finally:
            out.close()

    @property
    def idle(self) -> bool:
        """No mail, no thread operation, no unreleased reply."""
        return (
            self.state is not State.BUSY
            and not self.mailbox
            and not self.scheduled
            and not self.pending
            and not self.flushing
        )

    # ------------------------------------------------------------------ SQLite hooks

    def _progress(self) -> bool:
        return _clock() > self._deadline

    def _wal_hook(self, conn: apsw.Connection, dbname: str, pages: int) -> int:
        self._wrote = True
        self.wal_pages = pages
        return apsw.SQLITE_OK

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
                if self._readonly:
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
        self._deadline = _NO_DEADLINE  # the budget is the tenant's, not ours
        try:
            self.conn.execute(sql)
        finally:
            auth.trusted = False

    # ------------------------------------------------------------------ the batch

    def run_batch(self) -> None:
        """Run calls from the mailbox as one transaction (group commit).

        At most ``max_batch`` calls, stopping before an :class:`Exclusive` entry (the
        pool runs that one on its own) and once the batch has run for a statement
        budget: calls left over go back to the front of the mailbox, so one tenant's
        slow calls hold the event loop for a bounded time.
        """
        mailbox = self.mailbox
        calls: list[Call] = []
        limit = self.config.max_batch
        while mailbox and len(calls) < limit and type(mailbox[0].op) is not Exclusive:
            calls.append(mailbox.popleft())
        if not calls:
            return
        self.batches += 1
        if self.app is not None and not self.app_ready:
            error = self.runtime.prepare(self)  # the instance; migrations in a transaction
            if error is not None:
                deliver(calls, [error] * len(calls))
                return
        try:
            results = self._run_transaction(calls)
        except Exception as exc:  # a bug: fail this batch, reset the actor, keep the shard up
            log.exception("actor %r: unexpected failure in a batch", self.key)
            if self.conn is not None and not self.conn.get_autocommit():
                self._rollback()
            results = [Internal(f"unexpected failure: {type(exc).__name__}")] * len(calls)
            self.broken = True
        if len(results) < len(calls):
            mailbox.extendleft(reversed(calls[len(results) :]))
            del calls[len(results) :]
        self.calls += len(calls)
        self._report_commit(calls, results)
        if self.alarms_dirty:
            self.runtime.alarms_changed(self)  # inline, right after COMMIT (see _alarms.py)
        self._after_schema_change()

    def _commit(self) -> None:
        self.durability.before_commit(self)  # durability=log: the batch's LSN and record
        self._internal(_COMMIT)

    def run_own_transaction(self, fn: Callable[[], None]) -> Error | None:
        """Run ``fn`` (a migration) in a transaction of its own, committed through the
        durability policy like a batch without replies; its error, if it failed."""
        conn = self.conn
        assert conn is not None
        self._readonly = False
        self._internal(_BEGIN)
        try:
            fn()
            self._commit()
        except (Error, apsw.Error) as exc:
            if not conn.get_autocommit():
                self._rollback()
            else:
                self.durability.rolled_back(self)
            self.schema_changed = False
            self.alarms_dirty = False
            return exc if isinstance(exc, Error) else _map_error(exc, self._auth)
        self._report_commit([], [])
        self._after_schema_change()
        return None

    def begin_exclusive(self) -> None:
        """Open the transaction of an exclusive call (an async method)."""
        self.batches += 1
        self._readonly = False
        self._internal(_BEGIN)

    def finish_exclusive(
        self, calls: list[Call], results: list[Result | Error], *, commit: bool
    ) -> None:
        """Commit (or roll back) an exclusive call's transaction; its replies go through
        the durability policy like a batch's."""
        conn = self.conn
        assert conn is not None
        self.calls += len(calls)
        if commit and not conn.get_autocommit():
            try:
                self._commit()
            except apsw.Error as exc:
                results = [_map_error(exc, self._auth)] * len(calls)
                commit = False
        if not commit:
            if not conn.get_autocommit():
                self._rollback()
            else:
                self.durability.rolled_back(self)
            self.alarms_dirty = False
        self._report_commit(calls, results)
        self._after_schema_change()

    def _report_commit(self, calls: list[Call], results: list[Result | Error]) -> None:
        wrote, self._wrote = self._wrote, False
        if wrote and self.written is not None:
            self.written.add(self.key)  # a shard move re-copies this file
        self.durability.committed(self, calls, results, wrote)

    def _after_schema_change(self) -> None:
        if self.schema_changed:
            self.schema_changed = False
            if self.capture is not None and not self.broken:
                self.reload_tables()  # the batch may have made or dropped tables

    def _rollback(self) -> None:
        self._internal(_ROLLBACK)
        self.durability.rolled_back(self)

    def _run_transaction(self, calls: list[Call]) -> list[Result | Error]:
        """Run ``calls`` in order; return the results of the leading calls that ran.

        If SQLite rolls back the whole transaction (an interrupted write, a full disk),
        the failing call keeps its error and the calls that had succeeded in that
        transaction run again, then commit on their own: each call runs at most twice.
        """
        conn = self.conn
        assert conn is not None
        results: list[Result | Error] = []
        todo = deque(range(len(calls)))
        in_txn: list[int] = []  # calls whose writes the open transaction holds
        redo = 0  # calls to run again before anything new
        stop_at = _clock() + self.config.statement_timeout_s
        self._internal(_BEGIN)
        try:
            while todo:
                i = todo.popleft()
                try:
                    result = self._run_call(calls[i])
                except _TxnLost as lost:
                    result = lost.error
                    self.durability.rolled_back(self)
                    todo.extendleft(reversed(in_txn))
                    redo, in_txn = len(in_txn), []
                    self._internal(_BEGIN)
                else:
                    in_txn.append(i)
                    if redo:
                        redo -= 1
                        if redo == 0:  # the redone calls commit alone: never redone twice
                            self._commit()
                            in_txn = []
                            self._internal(_BEGIN)
                if i < len(results):
                    results[i] = result
                else:
                    results.append(result)
                if not redo and todo and _clock() > stop_at:
                    break
            self._commit()
        except apsw.Error as exc:
            # COMMIT failed (disk full, I/O error): the calls of that transaction are lost
            if not conn.get_autocommit():
                self._rollback()
            else:
                self.durability.rolled_back(self)
            err = _map_error(exc, self._auth)
            for i in in_txn:
                results[i] = err
        return results

    def _run_call(self, call: Call) -> Result | Error:
        """Run one call inside the batch's transaction; its failure undoes only its writes.

        A Batch operation runs in a savepoint. A single statement needs none: on the
        (rare) failure of a call that wrote, the transaction is rolled back and the other
        calls run again (_TxnLost), which costs less than a savepoint around every write.
        """
        conn = self.conn
        assert conn is not None
        op: Op = call.op  # type: ignore[assignment]
        self._single = single = type(op) in _ONE_STATEMENT
        self._call_wrote = False
        self._readonly = call.readonly
        if not single:
            self._internal(_SAVEPOINT)
        try:
            if call.idem is not None:
                done = self._idem_lookup(call.idem, op)
                if done is not None:
                    result = done
                else:
                    result = self._apply(op)
                    self._idem_record(call.idem, op, result)
            else:
                result = self._apply(op)
        except apsw.Error as exc:
            err: Error = _map_error(exc, self._auth)
        except Error as exc:
            err = exc
        except (KeyError, TypeError, OverflowError, ValueError) as exc:
            err = BadRequest(f"bad parameters: {_describe(exc)}")
        else:
            if not single:
                self._internal(_RELEASE)
            return result
        self._reset_cursor()
        if conn.get_autocommit():  # SQLite rolled back the whole transaction
            raise _TxnLost(err)
        if not single:
            self._internal(_ROLLBACK_TO)
            self._internal(_RELEASE)
        elif self._call_wrote:
            self._internal(_ROLLBACK)  # _run_transaction tells the durability policy
            raise _TxnLost(err)
        return err

    def _idem_lookup(self, key: str, op: Op) -> Result | None:
        idempotency.check_key(key)
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = _NO_DEADLINE
        try:
            return idempotency.lookup(self.conn, key, op)
        finally:
            auth.trusted = False

    def _idem_record(self, key: str, op: Op, result: Result) -> None:
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = _NO_DEADLINE
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
        if type(op) in _KV_OPS:
            return self._apply_kv(op)
        if self.runtime is None:
            raise no_class_error(self.key, op)
        return self.runtime.apply(self, op)  # type: ignore[no-any-return]

    def _exec_sql(self, sql: str, params: Params) -> SqlResult:
        conn = self.conn
        cursor = self._cursor
        assert conn is not None and cursor is not None
        self._stmt_count = 0
        self._deadline = _clock() + self.config.statement_timeout_s
        before = conn.total_changes()
        try:
            cursor.execute(sql, params if params is not None else ())
            rows = _fetch(cursor, self.config.max_result_bytes)
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
        self._deadline = _NO_DEADLINE
        return apply_kv(conn, auth, op, self.config.max_value_bytes)

    def statistics(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "state": self.state.value,
            "mailbox": len(self.mailbox),
            "batches": self.batches,
            "calls": self.calls,
            "wal_pages": self.wal_pages,
        }


_FETCH_CHUNK = 256


def deliver(calls: list[Call], results: list[Result | Error]) -> None:
    """Hand each call its result (the output gate has opened for them)."""
    for call, result in zip(calls, results, strict=True):
        call.sink.deliver(call.tag, result)


def sync_directory(path: str) -> None:
    """fsync a directory, making the names in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no value for named parameter {exc.args[0]!r}"
    return str(exc)
