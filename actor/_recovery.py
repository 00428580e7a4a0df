"""Recovery of a shard from its log: replaying into the actor files what they lack.

Runs key by key while a shard serves (``LogDurability``: before a key's actor is
opened, and for every key in the background), all at once when a shard that will not use
its log drains it (durability os or fsync), and for the records shipped with a moved
shard (``shards/_shardfiles.py``). See docs/shardlog.md, "Applying records".
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Callable

import apsw

from ._actor import sync_directory
from ._capture import ReplayError, apply_record, load_tables
from ._config import ActorConfig
from ._connection import DAMAGED_SUFFIX, LSN_GET, LSN_SET, open_actor_db
from ._errors import ActorDamaged, Error
from ._keys import resolve_actor_path
from ._shardlog import LOG_DIR, LogCorrupt, Record, Recovered, ShardLog

log = logging.getLogger("shardlite.actor")


class RecoveryFailed(LogCorrupt):
    """An actor file could not be read or written during recovery (an I/O error, a full
    disk): its key is not served until a later try succeeds."""


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()
HAVE_SYNCFS = _syncfs is not None


def syncfs(directory: str) -> None:
    """syncfs(2) on the file system holding ``directory``: every file's written data and
    metadata there reach the disk, with one flush. Blocking."""
    assert _syncfs is not None
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({directory}): {os.strerror(err)}")
    finally:
        os.close(fd)


def drain_shard_log(directory: str, config: ActorConfig) -> dict[str, float | None]:
    """For a shard that will not use its log (durability os/fsync): replay what it holds
    into the actor files, then delete its segments (the epoch file stays: LSNs must keep
    growing if the shard goes back to durability=log). Blocking."""
    log_dir = os.path.join(directory, LOG_DIR)
    if not os.path.isdir(log_dir):
        return {}
    shard_log = ShardLog(log_dir, config.log_segment_bytes)
    recovered = shard_log.open()
    try:
        _, alarms, _ = replay_shard(directory, recovered, config)
        shard_log.trim(shard_log.next_lsn())
    finally:
        shard_log.close()
    return alarms


def replay_shard(
    directory: str, recovered: Recovered, config: ActorConfig
) -> tuple[int, dict[str, float | None], list[str]]:
    """Bring every actor file of the shard up to the log at once (:func:`replay_key` for
    each key with records, then one syncfs). Blocking. For a shard that will not use its
    log (:func:`drain_shard_log`); a shard that does recovers key by key while it serves
    (``LogDurability``, see docs/shardlog.md, "Applying records").

    Returns how many files were brought up to date, the next alarm time of every file
    opened that has an alarms table (the alarm index may have missed those), and the keys
    found damaged (marked now or before). Raises :class:`RecoveryFailed` (I/O, a full
    disk): recovery runs again when the shard is next attached."""
    replayed = 0
    damaged: list[str] = []
    alarms: dict[str, float | None] = {}
    one_sync = one_syncfs(config)
    for key, records in recovered.records.items():
        try:
            replayed += replay_key(directory, key, records, config, alarms)
        except ActorDamaged:
            damaged.append(key)
    if one_sync and recovered.records:
        syncfs(directory)
    return replayed, alarms, damaged


def one_syncfs(config: ActorConfig) -> bool:
    """Whether files brought up to the log keep their WALs unsynced, for one syncfs(2) to
    make them all durable afterwards (else each checkpoints as it closes: on a VFS of
    its own, the power-cut tests', or without syncfs)."""
    return HAVE_SYNCFS and config.vfs is None


def replay_key(
    directory: str,
    key: str,
    records: list[Record],
    config: ActorConfig,
    alarms: dict[str, float | None],
) -> int:
    """Bring ``key``'s actor file up to its records in the shard log; 1 if it lacked
    any. Blocking.

    Opens the file (a missing file was deleted: its records are moot), applies the
    records past the LSN it holds in one transaction, with triggers and foreign keys off
    (the records hold their effects) and DEFENSIVE off (the records may write FTS5
    shadow tables), and closes it: keeping its WAL unsynced where :func:`one_syncfs`
    (the caller syncs the file system before the records may be dropped; after a kill -9,
    a checkpoint of each of thousands of files took two fsyncs apiece), else
    checkpointed. The next alarm of a file with an alarms table goes into ``alarms``.

    A key whose records stop following its file, or do not apply to it, is marked
    damaged (:func:`replay_file`) and raises :class:`ActorDamaged`: that key is not
    served, the others are. An error that is not the file's or the log's content (I/O, a
    full disk) raises :class:`RecoveryFailed`: nothing is marked, and the records must
    be applied again later."""
    try:
        path = resolve_actor_path(directory, key)
    except Error:
        log.error("shard log %s: record for an invalid key %r skipped", directory, key)
        return 0
    if not os.path.exists(path):
        return 0
    try:
        return replay_file(path, key, records, config, alarms, checkpoint=not one_syncfs(config))
    except ActorDamaged as exc:  # marked by an earlier recovery, or just now
        log.error("shard log %s: %s", directory, exc.message)
        raise
    except Error as exc:  # a file of another key, say: no open of it will serve it
        log.error("shard log %s: actor %r not recovered: %s", directory, key, exc)
        return 0
    except (apsw.Error, OSError) as exc:
        raise RecoveryFailed(
            f"actor {key!r} could not be brought up to the shard log ({exc}); it is not "
            "served until that succeeds (it is tried again)"
        ) from exc


def mark_damaged(path: str, reason: str) -> None:
    """Keep the actor file at ``path`` from being served, saying why: durable on return."""
    marker = path + DAMAGED_SUFFIX
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        f.write(reason + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    sync_directory(os.path.dirname(path))


def _remedy(path: str) -> str:
    return (
        "Restore the actor from a backup (shardlite ops restore KEY --from DIR), or, to "
        "serve what its file holds and lose the writes it lacks, delete "
        f"{path}{DAMAGED_SUFFIX}"
    )


def _broken_chain(path: str, held: int, record: Record) -> str:
    return (
        f"its file holds its writes up to LSN {held:#x}, but its "
        f"next record in the shard log, {record.lsn:#x} in {os.path.basename(record.segment)}, "
        f"was written after {record.prev:#x}: acknowledged writes between are in neither (a "
        "log segment was lost, or the file was put back from an older copy), and the "
        "records after the hole were not applied. " + _remedy(path)
    )


def _linked(records: list[Record], held: int) -> tuple[list[Record], Record | None]:
    """Of a key's records past the LSN its file holds: those that apply on top of it, one
    after the other, and the first that does not (its ``prev`` is not what the file holds
    by then). A record without ``prev`` (format version 1, or shipped) is not checked."""
    for i, record in enumerate(records):
        if record.prev is not None and record.prev != held:
            return records[:i], record
        held = record.lsn
    return records, None


def replay_file(
    path: str,
    key: str,
    records: list[Record],
    config: ActorConfig,
    alarms: dict[str, float | None],
    *,
    checkpoint: bool = True,
    mark: bool = True,
) -> int:
    """Apply to the file the records past the LSN it holds; 1 if there were any.

    ``checkpoint``: the close checkpoints the file (durable on return). Without, the
    close keeps the WAL as it is, and the caller must sync the file system before the
    records may be dropped.

    A key whose records stop following its file (a record's ``prev`` is not the LSN the
    file holds by then) gets the records before the hole: applied past it, they would
    build a state that never existed. A record that does not apply rolls all of them
    back. Either way the file is marked damaged (``mark_damaged``, durable first), its
    LSN is moved past every record of the key (so that no later recovery finds the hole
    again, and the key's next writes follow its file), and :class:`ActorDamaged` is
    raised. Without ``prev`` (format version 1, shipped records) nothing is checked.
    Without ``mark`` (a move's copy, which is then copied whole instead) the error is
    raised as it is, and nothing is marked."""
    try:
        conn, auth = open_actor_db(path, key, config, create=False)
    except _CONTENT_ERRORS as exc:
        if not mark:
            raise
        reason = f"its file is damaged ({exc}). {_remedy(path)}"
        mark_damaged(path, reason)
        raise ActorDamaged(f"actor {key!r} is not served: {reason}") from exc
    if not checkpoint:
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    try:
        auth.trusted = True
        reason = ""
        try:
            file_lsn = int(conn.execute(LSN_GET).fetchall()[0][0])  # type: ignore[arg-type]
            todo, unlinked = _linked([r for r in records if r.lsn > file_lsn], file_lsn)
            if unlinked is not None:  # marked before anything moves the file's LSN
                held = todo[-1].lsn if todo else file_lsn
                reason = _broken_chain(path, held, unlinked)
                if not mark:
                    raise ReplayError(reason)
                mark_damaged(path, reason)
            if todo:
                _apply(conn, todo, file_lsn)
        except _CONTENT_ERRORS as exc:
            if not mark:
                raise
            reason = str(exc) if isinstance(exc, ReplayError) else f"its file is damaged ({exc})"
            reason = f"{reason}. {_remedy(path)}"
            mark_damaged(path, reason)
        if reason:
            with contextlib.suppress(*_CONTENT_ERRORS), conn:  # (a damaged file may refuse)
                conn.execute(LSN_SET, (records[-1].lsn,))  # its records are behind it now
        if checkpoint:
            try:
                conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            except _CONTENT_ERRORS as exc:  # what it applied may not be durable: not served
                if not mark:
                    raise
                if not reason:
                    reason = f"its file is damaged ({exc}). {_remedy(path)}"
                    mark_damaged(path, reason)
        try:
            _note_alarms(conn, key, alarms)
        except _CONTENT_ERRORS as exc:  # its alarms may not fire; its rows are whole
            log.error("actor %r: its alarms could not be read (%s)", key, exc)
        if reason:
            raise ActorDamaged(f"actor {key!r} is not served: {reason}")
        return 1 if todo else 0
    finally:
        conn.close()


_CONTENT_ERRORS = (
    ReplayError,
    apsw.ConstraintError,
    apsw.CorruptError,
    apsw.NotADBError,
    apsw.SQLError,
    apsw.MismatchError,
)
"""What the file's or the log's content causes (damage), unlike I/O errors or a full disk."""


def _apply(conn: apsw.Connection, todo: list[Record], file_lsn: int) -> None:
    """Apply ``todo`` in one transaction (all or none) and store the last one's LSN."""
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 0)
    conn.pragma("foreign_keys", False)
    tables = load_tables(conn)
    with conn:
        for record in todo:
            try:
                apply_record(conn, tables, record.payload)
            except _CONTENT_ERRORS as exc:
                raise ReplayError(
                    f"its log record {record.lsn:#x} does not apply to its file ({exc}): the "
                    f"file or the log is damaged; none of its records past {file_lsn:#x} "
                    "were applied"
                ) from exc
        conn.execute(LSN_SET, (todo[-1].lsn,))


def _note_alarms(conn: apsw.Connection, key: str, into: dict[str, float | None]) -> None:
    if conn.table_exists("main", "_shardlite_alarms"):
        at = conn.execute("SELECT min(at) FROM _shardlite_alarms").fetchall()[0][0]
        into[key] = None if at is None else float(at)


__all__ = [
    "HAVE_SYNCFS",
    "RecoveryFailed",
    "drain_shard_log",
    "one_syncfs",
    "replay_file",
    "replay_key",
    "replay_shard",
    "syncfs",
]
