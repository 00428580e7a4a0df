"""durability=log with ``log_batches_per_commit`` > 1: an actor file's transaction holds
several batches (actor/_filetxn.py). Each batch is still acknowledged only once the shard
log holds it; the file commits every N batches, at the log's checkpoints, and before
anything else reads or copies it. What SQLite rolls back whole is put back."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import apsw
import pytest

import shardlite.actor._logcheckpoint as logcheckpoint_module
from shardlite.actor import (
    ActorConfig,
    Error,
    LogDurability,
    Sql,
    Timeout,
    open_actor_pool,
)
from shardlite.actor._keys import resolve_actor_path

from .test_batches import RUNAWAY_INSERT, run_batch
from .test_shardlog import _DiskFullVFS
from .waiting import wait_until

CONFIG = ActorConfig(log_batches_per_commit=4, log_checkpoint_interval_s=3600)


async def _ids(pool: Any, key: str = "k") -> list[int]:
    rows = (await pool.call(key, Sql("SELECT id FROM t ORDER BY id"))).rows
    return [r[0] for r in rows]


def _file_ids(path: str) -> list[int]:
    """What the file itself holds (its WAL included), read with a connection of our own
    from a copy (the live file is the actor's alone)."""
    copy = path + ".copy"
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as src, open(copy + suffix, "wb") as dst:
                dst.write(src.read())
    try:
        conn = sqlite3.connect(copy)
        try:
            return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
        finally:
            conn.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(copy + suffix):
                os.unlink(copy + suffix)


async def test_batches_share_the_file_transaction_until_n_or_a_checkpoint(
    tmp_path: Path,
) -> None:
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))  # commits: unlogged
        path = resolve_actor_path(str(tmp_path), "k")
        actor = pool._actors["k"]
        for n in (1, 2, 3):
            await pool.call("k", Sql("INSERT INTO t VALUES (?)", [n]))
        assert actor.txn_open and actor.committed_lsn < actor.last_lsn
        assert await _ids(pool) == [1, 2, 3]  # the actor reads its own open transaction
        assert _file_ids(path) == []  # acknowledged, in the log: not in the file yet
        await pool.call("k", Sql("INSERT INTO t VALUES (4)"))  # the 4th batch commits
        assert not actor.txn_open and actor.committed_lsn == actor.last_lsn
        assert _file_ids(path) == [1, 2, 3, 4]
        await pool.call("k", Sql("INSERT INTO t VALUES (5)"))
        assert _file_ids(path) == [1, 2, 3, 4]
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        shard = durability.shards[str(tmp_path)]
        await durability.checkpoint_shard(shard)  # commits it, syncs, trims
        assert _file_ids(path) == [1, 2, 3, 4, 5]
        assert actor.file_lsn == actor.last_lsn and actor not in shard.unsynced
        await pool.call("k", Sql("INSERT INTO t VALUES (6)"))
    # the close committed the last one
    assert _file_ids(path) == [1, 2, 3, 4, 5, 6]


async def test_a_pass_run_sooner_for_piled_up_commits_commits_no_open_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpointer runs before ``--log-checkpoint-interval`` once actor-file commits
    pile up in the page cache (an LRU closing files, files reaching N batches). Such a
    pass syncs what files have committed and leaves their open transactions open:
    committing every file then is the write-back burst that running sooner avoids. The
    interval's pass commits them."""
    monkeypatch.setattr(logcheckpoint_module, "CHECKPOINT_POLL_S", 0.01)
    # no early pass while the writes run: one between the busy key's two file commits
    # would reset the count below SYNCFS_EVERY_COMMITS for good (a slow CI machine did)
    monkeypatch.setattr(logcheckpoint_module, "SYNCFS_MIN", 10**9)
    monkeypatch.setattr(logcheckpoint_module, "SYNCFS_EVERY_S", 0.0)
    monkeypatch.setattr(logcheckpoint_module, "SYNCFS_EVERY_COMMITS", 2)
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        if not durability._syncfs_mode:
            pytest.skip("no syncfs(2) here: the checkpointer syncs file by file")
        for key in ("idle", "busy"):
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))
        await pool.call("idle", Sql("INSERT INTO t VALUES (1)"))  # 1 of 4: held open
        for n in range(8):  # two file commits
            await pool.call("busy", Sql("INSERT INTO t VALUES (?)", [n]))
        idle, busy = pool._actors["idle"], pool._actors["busy"]
        shard = durability.shards[str(tmp_path)]
        assert busy.committed_lsn == busy.last_lsn and durability.statistics()["syncfs_calls"] == 0
        monkeypatch.setattr(logcheckpoint_module, "SYNCFS_MIN", 2)  # the two files: due now

        async def synced() -> bool:  # a pass synced the busy file's commits
            return busy.file_lsn >= busy.last_lsn

        await wait_until(synced, timeout=30)
        assert durability.statistics()["syncfs_calls"] >= 1
        assert idle.txn_open and idle.committed_lsn < idle.last_lsn
        assert _file_ids(resolve_actor_path(str(tmp_path), "idle")) == []
        assert shard.unsynced[idle] <= idle.last_lsn  # the log keeps its record
        await durability.checkpoint_shard(shard)  # the interval's pass
        assert not idle.txn_open and idle not in shard.unsynced
        assert _file_ids(resolve_actor_path(str(tmp_path), "idle")) == [1]


