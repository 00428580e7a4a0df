"""Passivation, the LRU cap, checkpoints, back-pressure and shutdown of the actor pool."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.lowlevel
import trio.testing

from shardlite.actor import (
    ActorConfig,
    ActorPool,
    Batch,
    Call,
    Durability,
    Overloaded,
    Sql,
    Statement,
    Unavailable,
    key_to_relpath,
    open_actor_pool,
)
from shardlite.actor import _actor as actor_module

from .waiting import wait_until


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_idle_actor_is_passivated_and_reopens_with_its_data(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = ActorConfig(idle_timeout_s=60.0, max_open_actors=1)  # under pressure
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        await pool.call("k", Sql("INSERT INTO t VALUES ('kept')"))
        assert pool.statistics()["actors_open"] == 1
        await trio.sleep(30)
        assert pool.statistics()["actors_open"] == 1  # not idle long enough yet
        await trio.sleep(120)
        await wait_until(lambda: pool.statistics()["actors_open"] == 0)
        assert pool.statistics()["actors_known"] == 0
        # closing checkpointed the WAL into the database and removed it
        path = tmp_path / key_to_relpath("k")
        assert not Path(str(path) + "-wal").exists()
        assert (await pool.call("k", Sql("SELECT v FROM t"))).rows == [("kept",)]
        assert pool.statistics()["opened"] == 2


async def test_idle_actors_stay_open_while_there_is_room(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = ActorConfig(idle_timeout_s=60.0, max_open_actors=4)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        for key in ("a", "b"):  # half the cap: no pressure
            await pool.call(key, Sql("CREATE TABLE t(v)"))
        await trio.sleep(600)
        assert pool.statistics()["actors_open"] == 2
        for key in ("c", "d"):  # more than half: the idle ones are passivated
            await pool.call(key, Sql("CREATE TABLE t(v)"))
        await trio.sleep(120)
        await wait_until(lambda: pool.statistics()["actors_open"] <= 2)


async def test_open_actors_stay_under_the_lru_cap(tmp_path: Path) -> None:
    config = ActorConfig(max_open_actors=3)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        for i in range(20):
            await pool.call(f"key-{i}", Sql("CREATE TABLE t(v)"))
            await pool.call(f"key-{i}", Sql("INSERT INTO t VALUES (?)", [i]))
        await wait_until(lambda: pool.statistics()["actors_open"] <= 3)
        assert pool.statistics()["evicted"] >= 17
        # the least recently used are gone from memory, their data is on disk
        for i in range(20):
            assert (await pool.call(f"key-{i}", Sql("SELECT v FROM t"))).rows == [(i,)]
        await wait_until(lambda: pool.statistics()["actors_open"] <= 3)


class LoopSyncs(apsw.VFS):
    """Passes every call through to the default VFS and counts the syncs SQLite asks
    for on one thread (the event loop's)."""

    def __init__(self, name: str) -> None:
        self.vfs_name = name
        self.loop_thread = threading.get_ident()
        self.on_loop: list[str] = []
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> LoopSyncsFile:
        return LoopSyncsFile(self, name, flags)


class LoopSyncsFile(apsw.VFSFile):
    def __init__(self, vfs: LoopSyncs, name: Any, flags: list[int]) -> None:
        self._vfs = vfs
        self._name = name.filename() if isinstance(name, apsw.URIFilename) else str(name)
        super().__init__("", name, flags)

    def xSync(self, flags: int) -> None:
        if threading.get_ident() == self._vfs.loop_thread:
            self._vfs.on_loop.append(os.path.basename(self._name))
        super().xSync(flags)


async def test_no_sync_runs_on_the_event_loop_through_checkpoints_evictions_and_reopens(
    tmp_path: Path,
) -> None:
    """SQLite syncs a WAL's header (and a new WAL's directory) on the first commit after
    a checkpoint emptied it or a close deleted it: the worker thread that checkpoints
    starts the next WAL itself, and an eviction leaves it beside the closed file (a quick
    close, inline, leaves it as it was), so no tenant batch on the loop ever waits for a
    sync."""
    vfs = LoopSyncs(f"loopsyncs{os.getpid()}")
    try:
        config = ActorConfig(
            vfs=vfs.vfs_name,
            max_open_actors=2,
            checkpoint_wal_bytes=16 * 4096,
            durability=Durability.OS,
        )
        async with open_actor_pool(config, str(tmp_path)) as pool:
            keys = [f"key-{i}" for i in range(5)]
            for key in keys:
                await pool.call(key, Sql("CREATE TABLE t(v BLOB)"))
            for i in range(300):  # keys in turn: each call reopens an evicted actor
                key = keys[i % len(keys)]
                await pool.call(key, Sql("INSERT INTO t VALUES (randomblob(3000))"))
            stats = pool.statistics()
            assert stats["evicted"] >= 250 and stats["opened"] >= 250
            # evictions close at once (a WAL past 64 KiB is checkpointed before that)
            assert stats["evicted"] >= stats["quick_closes"] >= 250
            assert stats["checkpoints"] >= 10  # the WALs filled up across evictions
            # an evicted actor's file keeps its started WAL (a quick close leaves it as
            # it was), which the checkpoints bound
            await wait_until(lambda: pool.statistics()["actors_open"] <= 2)
            wal = Path(str(tmp_path / key_to_relpath("key-0")) + "-wal")  # least recent
            assert 32 + 24 + 4096 <= wal.stat().st_size <= 32 + 20 * (24 + 4096)
            for key in keys:
                assert (await pool.call(key, Sql("SELECT count(*) FROM t"))).rows == [(60,)]
        assert vfs.on_loop == []
        # the files are whole, and hold every write, for a fresh pool on the default VFS
        async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
            for key in keys:
                assert (await pool.call(key, Sql("SELECT count(*) FROM t"))).rows == [(60,)]
                check = await pool.call(key, Sql("PRAGMA integrity_check"))
                assert check.rows == [("ok",)]
    finally:
        vfs.unregister()


async def test_full_mailbox_refuses_with_overloaded(tmp_path: Path) -> None:
    class Sink:
        def deliver(self, tag: Any, result: Any) -> None:
            pass

    config = ActorConfig(mailbox_size=4)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        pool.submit_nowait("k", [Call(Sql("SELECT 1"), Sink()) for _ in range(4)])
        with pytest.raises(Overloaded) as info:
            pool.submit_nowait("k", [Call(Sql("SELECT 1"), Sink())])
        assert info.value.retryable and info.value.retry_after > 0
        assert info.value.status == 503
        # another key is not affected
        assert (await pool.call("other", Sql("SELECT 1"))).rows == [(1,)]


async def test_wal_is_checkpointed_off_the_loop_when_it_grows(tmp_path: Path) -> None:
    config = ActorConfig(checkpoint_wal_bytes=64 * 1024, durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v BLOB)"))
        wal = Path(str(tmp_path / key_to_relpath("k")) + "-wal")
        biggest = 0
        for _ in range(200):
            await pool.call("k", Sql("INSERT INTO t VALUES (randomblob(2000))"))
            biggest = max(biggest, wal.stat().st_size if wal.exists() else 0)
        await wait_until(lambda: pool.statistics()["checkpoints"] >= 3)
        # 200 x 2 KB went through a WAL that never held much more than the threshold
        assert biggest < 4 * 64 * 1024
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(200,)]


