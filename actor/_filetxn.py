"""The actor file's transaction, held open across batches (``durability=log``).

With ``log_batches_per_commit`` > 1, a log-mode actor does not COMMIT its file after
every batch: the shard log already makes each batch durable (its record, fdatasync'ed
with every other key's), so the file only needs the batches before the log is trimmed
past them. The file's transaction stays open; each batch runs in a savepoint inside it
(``SAVEPOINT batch`` ... ``RELEASE batch``, ``ROLLBACK TO batch`` on failure), and the
file commits, with the LSN of its last batch in the ``_shardlite_lsn`` row, once every
``log_batches_per_commit`` batches, before anything else uses the file (an exclusive
call, a checkpoint, a close, an export) and on every pass of the shard log's
checkpointer. A write costs no WAL append, no second page (the LSN row) and no commit
of its own; a hot key's batches share one.

Nothing changes for the output gate: a reply still waits for the log flush covering
its record. Recovery is unchanged: the file's LSN row names the last batch it holds,
and the records after it are in the log (trimmed only past what files hold durably).

If SQLite rolls the whole transaction back (an interrupted write, ``OR ROLLBACK``, a
full disk: see "Response To Errors Within A Transaction"), the earlier batches go with
it. Their records are kept (``txn_records``) until the file commits, and the next
transaction starts by applying them again (as recovery would: row images, triggers and
foreign-key checks off) before the next batch runs. If even that fails (the disk is
still full), the batches that need the file wait: the actor is not closed with records
its file lacks (see ``unapplied`` in the log policy); the shard log holds them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import apsw

from ._capture import apply_record
from ._sandbox import internal_sql

if TYPE_CHECKING:
    from ._actor import Actor
    from ._config import ActorConfig
    from ._durability import DurabilityPolicy

log = logging.getLogger("shardlite.actor")

BEGIN = internal_sql("BEGIN")
COMMIT = internal_sql("COMMIT")
ROLLBACK = internal_sql("ROLLBACK")
_SP_BEGIN = internal_sql("SAVEPOINT batch")
_SP_RELEASE = internal_sql("RELEASE batch")
_SP_ROLLBACK = internal_sql("ROLLBACK TO batch")
_DEFER_FK = internal_sql("PRAGMA defer_foreign_keys = ON")


class FileTxn:
    """A mixin of the actor (StatementRunner): how a batch's transaction begins and ends."""

    key: str
    config: ActorConfig
    conn: apsw.Connection | None
    _auth: Any
    capture: Any
    last_lsn: int
    needs_file_sync: bool
    _wrote: bool
    durability: DurabilityPolicy
    _me: Actor

    # StatementRunner's, used here
    def _internal(self, sql: str) -> None: ...  # pragma: no cover
    def write_lsn(self, lsn: int) -> None: ...  # pragma: no cover

    def init_file_txn(self) -> None:
        self.defer_commits = False
        """Set by the log policy at open: batches share the file's transaction."""
        self.txn_open = False
        """The file's transaction is held open (it may hold batches the file lacks)."""
        self._batch_open = False  # a batch's savepoint is open inside it
        self.txn_batches = 0
        self.txn_records: list[tuple[int, bytes]] = []
        """(LSN, record) of every batch the open transaction holds and the file lacks."""
        self.committed_lsn = 0
        """The LSN the file's last COMMIT holds (the log policy's syncs use it)."""

    # ------------------------------------------------------------------ the batch's transaction

    def txn_begin(self) -> None:
        """Start a batch's transaction (a savepoint inside the file's, when deferring)."""
        if not self.defer_commits:
            self._internal(BEGIN)
            return
        conn = self.conn
        assert conn is not None
        if conn.get_autocommit():
            self._batch_open = False
            self._internal(BEGIN)
            if self.txn_records:  # SQLite rolled the file's transaction back: redo it
                self._reapply()
            self.txn_open = True
        self._internal(_SP_BEGIN)
        self._batch_open = True

    def txn_end(self, wrote: bool) -> None:
        """The batch succeeded (its record, if it ``wrote``, is taken): make it part of
        the file's state. Only batches that wrote count towards the file's commit."""
        if not self.defer_commits:
            self._internal(COMMIT)
            return
        conn = self.conn
        assert conn is not None
        if self._batch_open:
            self._batch_open = False
            self._internal(_SP_RELEASE)
        self.txn_batches += wrote
        if self.needs_file_sync:
            # unlogged (a schema change): its changes are in no record, so the file must
            # hold it before its reply, and a failure must undo it with the transaction
            try:
                self.commit_file()
            except apsw.Error:
                if not conn.get_autocommit():
                    self._internal(ROLLBACK)  # the kept records go back at the next begin
                raise
        elif self.txn_batches >= self.config.log_batches_per_commit:
            try:
                self.commit_file()
            except apsw.Error as exc:  # the records stay kept: the next commit tries again
                log.warning(
                    "actor %r: file commit failed (%s); kept for the next one", self.key, exc
                )
                self.durability.file_commit_failed(self._me)

    def txn_abort(self) -> None:
        """Undo the running batch (only it, when deferring)."""
        conn = self.conn
        assert conn is not None
        if not self.defer_commits:
            self._internal(ROLLBACK)
            return
        if self._batch_open:
            self._batch_open = False
            if not conn.get_autocommit():
                self._internal(_SP_ROLLBACK)
                self._internal(_SP_RELEASE)

    def take_back_record(self, lsn: int) -> None:
        """The batch of ``lsn`` failed after its record was kept: forget the record."""
        if self.txn_records and self.txn_records[-1][0] == lsn:
            self.txn_records.pop()

    # ------------------------------------------------------------------ the file's commit

    def commit_file(self) -> None:
        """COMMIT the file's open transaction, the LSN of its last batch with it. Inline
        or in a worker thread (whoever holds the actor). Raises apsw.Error on failure:
        the records stay kept (and go back in first if SQLite dropped the transaction)."""
        conn = self.conn
        if not self.txn_open or conn is None:
            return
        if conn.get_autocommit():  # SQLite rolled it back: put the kept batches back first
            self._batch_open = False
            self._internal(BEGIN)
            self._reapply()
        assert not self._batch_open, "the file commits between batches only"
        wrote = self._wrote  # the WAL hook reports this commit: it is no batch's write
        try:
            if self.last_lsn != self.committed_lsn:  # else only reads: nothing to write
                self.write_lsn(self.last_lsn)
            self._internal(COMMIT)
        finally:
            self._wrote = wrote
        self.txn_open = False
        self.txn_batches = 0
        self.txn_records.clear()
        self.committed_lsn = self.last_lsn
        self.durability.file_committed(self._me)  # write-back for the next syncfs

    def _reapply(self) -> None:
        """Inside a new transaction: apply the kept records again (as recovery does)."""
        conn, capture = self.conn, self.capture
        assert conn is not None and capture is not None
        auth = self._auth
        assert auth is not None
        log.warning(
            "actor %r: its file's transaction was rolled back; applying its %d kept batches again",
            self.key,
            len(self.txn_records),
        )
        auth.trusted = True
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 0)
        try:
            conn.execute(_DEFER_FK)
            for _, record in self.txn_records:
                apply_record(conn, capture.tables, record)
            self.durability.reapplied(self._me, len(self.txn_records))
        except BaseException:
            if not conn.get_autocommit():
                conn.execute(ROLLBACK)
            raise
        finally:
            conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
            auth.trusted = False
            capture.reset()  # the preupdate hook saw these rows: no batch's record


__all__ = ["BEGIN", "COMMIT", "ROLLBACK", "FileTxn"]
