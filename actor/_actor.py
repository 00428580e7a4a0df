"""The actor: the one owner of one SQLite file, its lifecycle and its hooks.

An actor is not a task. It is a serialized executor: callers append :class:`Call` s to
its mailbox and the pool runs :meth:`Actor.run_batch` (``_batch.py``) on the event-loop
thread, with no ``await`` inside, so two batches of one actor never interleave and no
lock is needed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import apsw
import trio

from ._batch import StatementRunner
from ._calls import Call, Exclusive, Replies, Sink, State, deliver
from ._capture import RowCapture, load_tables
from ._config import ActorConfig
from ._connection import LSN_GET, LSN_NUDGE, LSN_SET, open_actor_db
from ._errors import Error
from ._ops import Result
from ._sandbox import Authorizer
from ._statement import NO_DEADLINE, PROGRESS_STEPS

if TYPE_CHECKING:
    from ._durability import DurabilityPolicy

log = logging.getLogger("shardlite.actor")

WAL_REUSE_WITHIN_S = 60.0
"""An actor's WAL that reached ``checkpoint_wal_bytes`` within this long is reused after
its checkpoint, one that took longer is truncated (Actor.checkpoint_blocking)."""

__all__ = ["Actor", "Call", "Exclusive", "Replies", "Sink", "State", "deliver", "sync_directory"]


class Actor(StatementRunner):
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
        self.init_runner()
        self.wal_pages = 0
        self.page_size = config.page_size  # the file's own, once opened
        self.wal_since = 0.0  # time.monotonic() when the WAL last started empty
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
        self.closed_unsynced = False
        """Closed by :meth:`close_quick`: its last writes may be in an unsynced WAL."""
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
        self._auth = auth
        auth.trusted = True
        try:  # the WAL's checkpoint threshold counts its pages
            self.page_size = int(conn.pragma("page_size"))
        finally:
            auth.trusted = False
        if new_file:
            # a new file must survive a power cut whole, name and first transaction
            # (its tables, its key, its starting LSN) included
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            fanout = os.path.dirname(self.path)
            sync_directory(fanout)
            sync_directory(os.path.dirname(fanout))
            self._start_wal(conn)  # in the creating worker thread, not the first batch
        self.conn = conn
        self.wal_since = time.monotonic()
        self.closed_unsynced = False
        conn.set_progress_handler(self._progress, PROGRESS_STEPS)
        conn.set_wal_hook(self._wal_hook)
        cursor = conn.cursor()
        cursor.exec_trace = self._exec_trace
        self._cursor = cursor
        # the WAL may be new (only an eviction leaves one behind): sync its directory entry
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
        self._deadline = NO_DEADLINE
        try:
            return capture.take(conn)
        finally:
            auth.trusted = False

    def write_lsn(self, lsn: int) -> None:
        """Record in the file, inside the open transaction, the log position it reaches."""
        auth = self._auth
        assert self.conn is not None and auth is not None
        auth.trusted = True
        self._deadline = NO_DEADLINE
        try:
            self.conn.execute(LSN_SET, (lsn,))
        finally:
            auth.trusted = False

    @property
    def file_lsn_held(self) -> int:
        """The LSN the file holds once synced: its last commit's (see _filetxn.py)."""
        return self.committed_lsn if self.txn_open else self.last_lsn

    @property
    def busy(self) -> bool:
        return self.state is State.BUSY

    def close(self) -> None:
        """Close the file. Run :meth:`checkpoint_before_close` first, in a worker thread.

        apsw holds the GIL through ``close()``, which checkpoints whatever the WAL still
        holds: in a worker thread that stalls the event loop anyway, and the loop thread
        then waits up to a GIL switch interval (5 ms) after each SQLite call that
        released it. After a checkpoint the close itself is quick: run it inline.
        """
        if self.txn_open and conn_has_unapplied(self):
            self.durability.unapplied(self)  # the log keeps them; not reopened before a restart
        self.txn_open, self._batch_open, self.txn_batches = False, False, 0
        self.txn_records = []
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

    def close_quick(self) -> None:
        """Close without a checkpoint or a sync: an eviction of a file whose WAL is short
        (ActorPool._evict). Inline, about as quick as an open.

        An open file transaction commits first. The WAL stays beside the file as it is,
        not synced, and the reopened actor appends to it (its first commit then syncs
        nothing either). Whatever must still make those writes durable knows from
        ``closed_unsynced``: durability=log keeps its records until the checkpointer's
        next syncfs; with ``fsync`` every batch already synced its WAL. Raises
        apsw.Error if the commit fails; the file is then still open.
        """
        conn = self.conn
        assert conn is not None
        self.commit_file()
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        self.close()
        self.closed_unsynced = True

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
        """Copy the WAL into the database, then start the next WAL (:meth:`_start_wal`).
        Blocking: worker thread.

        A WAL that filled within ``WAL_REUSE_WITHIN_S`` restarts at the start of the
        same file (RESTART): the next frames overwrite its blocks and page-cache pages,
        which are still resident, where a truncated WAL frees them and every append
        takes a new page (allocated, zeroed, a new block, the size in the inode): a
        commit into a reused WAL costs about a quarter less. A WAL that filled slowly
        is truncated: its pages may have left the page cache, and overwriting part of
        a page that is not cached reads it first, on the event loop.
        ``journal_size_limit`` (open_actor_db) trims a reused WAL that a large batch
        grew past twice the checkpoint size.
        """
        conn = self.conn
        if conn is not None:
            self.commit_file()
            now = time.monotonic()
            reuse = now - self.wal_since < WAL_REUSE_WITHIN_S
            conn.wal_checkpoint(
                mode=apsw.SQLITE_CHECKPOINT_RESTART if reuse else apsw.SQLITE_CHECKPOINT_TRUNCATE
            )
            self.wal_since = now
            self.wal_pages = 0
            self._start_wal(conn)

    def checkpoint_before_close(self, keep_wal: bool = False) -> None:
        """Copy the WAL into the database and truncate it, for a close that follows.
        Worker thread.

        ``keep_wal`` (an eviction, which the LRU is likely to reopen soon): also start the
        next WAL, and have the close leave it in place (no checkpoint on close), so the
        reopened file's first commit appends to it. Without, the close deletes the empty
        WAL and leaves the bare file.
        """
        conn = self.conn
        if conn is None:
            return
        self.commit_file()
        conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        self.wal_pages = 0
        if keep_wal and self._start_wal(conn):
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)

    def _start_wal(self, conn: apsw.Connection) -> bool:
        """Start the empty WAL with a write that changes nothing; whether it did.

        The first commit into an empty WAL writes its header and fdatasyncs it (and, for
        a new WAL file, its directory), even with synchronous=NORMAL. Done here, in the
        checkpoint's worker thread, that sync no longer falls on the actor's next batch,
        on the event loop (about 1 ms on an idle disk, far longer under the log
        checkpointer's syncfs).
        """
        auth = self._auth
        assert auth is not None
        auth.trusted = True
        self._deadline = NO_DEADLINE
        try:
            with conn:
                conn.execute(LSN_NUDGE, (1,))
                conn.execute(LSN_NUDGE, (-1,))
        except apsw.Error as exc:  # then the next batch syncs the header itself
            log.warning("actor %r: cannot start the WAL after a checkpoint: %s", self.key, exc)
            return False
        finally:
            auth.trusted = False
            self._wrote = False  # the WAL hook saw this write: it is no tenant's
        return True

    def export_blocking(self, dest: str) -> None:
        """Write a consistent copy of the file to ``dest`` (backup API). Worker thread."""
        assert self.conn is not None
        self.commit_file()
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

    def statistics(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "state": self.state.value,
            "mailbox": len(self.mailbox),
            "batches": self.batches,
            "calls": self.calls,
            "wal_pages": self.wal_pages,
        }


def conn_has_unapplied(actor: Actor) -> bool:
    """Whether the actor's open transaction holds batches its file has not committed."""
    return actor.last_lsn > actor.committed_lsn


def sync_directory(path: str) -> None:
    """fsync a directory, making the names in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
