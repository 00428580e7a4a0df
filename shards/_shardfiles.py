"""A shard's files on disk, for the admin operations (blocking: run in worker threads).

Listing a shard's actor keys, writing a move's copies into place (checked first),
replaying shipped records into them, keeping the copies' alarm index, wiping a copy, and
deleting retired shard directories after their grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import apsw
import trio

from shardlite.actor import (
    AlarmIndex,
    Record,
    check_actor_file,
    next_alarm_of_file,
    raise_log_epoch,
    read_log_epoch,
    relpath_to_key,
    replay_file,
    resolve_actor_path,
    sync_directory,
)

log = logging.getLogger("shardlite.admin")

RETIRED_DIR = "retired"
"""Under DATA: the directories of shards that left this host, kept for a grace period."""


async def delete_retired(data: str, keep_s: float) -> None:
    """Every so often, delete retired shard copies older than ``keep_s``."""
    retired = os.path.join(data, RETIRED_DIR)
    while True:
        await trio.to_thread.run_sync(_delete_older, retired, keep_s)
        await trio.sleep(min(600.0, max(1.0, keep_s / 4)))


def _delete_older(directory: str, keep_s: float) -> None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    cutoff = time.time() - keep_s
    for name in names:
        path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                log.info("deleted the retired copy %s", path)


def list_actor_keys(directory: str, open_keys: dict[str, str]) -> list[str]:
    """The key of every actor file under a shard directory (from its name, or from the
    key stored inside when the name is a hash)."""
    keys = []
    try:
        fanouts = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for fanout in fanouts:
        sub = os.path.join(directory, fanout)
        if len(fanout) != 2 or not os.path.isdir(sub):
            continue
        for name in sorted(os.listdir(sub)):
            if not name.endswith(".db"):
                continue
            path = os.path.join(sub, name)
            key = relpath_to_key(f"{fanout}/{name}")
            if key is None:
                key = open_keys.get(path) or _key_inside(path)
            if key is not None:
                keys.append(key)
    return keys


def _key_inside(path: str) -> str | None:
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return None
    try:
        rows = conn.execute("SELECT value FROM _shardlite_meta WHERE name = 'key'").fetchall()
        return str(rows[0][0]) if rows else None
    except apsw.Error:
        return None
    finally:
        conn.close()


def apply_records(
    directory: str,
    records: dict[str, list[tuple[int, bytes]]],
    config: Any,
    alarms: dict[str, float | None],
) -> list[str]:
    """Replay shipped records into the copies (those above the position each holds);
    the keys that could not be brought up to date so (no copy yet, or a record that
    does not apply): the caller copies those whole. Blocking."""
    failed = []
    for key, kept in records.items():
        path = resolve_actor_path(directory, key)
        if not os.path.exists(path):
            failed.append(key)
            continue
        try:
            shipped = [Record(lsn, key, payload) for lsn, payload in kept]
            replay_file(path, key, shipped, config, alarms, mark=False)
        except Exception as exc:  # apsw.Error, ReplayError, a damaged copy
            log.warning("records of %r do not apply to its copy (%s): copying it whole", key, exc)
            failed.append(key)
    return failed


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_new(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def check_and_place(staged: str, path: str, key: str) -> tuple[str, float | None]:
    """quick_check the copy and the key inside, then make it the actor's file, durably."""
    problem = check_actor_file(staged, key, quick=True)
    if problem:
        return problem, None
    at = next_alarm_of_file(staged)
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    os.replace(staged, path)
    sync_directory(os.path.dirname(path))
    sync_directory(os.path.dirname(os.path.dirname(path)))
    return "", at


def note_alarms(directory: str, alarms: Mapping[str, float | None]) -> None:
    """The copied files' next alarms into the shard's alarm index (synced)."""
    if all(at is None for at in alarms.values()) and not os.path.exists(
        os.path.join(directory, "alarms.db")
    ):
        return  # no alarms, and no index that could hold stale ones
    index = AlarmIndex(directory, full_sync=True)
    try:
        for key, at in alarms.items():
            index.put(key, at)
        index.sync()
    finally:
        index.close()


def wipe_shard(directory: str, log_epoch: int) -> bool:
    """Delete a copy of a shard (keeping its log epoch, so LSNs keep growing here)."""
    epoch = max(read_log_epoch(directory), log_epoch)
    existed = os.path.isdir(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if existed:
        sync_directory(os.path.dirname(directory))
    if log_epoch:
        raise_log_epoch(directory, epoch)
    return existed


__all__ = [
    "RETIRED_DIR",
    "append",
    "apply_records",
    "check_and_place",
    "delete_retired",
    "list_actor_keys",
    "note_alarms",
    "read_at",
    "wipe_shard",
    "write_new",
]
