"""The output gate: no reply before its write is durable, proven with a simulated power cut."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

from shardlite.actor import (
    Actor,
    ActorConfig,
    Durability,
    FsyncDurability,
    Sql,
    open_actor_pool,
)

from .conftest import PowerCutVFS

WRITERS = 16
KEYS = 4


async def write_until_cut(
    config: ActorConfig, durability: Any, data: Path, vfs: PowerCutVFS, seed: int
) -> set[tuple[str, int]]:
    """Concurrent writers over a few keys; the power is cut at a random moment.

    Returns every (key, value) whose write was acknowledged before the cut.
    """
    rng = random.Random(seed)
    acked: set[tuple[str, int]] = set()
    keys = [f"key-{i}" for i in range(KEYS)]
    async with open_actor_pool(config, str(data), durability) as pool:
        for key in keys:
            await pool.call(key, Sql("CREATE TABLE t(v INTEGER PRIMARY KEY)"))
        cut_after = rng.randint(200, 600)

        async def writer(w: int) -> None:
            for i in range(10_000):
                if vfs.is_cut:
                    return
                key = keys[(w + i) % KEYS]
                value = w * 100_000 + i
                await pool.call(key, Sql("INSERT INTO t VALUES (?)", [value]))
                if vfs.is_cut:
                    return  # the reply raced the cut: not counted as acknowledged
                acked.add((key, value))
                if len(acked) >= cut_after:
                    vfs.cut()
                    return

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(writer, w)
    vfs.restore()
    return acked


async def read_back(data: Path) -> set[tuple[str, int]]:
    present: set[tuple[str, int]] = set()
    async with open_actor_pool(ActorConfig(), str(data)) as pool:
        for i in range(KEYS):
            key = f"key-{i}"
            try:
                rows = (await pool.call(key, Sql("SELECT v FROM t"))).rows
            except Exception:  # the table itself may be gone after the cut
                rows = []
            present.update((key, v) for (v,) in rows)
    return present


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_power_cut_loses_no_acknowledged_write_with_fsync(
    tmp_path: Path, powercut: PowerCutVFS, seed: int
) -> None:
    config = ActorConfig(durability=Durability.FSYNC, vfs=powercut.vfs_name)

    def sync(actor: Actor) -> None:  # the flusher's fdatasync, through the VFS
        powercut.sync_path(actor.path + "-wal")

    durability = FsyncDurability(config, sync=sync)
    acked = await write_until_cut(config, durability, tmp_path, powercut, seed)
    assert len(acked) >= 200
    present = await read_back(tmp_path)
    assert acked - present == set(), f"seed {seed}: acknowledged writes lost"


async def test_power_cut_negative_control_os_durability_loses_acknowledged_writes(
    tmp_path: Path, powercut: PowerCutVFS
) -> None:
    """Shows the test above can fail: with durability=os nothing is flushed before acks."""
    config = ActorConfig(durability=Durability.OS, vfs=powercut.vfs_name)
    from shardlite.actor import OsDurability

    acked = await write_until_cut(config, OsDurability(config), tmp_path, powercut, seed=1)
    present = await read_back(tmp_path)
    assert len(acked - present) > 0


async def test_reply_waits_for_the_flush_that_covers_it(tmp_path: Path) -> None:
    release = trio.Event()
    synced: list[str] = []
    token = trio.lowlevel.current_trio_token()

    def sync(actor: Actor) -> None:  # runs in a worker thread, like fdatasync
        trio.from_thread.run(release.wait, trio_token=token)
        synced.append(actor.key)

    config = ActorConfig(durability=Durability.FSYNC)
    async with open_actor_pool(config, str(tmp_path), FsyncDurability(config, sync)) as pool:
        replies: list[str] = []

        async def call(label: str, sql: str) -> None:
            await pool.call("k", Sql(sql))
            replies.append(label)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "create", "CREATE TABLE t(v)")
            await trio.testing.wait_all_tasks_blocked()
            assert replies == [] and synced == []  # committed, but not durable: no reply
            nursery.start_soon(call, "read", "SELECT count(*) FROM t")
            await trio.testing.wait_all_tasks_blocked()
            # a read that follows an unflushed write waits too: it could reveal that write
            assert replies == []
            nursery.start_soon(call, "other", "SELECT 1")
            release.set()
        assert set(replies) == {"create", "read", "other"}
        assert synced and synced[0] == "k"


async def test_reads_with_nothing_unflushed_are_answered_without_a_flush(tmp_path: Path) -> None:
    calls: list[str] = []

    def sync(actor: Actor) -> None:
        calls.append(actor.key)

    config = ActorConfig(durability=Durability.FSYNC)
    async with open_actor_pool(config, str(tmp_path), FsyncDurability(config, sync)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        flushes = len(calls)
        for _ in range(10):
            await pool.call("k", Sql("SELECT count(*) FROM t"))
        assert len(calls) == flushes


async def test_failed_fsync_fails_the_pending_replies_and_resets_the_actor(tmp_path: Path) -> None:
    from shardlite.actor import Internal

    fail = True

    def sync(actor: Actor) -> None:
        if fail:
            raise OSError(5, "Input/output error")

    config = ActorConfig(durability=Durability.FSYNC)
    durability = FsyncDurability(config, sync)
    async with open_actor_pool(config, str(tmp_path), durability) as pool:
        with pytest.raises(Internal) as info:
            await pool.call("k", Sql("CREATE TABLE t(v)"))
        assert "may or may not" in info.value.message
        assert durability.failures == 1
        fail = False
        await pool.call("k", Sql("CREATE TABLE IF NOT EXISTS t(v)"))
        await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(1,)]


async def test_real_fdatasync_path_syncs_the_wal_and_its_directory(
    fsync_pool: Any, tmp_path: Path
) -> None:
    pool = fsync_pool
    await pool.call("k", Sql("CREATE TABLE t(v)"))
    await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
    stats = pool.durability.statistics()
    assert stats["mode"] == "fsync" and stats["rounds"] >= 1 and stats["failures"] == 0
    actor = pool._actors["k"]
    assert actor.wal_fd is not None and not actor.dir_sync_needed
    assert actor.synced_gen == actor.written_gen
