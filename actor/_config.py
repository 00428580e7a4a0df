"""Per-process actor configuration: one frozen object, defaults as named constants."""

from __future__ import annotations

import enum

import msgspec

DEFAULT_STATEMENT_TIMEOUT_S = 0.5
DEFAULT_INLINE_SLICE_S = 0.01
DEFAULT_MAX_TEMP_BYTES = 256 << 20
DEFAULT_MAILBOX_SIZE = 1024
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_OPEN_ACTORS = 10_000
DEFAULT_IDLE_TIMEOUT_S = 60.0
ACTOR_VFS = "unix-none"
"""SQLite's unix VFS without file locks, for actor files. Each file has exactly one
connection (the actor's, ``locking_mode=EXCLUSIVE``) and one process serves a data
directory (``DATA/.lock``), so the locks would guard nothing; and the default ``unix``
VFS keeps every locked file in one linked list that each open walks: at 10,000 open
actors that made a reopen cost milliseconds (py-spy: 40-60% of the loop in
``apsw.Connection()``; docs/benchmarks.md "loadtest" has the 10,000-key suite). The
price: another program must never open
a live actor file (use ``shardlite shell`` or ``GET .../export``)."""
DEFAULT_MAX_DB_BYTES = 1 << 30
DEFAULT_MAX_VALUE_BYTES = 2 << 20
DEFAULT_MAX_SQL_BYTES = 100_000
DEFAULT_MAX_RESULT_BYTES = 16 << 20
DEFAULT_CHECKPOINT_WAL_BYTES = 4 << 20
DEFAULT_PAGE_SIZE = 4096
PAGE_SIZES = tuple(1 << n for n in range(9, 17))
"""What SQLite accepts: powers of two from 512 to 65,536."""
DEFAULT_FSYNC_THREADS = 4
DEFAULT_LOG_SEGMENT_BYTES = 16 << 20
DEFAULT_LOG_TRIM_BYTES = 64 << 20
DEFAULT_LOG_CHECKPOINT_INTERVAL_S = 30.0
DEFAULT_LOG_BATCHES_PER_COMMIT = 64
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600.0
DEFAULT_CALL_TIMEOUT_S = 30.0


class Durability(enum.Enum):
    """When a write is acknowledged (see the actor folder's DESIGN.md)."""

    LOG = "log"
    """After the shard log holding the write is fdatasync'ed: survives power loss, and one
    flush covers many keys' writes."""
    OS = "os"
    """After COMMIT (synchronous=NORMAL): survives a crash of the process, not of the machine."""
    FSYNC = "fsync"
    """After the actor's WAL is fdatasync'ed (off the event loop): survives power loss."""


class ActorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How every actor of a process behaves. Immutable; build a new one to change it."""

    durability: Durability = Durability.LOG
    statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S
    inline_slice_s: float = DEFAULT_INLINE_SLICE_S
    """A read-only statement still running after this long on the event loop moves to
    the slow lane (a worker thread); 0: never (reads hold the loop up to their budget)."""
    max_temp_bytes: int = DEFAULT_MAX_TEMP_BYTES
    """Temporary storage (sorts, subqueries; in memory) one statement may use."""
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    max_batch: int = DEFAULT_MAX_BATCH
    max_open_actors: int = DEFAULT_MAX_OPEN_ACTORS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_db_bytes: int = DEFAULT_MAX_DB_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_sql_bytes: int = DEFAULT_MAX_SQL_BYTES
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    checkpoint_wal_bytes: int = DEFAULT_CHECKPOINT_WAL_BYTES
    page_size: int = DEFAULT_PAGE_SIZE
    """SQLite page size of new actor files (an existing file keeps its own)."""
    fsync_threads: int = DEFAULT_FSYNC_THREADS
    log_segment_bytes: int = DEFAULT_LOG_SEGMENT_BYTES
    log_init_zero: bool = True
    """Zero-fill each log segment before use, so flushes overwrite blocks in place."""
    log_trim_bytes: int = DEFAULT_LOG_TRIM_BYTES
    """Past this many bytes of log the shard's actor files are synced and the log trimmed."""
    log_checkpoint_interval_s: float = DEFAULT_LOG_CHECKPOINT_INTERVAL_S
    """The log is trimmed at least this often, however small it is."""
    log_batches_per_commit: int = DEFAULT_LOG_BATCHES_PER_COMMIT
    """durability=log: batches an actor file's transaction holds before it commits (1:
    each batch commits; more: see _filetxn.py). The log's checkpoints commit it too."""
    idempotency_ttl_s: float = DEFAULT_IDEMPOTENCY_TTL_S
    """How long an idempotency key's result is kept for retries."""
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    """How long an async method (or async alarm handler) may hold its actor."""
    vfs: str | None = None
    """Name of a registered apsw VFS to open actor files with (fault-injection tests);
    None: ``ACTOR_VFS``."""