async def test_recovery_applies_what_only_the_log_holds(tmp_path: Path) -> None:
    """A crash (here: the files as they are on disk, copied aside before any close)
    leaves the acknowledged batches of an open file transaction in the log alone."""
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    async with open_actor_pool(CONFIG, str(data)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))
        for n in range(1, 7):  # 4 commit, 2 only in the log
            await pool.call("k", Sql("INSERT INTO t VALUES (?)", [n]))
        shutil.copytree(data, crashed)  # the files as a crash leaves them
    assert _file_ids(resolve_actor_path(str(crashed), "k")) == [1, 2, 3, 4]
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        assert await _ids(pool) == [1, 2, 3, 4, 5, 6]
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        assert durability.statistics()["recovered_actors"] == 1


async def test_a_whole_transaction_rollback_puts_the_earlier_batches_back(
    tmp_path: Path,
) -> None:
    """OR ROLLBACK rolls back SQLite's whole transaction: with the file's transaction
    open, that is the earlier batches too. They are applied again from their records."""
    config = ActorConfig(log_batches_per_commit=64, log_checkpoint_interval_s=3600)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
        for n in (1, 2, 3):
            await pool.call("k", Sql("INSERT INTO t VALUES (?, 'x')", [n]))
        with pytest.raises(Error) as caught:
            await pool.call("k", Sql("INSERT OR ROLLBACK INTO t VALUES (1, 'dup')"))
        assert caught.value.status == 409
        assert await _ids(pool) == [1, 2, 3]
        assert pool.durability.statistics()["reapplied_batches"] == 3
        await pool.call("k", Sql("INSERT INTO t VALUES (4, 'x')"))
        rows = (await pool.call("k", Sql("SELECT v FROM t WHERE id = 1"))).rows
        assert rows == [("x",)]
    async with open_actor_pool(config, str(tmp_path)) as pool:
        assert await _ids(pool) == [1, 2, 3, 4]


async def test_an_interrupted_write_keeps_the_earlier_batches(tmp_path: Path) -> None:
    """SQLite rolls back the whole transaction of an interrupted write (a statement past
    its budget): the batch's other calls and the earlier batches stay."""
    config = ActorConfig(
        log_batches_per_commit=64, log_checkpoint_interval_s=3600, statement_timeout_s=0.05
    )
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
        for n in (1, 2):
            await pool.call("k", Sql("INSERT INTO t(v) VALUES (?)", [f"early{n}"]))
        results = await run_batch(
            pool,
            "k",
            [
                Sql("INSERT INTO t(v) VALUES ('a')"),
                Sql(RUNAWAY_INSERT),
                Sql("INSERT INTO t(v) VALUES ('b')"),
            ],
        )
        assert isinstance(results[1], Timeout)
        rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
        assert rows.rows == [("early1",), ("early2",), ("a",), ("b",)]
    async with open_actor_pool(config, str(tmp_path)) as pool:
        rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
        assert rows.rows == [("early1",), ("early2",), ("a",), ("b",)]