WAL_LIMIT = 64 * 1024


async def _wal_sizes_through_checkpoints(pool: ActorPool, data: Path) -> tuple[Path, list[int]]:
    """Write 100 rows of 2 KB to actor "k", one call each; its WAL's path, and the WAL's
    size after each call (past WAL_LIMIT, at least three checkpoints)."""
    await pool.call("k", Sql("CREATE TABLE t(v BLOB)"))
    wal = Path(str(data / key_to_relpath("k")) + "-wal")
    sizes = []
    for _ in range(100):
        await pool.call("k", Sql("INSERT INTO t VALUES (randomblob(2000))"))
        sizes.append(wal.stat().st_size)
    assert pool.statistics()["checkpoints"] >= 3
    return wal, sizes


async def test_a_checkpointed_wal_is_reused_in_place_and_trimmed_after_a_large_batch(
    tmp_path: Path,
) -> None:
    """A checkpoint restarts the WAL at its start (the file keeps its blocks and cached
    pages for the next frames) instead of truncating it; a batch that grew it past twice
    the checkpoint size leaves it trimmed back to that at the restart."""
    config = ActorConfig(checkpoint_wal_bytes=WAL_LIMIT, durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        wal, sizes = await _wal_sizes_through_checkpoints(pool, tmp_path)
        # once past the threshold, the file never shrinks: new frames overwrite old ones
        grown = sizes.index(max(sizes))
        assert max(sizes) >= WAL_LIMIT and min(sizes[grown:]) == max(sizes)
        # a batch of 40 x 8 KB: the WAL grows far past twice the threshold
        big = Batch([Statement("INSERT INTO t VALUES (randomblob(8000))") for _ in range(40)])
        await pool.call("k", big)
        assert wal.stat().st_size > 4 * WAL_LIMIT
        await wait_until(lambda: pool.statistics()["checkpoints"] >= 4)
        await pool.call("k", Sql("INSERT INTO t VALUES (1)"))  # the WAL's next writes
        await wait_until(lambda: wal.stat().st_size <= 2 * WAL_LIMIT)
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(141,)]
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(141,)]
        check = await pool.call("k", Sql("PRAGMA integrity_check"))
        assert check.rows == [("ok",)]


