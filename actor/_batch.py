"""Running tenant SQL in an actor: the group-commit batch and each call in it.

The pool runs :meth:`StatementRunner.run_batch` on the event-loop thread with no
``await`` inside. A batch is one transaction: every call in it runs (a multi-statement
call inside its own SAVEPOINT), the batch commits once, and the replies go to the
durability policy, which releases them when the commit is durable (the output gate).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import apsw

from ._calls import Call, Exclusive, deliver
from ._capture import ReplayError, RowCapture
from ._config import ActorConfig
from ._errors import BadRequest, Error, Internal, Unavailable
from ._filetxn import FileTxn
from ._ops import Op, Result, Sql
from ._sandbox import Authorizer, internal_sql
from ._sqlerrors import map_error as _map_error
from ._statement import (
    ONE_STATEMENT,
    PROGRESS_STEPS,
    Preempted,
    StatementExec,
    clock,
    describe,
)

if TYPE_CHECKING:
    from ._actor import Actor
    from ._durability import DurabilityPolicy

log = logging.getLogger("shardlite.actor")

# Transaction control is internal SQL too: a tenant's "COMMIT" must never hit our cached
# statement, which SQLite would run without asking the authorizer again (BEGIN, COMMIT
# and ROLLBACK of the batch: _filetxn.py).
_SAVEPOINT = internal_sql("SAVEPOINT call")
_RELEASE = internal_sql("RELEASE call")
_ROLLBACK_TO = internal_sql("ROLLBACK TO call")


class _TxnLost(Exception):
    """SQLite rolled back the whole transaction (interrupt, disk full, ...)."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