async def test_a_full_disk_at_the_file_commit_keeps_every_acknowledged_batch(
    tmp_path: Path,
) -> None:
    """The file's commit fails (a full disk): the batches stay in the open transaction
    and in the log; the next commit, once there is room, puts them in the file. A close
    that cannot commit leaves them to the log: the key is not served again before a
    restart, whose recovery applies them."""
    vfs = _DiskFullVFS(f"diskfull-filetxn-{os.getpid()}")
    config = ActorConfig(
        vfs=vfs.vfs_name, log_batches_per_commit=64, log_checkpoint_interval_s=3600
    )
    try:
        async with open_actor_pool(config, str(tmp_path)) as pool:
            await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))
            await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
            durability = pool.durability
            assert isinstance(durability, LogDurability)
            shard = durability.shards[str(tmp_path)]
            actor = pool._actors["k"]
            vfs.full = True
            await durability.checkpoint_shard(shard)  # the commit fails: kept
            assert actor.txn_open and actor in shard.unsynced
            assert durability.statistics()["file_commit_failures"] == 1
            await pool.call("k", Sql("INSERT INTO t VALUES (2)"))  # acknowledged (the log)
            assert await _ids(pool) == [1, 2]
            vfs.full = False
            await durability.checkpoint_shard(shard)
            assert not actor.txn_open and actor not in shard.unsynced
            await pool.call("k", Sql("INSERT INTO t VALUES (3)"))
            vfs.full = True  # the close's commit fails
        vfs.full = False
        async with open_actor_pool(config, str(tmp_path)) as pool:  # recovery
            assert await _ids(pool) == [1, 2, 3]
    finally:
        vfs.unregister()


async def test_a_key_closed_with_batches_its_file_lacks_is_not_reopened(
    tmp_path: Path,
) -> None:
    vfs = _DiskFullVFS(f"diskfull-reopen-{os.getpid()}")
    config = ActorConfig(
        vfs=vfs.vfs_name,
        log_batches_per_commit=64,
        log_checkpoint_interval_s=3600,
        log_segment_bytes=4 * 1024,  # other's writes fill segments the trim could drop
    )
    try:
        async with open_actor_pool(config, str(tmp_path)) as pool:
            await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))
            await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
            vfs.full = True
            await pool._close(pool._actors["k"])  # as an eviction would
            vfs.full = False
            with pytest.raises(Error) as caught:
                await pool.call("k", Sql("SELECT id FROM t"))
            assert caught.value.status == 503 and "restart" in caught.value.message
            durability = pool.durability
            assert isinstance(durability, LogDurability)
            shard = durability.shards[str(tmp_path)]
            await pool.call("other", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad)"))
            for n in range(20):
                await pool.call("other", Sql("INSERT INTO t VALUES (?, ?)", [n, "x" * 1500]))
            await durability.checkpoint_shard(shard)  # the log is kept from k's record
            assert "k" in shard.unapplied
        async with open_actor_pool(config, str(tmp_path)) as pool:
            assert await _ids(pool) == [1]
    finally:
        vfs.unregister()


async def test_an_export_holds_the_batches_of_the_open_transaction(tmp_path: Path) -> None:
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY)"))
        await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
        copy = await pool.export("k")
        try:
            conn = apsw.Connection(copy)
            assert conn.execute("SELECT id FROM t").fetchall() == [(1,)]
            conn.close()
        finally:
            os.unlink(copy)


async def test_batches_that_cannot_be_applied_again_reset_the_actor_and_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite rolled the file's transaction back and its kept batches cannot be applied
    again (here: two re-applies fail as a full disk would). The one inside the failed
    batch puts its call back in the mailbox; the one that starts the next batch answers
    that call 503 `unavailable`, retryable, with a clear log line (not "unexpected
    failure"), and resets the actor. Nothing acknowledged is lost."""
    import shardlite.actor._filetxn as filetxn_module

    config = ActorConfig(log_batches_per_commit=64, log_checkpoint_interval_s=3600)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
        for n in (1, 2, 3):
            await pool.call("k", Sql("INSERT INTO t VALUES (?, 'x')", [n]))
        real_apply = filetxn_module.apply_record
        failures = [apsw.FullError("database or disk is full") for _ in range(2)]

        def apply_once_failing(*args: Any) -> None:
            if failures:
                raise failures.pop()
            real_apply(*args)

        monkeypatch.setattr(filetxn_module, "apply_record", apply_once_failing)
        with pytest.raises(Error) as caught:  # SQLite rolls back the whole transaction
            await pool.call("k", Sql("INSERT OR ROLLBACK INTO t VALUES (1, 'dup')"))
        assert not failures
        assert (caught.value.status, caught.value.code, caught.value.retryable) == (
            503,
            "unavailable",
            True,
        )
        assert "cannot start a transaction" in caplog.text
        assert "unexpected failure" not in caplog.text
        # the reset's close applies them again (the failure is gone) and commits
        assert await _ids(pool) == [1, 2, 3]
        await pool.call("k", Sql("INSERT INTO t VALUES (4, 'x')"))
    async with open_actor_pool(config, str(tmp_path)) as pool:
        assert await _ids(pool) == [1, 2, 3, 4]
