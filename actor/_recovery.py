"""Recovery of a shard from its log: replaying into the actor files what they lack.

Runs before a shard serves (``LogDurability.attach_shard``), when a shard that will not
use its log drains it (durability os or fsync), and for the records shipped with a
moved shard (``shards/_shardfiles.py``). See docs/shardlog.md, "Applying records".
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

import apsw

from ._capture import ReplayError, apply_record, load_tables
from ._config import ActorConfig
from ._connection import LSN_GET, LSN_SET, open_actor_db
from ._errors import Error
from ._keys import resolve_actor_path
from ._shardlog import LOG_DIR, LogDamaged, Record, Recovered, ShardLog

log = logging.getLogger("shardlite.actor")


class BrokenChain(LogDamaged):
    """A key's next record in the log does not follow what its actor file holds: the
    key's writes in between are in neither."""

    def __init__(self, key: str, held: int, record: Record) -> None:
        super().__init__(f"actor {key!r}: record {record.lsn:#x} does not follow its file")
        self.key = key
        self.held = held
        self.record = record


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
        _, alarms = replay_shard(directory, recovered, config)
        shard_log.trim(shard_log.next_lsn())
    finally:
        shard_log.close()
    return alarms


def replay_shard(
    directory: str, recovered: Recovered, config: ActorConfig
) -> tuple[int, dict[str, float | None]]:
    """Bring every actor file of the shard up to the log. Blocking: runs before serving.

    For each key with records: open its file (a missing file was deleted: its records
    are moot), apply the records past the LSN it holds, in one transaction, with
    triggers and foreign keys off (the records hold their effects) and DEFENSIVE off (the
    records may write FTS5 shadow tables), and close it. Then every file opened is made
    durable, so that those records are never needed again: with one syncfs(2) at the
    end, keeping each WAL (after a kill -9 or a crash, a checkpoint of each of thousands
    of files took two fsyncs apiece, seconds before the shard served), or, on a VFS of
    its own (the power-cut tests) or without syncfs, with a checkpoint as each closes.

    A key whose records stop following its file (``BrokenChain``) gets the ones that
    still do; then, once the others are done and durable, the shard is refused
    (``LogDamaged``): a record applied past the hole would build a state that never
    existed.

    Returns how many files were brought up to date, and the next alarm time of every
    file opened that has an alarms table (the alarm index may have missed those).
    """
    replayed = 0
    broken: list[BrokenChain] = []
    alarms: dict[str, float | None] = {}
    one_sync = HAVE_SYNCFS and config.vfs is None
    opened = 0
    for key, records in recovered.records.items():
        try:
            path = resolve_actor_path(directory, key)
        except Error:
            log.error("shard log %s: record for an invalid key %r skipped", directory, key)
            continue
        if not os.path.exists(path):
            continue
        opened += 1
        try:
            replayed += replay_file(path, key, records, config, alarms, checkpoint=not one_sync)
        except BrokenChain as exc:
            broken.append(exc)
        except (apsw.Error, ReplayError, Error) as exc:
            # one damaged file must not keep the whole shard from serving: its actor
            # fails to open (and `ops verify` reports it); the others recover
            log.error("shard log %s: actor %r not recovered: %s", directory, key, exc)
    if one_sync and opened:
        syncfs(directory)
    if broken:
        raise _hole(broken)
    return replayed, alarms


def _hole(broken: list[BrokenChain]) -> LogDamaged:
    first = min(broken, key=lambda b: b.record.lsn)
    record = first.record
    segment = os.path.basename(record.segment)
    others = f" ({len(broken) - 1} other keys too)" if len(broken) > 1 else ""
    return LogDamaged(
        f"{record.segment} holds record {record.lsn:#x} of actor {first.key!r}, written "
        f"after the key's write {record.prev:#x}, but the actor file holds {first.held:#x} "
        f"and the log has no record of the key in between{others}: acknowledged writes are "
        "missing (a log segment was lost, or an actor file was replaced by an older copy). "
        "This shard's log is not replayed past a hole. Restore the shard from a backup, or, "
        "to keep what the actor files hold and lose the writes that only the log had, move "
        f"{segment} and every later segment out of the log directory"
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
) -> int:
    """Apply to the file the records past the LSN it holds; 1 if there were any.

    ``checkpoint``: the close checkpoints the file (durable on return). Without, the
    close keeps the WAL as it is, and the caller must sync the file system before the
    records may be dropped. Raises :class:`BrokenChain` (after applying the records
    before it) at a record that does not follow the file."""
    conn, auth = open_actor_db(path, key, config, create=False)
    if not checkpoint:
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    try:
        auth.trusted = True
        file_lsn = int(conn.execute(LSN_GET).fetchall()[0][0])  # type: ignore[arg-type]
        todo, unlinked = _linked([r for r in records if r.lsn > file_lsn], file_lsn)
        if not todo:
            _note_alarms(conn, key, alarms)
            if unlinked is not None:
                raise BrokenChain(key, file_lsn, unlinked)
            return 0
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 0)
        conn.pragma("foreign_keys", False)
        tables = load_tables(conn)
        with conn:
            for record in todo:
                try:
                    apply_record(conn, tables, record.payload)
                except (apsw.Error, ReplayError) as exc:
                    raise ReplayError(
                        f"actor {key!r}: log record {record.lsn:#x} does not apply ({exc}); "
                        "the file or the log is damaged"
                    ) from exc
            conn.execute(LSN_SET, (todo[-1].lsn,))
        if checkpoint:
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        _note_alarms(conn, key, alarms)
        if unlinked is not None:
            raise BrokenChain(key, todo[-1].lsn, unlinked)
        return 1
    finally:
        conn.close()


def _note_alarms(conn: apsw.Connection, key: str, into: dict[str, float | None]) -> None:
    if conn.table_exists("main", "_shardlite_alarms"):
        at = conn.execute("SELECT min(at) FROM _shardlite_alarms").fetchall()[0][0]
        into[key] = None if at is None else float(at)


__all__ = ["HAVE_SYNCFS", "drain_shard_log", "replay_file", "replay_shard", "syncfs"]