async def test_a_wal_that_filled_slowly_is_truncated_at_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its pages may have left the page cache since they were written, and overwriting
    part of an uncached page reads it first: such a WAL is truncated, not reused."""
    monkeypatch.setattr(actor_module, "WAL_REUSE_WITHIN_S", 0.0)  # every WAL is slow
    config = ActorConfig(checkpoint_wal_bytes=WAL_LIMIT, durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        _, sizes = await _wal_sizes_through_checkpoints(pool, tmp_path)
        grown = sizes.index(max(sizes))
        assert max(sizes) >= WAL_LIMIT and min(sizes[grown:]) < WAL_LIMIT // 4  # emptied
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(100,)]


async def test_new_actor_files_get_the_configured_page_size_and_old_ones_keep_theirs(
    tmp_path: Path,
) -> None:
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("old", Sql("CREATE TABLE t(v)"))
    config = ActorConfig(page_size=1024, checkpoint_wal_bytes=WAL_LIMIT, durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        sizes = {}
        for key in ("old", "k"):
            sizes[key] = (await pool.call(key, Sql("PRAGMA page_size"))).rows[0][0]
        assert sizes == {"old": 4096, "k": 1024}
        # the checkpoint threshold is in bytes, whatever the page size: the WAL of 1 KiB
        # pages is checkpointed (and reused) at WAL_LIMIT, not at 4x it
        _, wal_sizes = await _wal_sizes_through_checkpoints(pool, tmp_path)
        assert WAL_LIMIT <= max(wal_sizes) < 2 * WAL_LIMIT
        check = await pool.call("k", Sql("PRAGMA integrity_check"))
        assert check.rows == [("ok",)]


async def test_closing_the_pool_runs_queued_calls_and_keeps_their_writes(tmp_path: Path) -> None:
    results: list[Any] = []

    class Sink:
        def deliver(self, tag: Any, result: Any) -> None:
            results.append(result)

    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        pool.submit_nowait(
            "k", [Call(Sql("INSERT INTO t VALUES (?)", [i]), Sink()) for i in range(50)]
        )
        # leave without waiting: the pool must still run and release them
    assert len(results) == 50 and all(r.changes == 1 for r in results)
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(50,)]


async def test_closed_pool_refuses_new_keys(tmp_path: Path) -> None:
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        pass
    with pytest.raises(Unavailable):
        pool.submit_nowait("new", [])


async def test_delete_removes_the_file_and_the_next_call_starts_fresh(
    pool: ActorPool, tmp_path: Path
) -> None:
    await pool.call("k", Sql("CREATE TABLE t(v)"))
    path = tmp_path / key_to_relpath("k")
    assert path.exists()
    assert await pool.delete("k") is True
    assert not path.exists() and not Path(str(path) + "-wal").exists()
    assert await pool.delete("k") is False
    tables = await pool.call("k", Sql("SELECT name FROM sqlite_schema WHERE name = 't'"))
    assert tables.rows == []


async def test_calls_queued_around_a_delete_keep_their_order(pool: ActorPool) -> None:
    results: dict[int, Any] = {}
    done = trio.Event()

    class Sink:
        def deliver(self, tag: Any, result: Any) -> None:
            results[tag] = result
            if len(results) == 3:
                done.set()

    await pool.call("k", Sql("CREATE TABLE t(v)"))
    sink = Sink()
    pool.submit_nowait(
        "k",
        [
            Call(Sql("INSERT INTO t VALUES (1)"), sink, 0),
            Call(pool.delete_call(), sink, 1),
            Call(Sql("SELECT count(*) FROM sqlite_schema WHERE name = 't'"), sink, 2),
        ],
    )
    pool.wake_runner()
    with trio.fail_after(10):
        await done.wait()
    assert results[0].changes == 1
    assert results[1].deleted is True
    assert results[2].rows == [(0,)]


async def test_export_is_a_consistent_sqlite_file(pool: ActorPool) -> None:
    import apsw

    await pool.call("k", Sql("CREATE TABLE t(v)"))
    for i in range(100):
        await pool.call("k", Sql("INSERT INTO t VALUES (?)", [i]))
    path = await pool.export("k")
    try:
        with apsw.Connection(path) as conn:
            assert conn.execute("SELECT count(*), sum(v) FROM t").fetchall() == [(100, 4950)]
            assert conn.pragma("integrity_check") == "ok"
    finally:
        os.unlink(path)
    # exporting an actor that never existed is not found, and creates nothing
    from shardlite.actor import NotFound

    with pytest.raises(NotFound):
        await pool.export("ghost")


async def test_a_burst_of_new_keys_does_not_evict_below_the_cap(tmp_path: Path) -> None:
    """Actors already closing still count as open; they must not be evicted twice over."""
    cap = 20
    async with open_actor_pool(ActorConfig(max_open_actors=cap), str(tmp_path)) as pool:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(pool.call, f"burst-{i}", Sql("SELECT 1"))
        await wait_until(lambda: pool._closing == 0)
        assert pool.statistics()["actors_open"] == cap
        assert pool.statistics()["evicted"] == 200 - cap


async def test_shardlite_statements_are_not_held_to_the_tenants_time_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadline left over from an earlier call must not interrupt BEGIN, COMMIT or KV."""
    import shardlite.actor._actor as actor_module
    from shardlite.actor import KvGet, KvPut

    monkeypatch.setattr(actor_module, "PROGRESS_STEPS", 1)  # look at the clock every step
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        actor = pool._actors["k"]
        for i in range(50):
            actor._deadline = 0.0  # as if the last statement ran long ago
            await pool.call("k", Sql("INSERT INTO t VALUES (?)", [i]))
            actor._deadline = 0.0
            await pool.call("k", KvPut("n", i))
            actor._deadline = 0.0
            assert (await pool.call("k", KvGet("n"))).value == i
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(50,)]