class StatementRunner(StatementExec, FileTxn):
    """The part of :class:`Actor` that runs tenant SQL: batches and calls (each
    statement: :class:`StatementExec`).

    A mixin: :class:`~shardlite.actor._actor.Actor` owns the connection and the state
    declared below; this class owns the per-statement bookkeeping (``init_runner``).
    """

    # owned by Actor
    key: str
    config: ActorConfig
    durability: DurabilityPolicy
    mailbox: deque[Call]
    conn: apsw.Connection | None
    _auth: Authorizer | None
    _cursor: apsw.Cursor | None
    capture: RowCapture | None
    runtime: Any
    app: Any
    app_ready: bool
    written: set[str] | None
    broken: bool
    batches: int
    calls: int
    wal_pages: int
    schema_changed: bool
    alarms_dirty: bool

    # Actor's own method this uses
    reload_tables: Callable[[], None]

    def init_runner(self) -> None:
        self.init_file_txn()
        self.init_statements()
        self._me = cast("Actor", self)  # what the durability policy is handed
        self._wrote = False
        self.preempted: Call | None = None  # the call (head of the mailbox) to run there

    def _wal_hook(self, conn: apsw.Connection, dbname: str, pages: int) -> int:
        self._wrote = True
        self.wal_pages = pages
        return apsw.SQLITE_OK

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

    def run_slow(self, call: Call) -> Result | Error:
        """Run a preempted read-only call to its end. Blocking: the pool's slow lane runs
        it in a worker thread (SQLite releases the GIL while it steps).

        No transaction (a read needs none), nothing to commit; :meth:`finish_slow`, back
        on the event loop, sends the reply through the output gate.
        """
        conn = self.conn
        assert conn is not None
        self.in_slow_lane = True
        # no progress handler: each call would take the GIL from the event loop's thread;
        # the pool's watchdog checks over_budget() from the loop and interrupts instead
        conn.set_progress_handler(None)
        try:
            return self._run_call(call, False)
        except _TxnLost as lost:  # in autocommit mode every failure looks like one
            return lost.error
        finally:
            conn.set_progress_handler(self._progress, PROGRESS_STEPS)
            self.in_slow_lane = False

    def finish_slow(self, call: Call, result: Result | Error) -> None:
        """The slow lane's call is done: its reply goes out once earlier writes are durable."""
        self.batches += 1
        self.calls += 1
        self._report_commit([call], [result])

    def _commit(self) -> None:
        last = self.last_lsn
        self.durability.before_commit(self._me)  # durability=log: the batch's LSN and record
        wrote = self.last_lsn != last
        if wrote and self.defer_commits:
            self._wrote = True  # no WAL hook until the file commits
        try:
            self.txn_end(wrote)
        except apsw.Error:
            self.durability.commit_failed(self._me)
            raise

    def run_own_transaction(self, fn: Callable[[], None]) -> Error | None:
        """Run ``fn`` (a migration) in a transaction of its own, committed through the
        durability policy like a batch without replies; its error, if it failed."""
        conn = self.conn
        assert conn is not None
        self._readonly = self._preemptible = False
        self.txn_begin()
        try:
            fn()
            self._commit()
        except (Error, apsw.Error) as exc:
            if not conn.get_autocommit():
                self._rollback()
            else:
                self.durability.rolled_back(self._me)
            self.schema_changed = False
            self.alarms_dirty = False
            return exc if isinstance(exc, Error) else _map_error(exc, self._auth)
        self._report_commit([], [])
        self._after_schema_change()
        return None

    def begin_exclusive(self) -> None:
        """Open the transaction of an exclusive call (an async method)."""
        self.batches += 1
        self._readonly = self._preemptible = False
        self.txn_begin()

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
                self.durability.rolled_back(self._me)
            self.alarms_dirty = False
        self._report_commit(calls, results)
        self._after_schema_change()

    def _report_commit(self, calls: list[Call], results: list[Result | Error]) -> None:
        wrote, self._wrote = self._wrote, False
        if wrote and self.written is not None:
            self.written.add(self.key)  # a shard move re-copies this file
        self.durability.committed(self._me, calls, results, wrote)

    def _after_schema_change(self) -> None:
        if self.schema_changed:
            self.schema_changed = False
            if self.capture is not None and not self.broken:
                self.reload_tables()  # the batch may have made or dropped tables

    def _rollback(self) -> None:
        self.txn_abort()
        self.durability.rolled_back(self._me)

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
        stop_at = clock() + self.config.statement_timeout_s
        preempt = self.config.inline_slice_s > 0
        try:
            self.txn_begin()
        except (apsw.Error, ReplayError) as exc:
            # not a bug: with the file's transaction rolled back by SQLite, its kept
            # batches could not be applied again (_filetxn.py), or no transaction could
            # start. Reset the actor: its close leaves what the file lacks to the log.
            log.error("actor %r: cannot start a transaction (%s); resetting it", self.key, exc)
            if not conn.get_autocommit():
                self._rollback()
            self.broken = True
            return [Unavailable(f"the actor could not start a transaction ({exc})")] * len(calls)
        try:
            while todo:
                i = todo.popleft()
                try:
                    result = self._run_call(calls[i], preempt and not redo)
                except Preempted:
                    if not conn.get_autocommit():
                        self.preempted = calls[i]  # the pool runs it in the slow lane
                        break
                    # (not expected of a read) SQLite rolled the transaction back: run
                    # its calls again, then this one, inline to its end
                    self.durability.rolled_back(self._me)
                    todo.appendleft(i)
                    todo.extendleft(reversed(in_txn))
                    redo, in_txn, preempt = len(in_txn), [], False
                    self.txn_begin()
                    continue
                except _TxnLost as lost:
                    result = lost.error
                    self.durability.rolled_back(self._me)
                    todo.extendleft(reversed(in_txn))
                    redo, in_txn = len(in_txn), []
                    self.txn_begin()
                else:
                    in_txn.append(i)
                    if redo:
                        redo -= 1
                        if redo == 0:  # the redone calls commit alone: never redone twice
                            self._commit()
                            in_txn = []
                            self.txn_begin()
                if i < len(results):
                    results[i] = result
                else:
                    results.append(result)
                if not redo and todo and clock() > stop_at:
                    break
            self._commit()
        except apsw.Error as exc:
            # COMMIT failed (disk full, I/O error): the calls of that transaction are lost
            if not conn.get_autocommit():
                self._rollback()
            else:
                self.durability.rolled_back(self._me)
            err = _map_error(exc, self._auth)
            for i in in_txn:
                results[i] = err
        return results

    def _run_call(self, call: Call, preempt: bool) -> Result | Error:
        """Run one call inside the batch's transaction; its failure undoes only its writes.

        A Batch operation runs in a savepoint. A single statement needs none: on the
        (rare) failure of a call that wrote, the transaction is rolled back and the other
        calls run again (_TxnLost), which costs less than a savepoint around every write.
        """
        conn = self.conn
        assert conn is not None
        op: Op = call.op  # type: ignore[assignment]
        self._single = single = type(op) in ONE_STATEMENT
        self._call_wrote = False
        self._readonly = call.readonly
        # a lone read may leave the loop for the slow lane: nothing of it is written yet
        self._preemptible = preempt and type(op) is Sql and call.idem is None
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
            err = BadRequest(f"bad parameters: {describe(exc)}")
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
            self.txn_abort()  # _run_transaction tells the durability policy
            raise _TxnLost(err)
        return err