async def test_calls_after_a_delete_never_reach_the_deleted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The actor stays BUSY for the whole delete: a write that arrives while the file is
    being unlinked goes to a new file, and survives a restart."""
    import threading

    in_unlink = threading.Event()
    go_on = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # the delete's directory sync, in its worker thread
        if not in_unlink.is_set():
            in_unlink.set()
            go_on.wait(10)
        real_fsync(fd)

    results: dict[int, Any] = {}
    done = trio.Event()

    class Sink:
        def deliver(self, tag: Any, result: Any) -> None:
            results[tag] = result
            if len(results) == 3:
                done.set()

    config = ActorConfig(durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        await pool.call("k", Sql("INSERT INTO t VALUES ('before')"))
        monkeypatch.setattr(os, "fsync", slow_fsync)
        sink = Sink()
        pool.submit_nowait("k", [Call(pool.delete_call(), sink, 0)])
        pool.wake_runner()
        await trio.to_thread.run_sync(in_unlink.wait, 10)
        pool.submit_nowait(
            "k",
            [
                Call(Sql("CREATE TABLE IF NOT EXISTS t(v)"), sink, 1),
                Call(Sql("INSERT INTO t VALUES ('after')"), sink, 2),
            ],
        )
        pool.wake_runner()
        await trio.testing.wait_all_tasks_blocked()
        go_on.set()
        with trio.fail_after(10):
            await done.wait()
        assert results[0].deleted is True
        monkeypatch.setattr(os, "fsync", real_fsync)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        assert (await pool.call("k", Sql("SELECT v FROM t"))).rows == [("after",)]


async def test_a_burst_over_many_closed_actors_never_holds_more_files_than_the_cap_allows(
    tmp_path: Path,
) -> None:
    from shardlite.actor._pool import OPEN_SLACK

    keys = [f"k{i}" for i in range(300)]
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        for key in keys:  # the files exist: opening them again runs inline
            await pool.call(key, Sql("CREATE TABLE t(v)"))
    config = ActorConfig(max_open_actors=4)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        most = 0
        done = 0

        async def write(key: str) -> None:
            nonlocal most, done
            await pool.call(key, Sql("INSERT INTO t VALUES (1)"))
            most = max(most, pool.statistics()["actors_open"])
            done += 1

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(write, key)
            while done < len(keys):
                most = max(most, pool.statistics()["actors_open"])
                await trio.lowlevel.checkpoint()
        assert most <= config.max_open_actors + OPEN_SLACK
        for key in keys[:5] + keys[-5:]:
            assert (await pool.call(key, Sql("SELECT count(*) FROM t"))).rows == [(1,)]
