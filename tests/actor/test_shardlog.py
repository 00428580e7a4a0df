"""durability=log: power cuts at random points, exact replay, a bounded log.

The actor files run on :class:`PowerCutVFS`; the shard log's own file I/O goes through
:class:`LogCut`, which remembers how much of each segment was fdatasync'ed. A cut drops
everything after; ``restore`` puts the disk back as a power cut would have left it.
Seeds are printed in failures; ``SHARDLITE_POWERCUT_SEEDS`` sets how many run (the
default suite runs a few dozen, ``pytest -m slow`` runs thousands).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from pathlib import Path
from typing import Any

import apsw
import msgspec
import pytest
import trio

import shardlite.actor._logrecovery as logrecovery_module
import shardlite.actor._shardlog as shardlog_module
from shardlite.actor import (
    Actor,
    ActorConfig,
    Batch,
    Error,
    KvGet,
    KvPut,
    LogDurability,
    NotFound,
    Sql,
    Statement,
    open_actor_pool,
)
from shardlite.actor._recovery import syncfs

from .conftest import PowerCutVFS

QUICK_SEEDS = int(os.environ.get("SHARDLITE_POWERCUT_SEEDS", "24"))
SLOW_SEEDS = 2000
KEYS = 6
WRITERS = 12
SEGMENT_BYTES = 4 * 1024


class LogCut:
    """Stands in for the ``os`` module inside the shard log: tracks what was synced.

    Per file (by inode: a spare becomes a segment under another name), the size at its
    last fdatasync, and the old bytes under every in-place write since (init_zero
    segments are overwritten, not appended to). A cut drops both: ``restore`` puts the
    old bytes back and truncates to the synced size.
    """

    def __init__(self) -> None:
        self.is_cut = False
        self.durable: dict[int, int] = {}
        self.unsynced: dict[int, list[tuple[int, bytes]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        if flags & (os.O_TRUNC | os.O_EXCL):  # a new, empty file: nothing of it is synced
            self._forget(os.fstat(fd).st_ino)
        return fd

    def write(self, fd: int, data: Any) -> int:
        if self.is_cut:
            return len(data)  # the disk never gets it
        return os.write(fd, data)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self.is_cut:
            return len(data)
        with open(f"/proc/self/fd/{fd}", "rb") as f:  # the log's own descriptor is write-only
            f.seek(offset)
            old = f.read(len(data))
        self.unsynced.setdefault(os.fstat(fd).st_ino, []).append((offset, old))
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if self.is_cut:
            return
        os.fdatasync(fd)
        st = os.fstat(fd)
        self.durable[st.st_ino] = st.st_size
        self.unsynced.pop(st.st_ino, None)

    # After the cut nothing reaches the disk: not even the deletion of a segment that
    # the shutdown (still running in the test, unlike after a real power cut) trims.
    def unlink(self, path: str) -> None:
        if not self.is_cut:
            inode = os.stat(path).st_ino
            os.unlink(path)
            self._forget(inode)

    def replace(self, src: str, dst: str) -> None:
        if not self.is_cut:
            os.replace(src, dst)

    def link(self, src: str, dst: str) -> None:
        if not self.is_cut:
            os.link(src, dst)

    def _forget(self, inode: int) -> None:
        self.durable.pop(inode, None)
        self.unsynced.pop(inode, None)

    def restore(self, log_dir: Path) -> None:
        for segment in log_dir.glob("*.log"):
            inode = segment.stat().st_ino
            with open(segment, "r+b") as f:
                for offset, old in reversed(self.unsynced.get(inode, [])):
                    f.seek(offset)
                    f.write(old)
                f.truncate(self.durable.get(inode, 0))


class Harness:
    def __init__(self, data: Path, vfs: PowerCutVFS, cut: LogCut) -> None:
        self.data = data
        self.vfs = vfs
        self.cut = cut
        self.schema_changes = True
        self.evict_some = True
        # small segments: the log moves to a new (zero-filled) segment within a seed
        self.config = ActorConfig(
            vfs=vfs.vfs_name, log_checkpoint_interval_s=0.05, log_segment_bytes=SEGMENT_BYTES
        )

    def durability(self) -> LogDurability:
        def sync(actor: Actor) -> None:
            self.vfs.sync_path(actor.path + "-wal")

        return LogDurability(self.config, sync=sync)

    def power_cut(self) -> None:
        self.vfs.cut()
        self.cut.is_cut = True

    def restore(self) -> None:
        self.vfs.restore()
        self.cut.restore(self.data / "log")


@pytest.fixture
def harness(tmp_path: Path, powercut: PowerCutVFS, monkeypatch: pytest.MonkeyPatch) -> Harness:
    cut = LogCut()
    monkeypatch.setattr(shardlog_module, "os", cut)
    return Harness(tmp_path, powercut, cut)


class Acked:
    """What the writers were told had happened."""

    def __init__(self) -> None:
        self.rows: set[tuple[str, int]] = set()
        self.kv: dict[tuple[str, str], int] = {}
        self.tables: set[tuple[str, str]] = set()


async def run_until_cut(h: Harness, seed: int) -> Acked:
    rng = random.Random(seed)
    acked = Acked()
    keys = [f"key-{i}" for i in range(KEYS)]
    cut_after = rng.randint(20, 400)
    writers = WRITERS
    if h.evict_some and seed % 2:
        # half the seeds also evict: few writers, so actors fall idle and are closed
        # (keeping a started WAL beside the file) and reopened all the time
        h.config = msgspec.structs.replace(h.config, max_open_actors=2)
        writers = 3
    if seed % 3 == 2:  # segments appended to, not zero-filled ahead (--log-init-zero off)
        h.config = msgspec.structs.replace(h.config, log_init_zero=False)
    if seed % 4 == 1:  # an actor checkpoint every few writes: each WAL restarts, reused
        h.config = msgspec.structs.replace(h.config, checkpoint_wal_bytes=6 * 4096)
    per_commit = h.config.log_batches_per_commit
    if seed % 5 >= 2:  # files commit every few batches, and at checkpoints (_filetxn.py)
        per_commit = (2, 8, 64)[seed % 3]
        h.config = msgspec.structs.replace(h.config, log_batches_per_commit=per_commit)
    async with open_actor_pool(h.config, str(h.data), h.durability()) as pool:
        for key in keys:
            await pool.call(
                key, Sql("CREATE TABLE t(id INTEGER, part TEXT, PRIMARY KEY (id, part))")
            )

        async def writer(w: int) -> None:
            wrng = random.Random(seed * 1000 + w)
            for i in range(10_000):
                if h.cut.is_cut:
                    return
                key = wrng.choice(keys)
                n = w * 1_000_000 + i
                roll = wrng.random()
                if roll < 0.8:  # two rows in one atomic call
                    await pool.call(
                        key,
                        Batch(
                            [
                                Statement("INSERT INTO t VALUES (?, 'a')", [n]),
                                Statement("INSERT INTO t VALUES (?, 'b')", [n]),
                            ]
                        ),
                    )
                    record = ("rows", (key, n))
                elif roll < 0.83:
                    # fails, and SQLite rolls back the whole transaction (OR ROLLBACK):
                    # with files committing every few batches, the earlier ones go too
                    # and must be put back (_filetxn.py); nothing of it is acknowledged
                    with contextlib.suppress(Error):
                        await pool.call(
                            key, Sql("INSERT OR ROLLBACK INTO t SELECT id, part FROM t LIMIT 1")
                        )
                    continue
                elif roll < 0.95 or not h.schema_changes:
                    name = f"w{w}"
                    await pool.call(key, KvPut(name, n))
                    record = ("kv", (key, name, n))
                else:  # a schema change: the unlogged path (the file is synced instead)
                    table = f"extra_{w}_{i}"
                    await pool.call(key, Sql(f"CREATE TABLE {table}(x)"))
                    record = ("table", (key, table))
                if h.cut.is_cut:
                    return  # the reply raced the cut: not counted
                kind, value = record
                if kind == "rows":
                    acked.rows.add(value)  # type: ignore[arg-type]
                elif kind == "kv":
                    k, name, v = value  # type: ignore[misc]
                    acked.kv[(k, name)] = v
                else:
                    acked.tables.add(value)  # type: ignore[arg-type]
                if len(acked.rows) + len(acked.kv) + len(acked.tables) >= cut_after:
                    h.power_cut()
                    return
                if wrng.random() < 0.01:
                    await trio.sleep(0.002)  # let the checkpointer and trimming run too

        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(writer, w)
        checkpoints = pool.statistics()["checkpoints"]
    if seed % 4 == 1 and per_commit == 1:  # (fewer commits: the WAL may not fill in time)
        assert checkpoints > 0, f"seed {seed}: no WAL was checkpointed and reused"
    h.restore()
    return acked


async def check_after_recovery(h: Harness, acked: Acked, seed: int) -> None:
    keys = [f"key-{i}" for i in range(KEYS)]
    async with open_actor_pool(ActorConfig(), str(h.data)) as pool:
        present: dict[tuple[str, int], set[str]] = {}
        for key in keys:
            rows = (await pool.call(key, Sql("SELECT id, part FROM t"))).rows
            for n, part in rows:
                present.setdefault((key, n), set()).add(part)
            check = await pool.call(key, Sql("PRAGMA integrity_check"))
            assert check.rows == [("ok",)], f"seed {seed}: {key} is damaged"
        lost = acked.rows - present.keys()
        assert not lost, f"seed {seed}: acknowledged writes lost: {sorted(lost)[:5]}"
        half = [k for k, parts in present.items() if parts != {"a", "b"}]
        assert not half, f"seed {seed}: half-applied calls: {half[:5]}"
        for (key, name), value in acked.kv.items():
            try:
                got = (await pool.call(key, KvGet(name))).value
            except NotFound:
                got = None
            # a later write by the same writer may have landed without its reply
            assert got is not None and got >= value, f"seed {seed}: KV {key}/{name} lost"
        for key, table in acked.tables:
            found = await pool.call(
                key, Sql("SELECT count(*) FROM sqlite_schema WHERE name = ?", [table])
            )
            assert found.rows == [(1,)], f"seed {seed}: table {table} of {key} lost"


@pytest.mark.parametrize("seed", range(QUICK_SEEDS))
async def test_power_cut_loses_no_acknowledged_write_with_the_shard_log(
    harness: Harness, seed: int
) -> None:
    acked = await run_until_cut(harness, seed)
    await check_after_recovery(harness, acked, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(QUICK_SEEDS, QUICK_SEEDS + SLOW_SEEDS))
async def test_power_cut_soak(harness: Harness, seed: int) -> None:
    acked = await run_until_cut(harness, seed)
    await check_after_recovery(harness, acked, seed)


async def test_power_cut_negative_control_unsynced_log_loses_writes(harness: Harness) -> None:
    """The same cut with a log that never reaches the disk loses acknowledged writes:
    the check above can fail, and the files alone do not hold acknowledged writes."""
    harness.cut.fdatasync = lambda fd: None  # type: ignore[method-assign]
    harness.schema_changes = False  # no file syncs: only the log could have kept them
    harness.evict_some = False  # nor closes
    harness.config = ActorConfig(vfs=harness.vfs.vfs_name, log_checkpoint_interval_s=3600)
    acked = await run_until_cut(harness, seed=7)
    keys = [f"key-{i}" for i in range(KEYS)]
    async with open_actor_pool(ActorConfig(), str(harness.data)) as pool:
        present = set()
        for key in keys:
            try:
                rows = (await pool.call(key, Sql("SELECT id FROM t"))).rows
            except Exception:
                rows = []
            present |= {(key, n) for (n,) in rows}
    assert acked.rows - present


async def test_a_retried_call_with_the_same_idempotency_key_applies_once(pool: Any) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
    op = Sql("INSERT INTO t(v) VALUES ('once') RETURNING id")
    first = await pool.call("k", op, idempotency_key="req-1")
    again = await pool.call("k", op, idempotency_key="req-1")
    assert again == first
    assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(1,)]
    other = await pool.call("k", op, idempotency_key="req-2")
    assert other.rows != first.rows
    from shardlite.actor import BadRequest

    with pytest.raises(BadRequest, match="different request"):
        await pool.call("k", Sql("DELETE FROM t"), idempotency_key="req-1")


async def test_a_failed_call_stores_nothing_under_its_idempotency_key(pool: Any) -> None:
    from shardlite.actor import Constraint

    await pool.call("k", Sql("CREATE TABLE t(v UNIQUE)"))
    await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
    op = Sql("INSERT INTO t VALUES (1)")
    with pytest.raises(Constraint):
        await pool.call("k", op, idempotency_key="dup")
    await pool.call("k", Sql("DELETE FROM t"))
    assert (await pool.call("k", op, idempotency_key="dup")).changes == 1


async def test_idempotency_keys_survive_a_power_cut_and_recovery(harness: Harness) -> None:
    """The key is written with the call's rows, logged with them, replayed with them."""
    op = Sql("INSERT INTO t(v) VALUES ('x') RETURNING id")
    async with open_actor_pool(harness.config, str(harness.data), harness.durability()) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
        first = await pool.call("k", op, idempotency_key="retry-me")
        harness.power_cut()
    harness.restore()
    async with open_actor_pool(ActorConfig(), str(harness.data)) as pool:
        again = await pool.call("k", op, idempotency_key="retry-me")
        assert again == first
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(1,)]


async def test_a_log_flush_never_releases_a_batch_that_is_not_in_the_log(tmp_path: Path) -> None:
    """A schema change is made durable by its own file's sync; a log flush of another
    actor's (later) record must not release its reply meanwhile."""
    import threading

    held = threading.Event()
    armed = False

    def sync(actor: Actor) -> None:  # the file sync, in a worker thread
        if armed and actor.key == "a":
            held.wait(10)

    config = ActorConfig()
    async with open_actor_pool(config, str(tmp_path), LogDurability(config, sync=sync)) as pool:
        await pool.call("a", Sql("SELECT 1"))
        await pool.call("b", Sql("CREATE TABLE t(v)"))
        armed = True
        replies: list[str] = []

        async def schema_change() -> None:
            await pool.call("a", Sql("CREATE TABLE u(v)"))
            replies.append("a")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(schema_change)
            await trio.testing.wait_all_tasks_blocked()
            await pool.call("b", Sql("INSERT INTO t VALUES (1)"))  # logged, flushed
            assert replies == []
            held.set()
        assert replies == ["a"]


async def test_the_log_stays_bounded_and_recovery_after_trimming_loses_nothing(
    harness: Harness,
) -> None:
    harness.config = ActorConfig(
        vfs=harness.vfs.vfs_name,
        log_segment_bytes=32 * 1024,
        log_trim_bytes=128 * 1024,
        log_checkpoint_interval_s=0.1,
    )
    durability = harness.durability()
    keys = [f"key-{i}" for i in range(8)]
    acked: set[tuple[str, int]] = set()
    biggest = 0
    async with open_actor_pool(harness.config, str(harness.data), durability) as pool:
        for key in keys:
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
        for n in range(3000):  # about 1 MB of log in all, many times the bound
            key = keys[n % len(keys)]
            await pool.call(key, Sql("INSERT INTO t VALUES (?, ?)", [n, "x" * 200]))
            acked.add((key, n))
            if n % 100 == 0:
                biggest = max(biggest, durability.shards[str(harness.data)].log.size_bytes())
                await trio.sleep(0.01)  # let the checkpointer run
        stats = durability.statistics()
        harness.power_cut()
    harness.restore()
    assert stats["trimmed_segments"] > 0
    assert stats["zero_filled_segments"] > 1  # segments after the first were prepared ahead
    assert biggest < 8 * 128 * 1024, f"the log grew to {biggest} bytes"
    async with open_actor_pool(ActorConfig(), str(harness.data)) as pool:
        present = set()
        for key in keys:
            present |= {(key, n) for (n,) in (await pool.call(key, Sql("SELECT id FROM t"))).rows}
    assert acked <= present


class FailOneSync:
    """Stands in for ``os`` in the shard log: once ``armed``, its next fdatasync fails
    (EIO), after ``release`` is set if one is given (``entered`` tells it has begun)."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.armed = self.failed = False
        self.entered, self.release = threading.Event(), release

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        if self.armed and not self.failed:
            self.failed = True
            self.entered.set()
            if self.release is not None:
                self.release.wait(10)
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)


async def test_a_file_evicted_without_a_sync_is_synced_before_the_log_is_trimmed(
    harness: Harness,
) -> None:
    """An eviction closes a file with a short WAL inline, with no checkpoint and no sync
    (Actor.close_quick). Its records stay in the log until a checkpoint pass has synced
    the closed file; after that pass, a power cut that drops everything unsynced loses
    nothing, though the log was trimmed past those records."""
    harness.config = ActorConfig(
        vfs=harness.vfs.vfs_name,
        max_open_actors=1,
        log_segment_bytes=SEGMENT_BYTES,
        log_checkpoint_interval_s=3600,
    )
    durability = harness.durability()
    keys = ["a", "b"]
    async with open_actor_pool(harness.config, str(harness.data), durability) as pool:
        for key in keys:
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
        for n in range(60):  # keys in turn: every call evicts the other key's actor
            await pool.call(keys[n % 2], Sql("INSERT INTO t VALUES (?, ?)", [n, "x" * 100]))
        assert pool.statistics()["evicted"] >= 60
        shard = durability.shards[str(harness.data)]
        closed = [a for a in shard.unsynced if a.conn is None]
        # one per quick close (a reopened key is a new Actor, the closed one waits
        # here); every few evictions a WAL past QUICK_CLOSE_WAL_BYTES closes the slow way
        assert len(closed) >= 30 and all(a.closed_unsynced for a in closed)
        segments = len(list((harness.data / "log").glob("*.log")))
        await durability.checkpoint_shard(shard)
        assert not [a for a in shard.unsynced if a.conn is None]
        assert durability.statistics()["trimmed_segments"] > 0, segments
        harness.power_cut()
    harness.restore()
    async with open_actor_pool(ActorConfig(), str(harness.data)) as pool:
        for i, key in enumerate(keys):
            rows = (await pool.call(key, Sql("SELECT id FROM t ORDER BY id"))).rows
            assert rows == [(n,) for n in range(i, 60, 2)]


async def test_a_failed_log_write_fails_its_replies_and_the_log_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardlite.actor import Internal

    failing = FailOneSync()
    monkeypatch.setattr(shardlog_module, "os", failing)
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        failing.armed = True
        with pytest.raises(Internal, match="may or may not"):
            await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
        await pool.call("k", Sql("INSERT INTO t VALUES (2)"))
        assert pool.durability.statistics()["failures"] == 1
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        rows = (await pool.call("k", Sql("SELECT v FROM t ORDER BY v"))).rows
        assert (2,) in rows  # acknowledged; 1 may or may not be there


async def test_after_a_failed_log_write_no_later_record_of_its_actor_reaches_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch committed while the round before it was failing builds on a write that may
    be lost. Its reply fails too, and its record is dropped: a record in the log must
    follow one the log or the file holds durably, or recovery after a crash would refuse
    the shard (or, without the check, apply it over a state without the lost write)."""
    from shardlite.actor import Internal

    release = threading.Event()  # set once the next batch has committed
    failing = FailOneSync(release)
    monkeypatch.setattr(shardlog_module, "os", failing)
    results: dict[int, Any] = {}

    async def insert(pool: Any, v: int) -> None:
        try:
            results[v] = await pool.call("k", Sql("INSERT INTO t VALUES (?)", [v]))
        except Internal as exc:
            results[v] = exc

    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        failing.armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(insert, pool, 1)
            await trio.to_thread.run_sync(failing.entered.wait)
            nursery.start_soon(insert, pool, 2)
            shard = pool.durability.shards[str(tmp_path)]
            with trio.fail_after(10):
                while not shard.buffer:  # its record waits for the next round
                    await trio.sleep(0.001)
            release.set()
        await pool.call("k", Sql("INSERT INTO t VALUES (3)"))
    assert isinstance(results[1], Internal) and isinstance(results[2], Internal)
    log = shardlog_module.ShardLog(str(tmp_path / "log"))
    recovered = log.open()
    log.close()
    images = [msgspec.msgpack.decode(r.payload) for r in recovered.records["k"]]
    assert not any(row == [2] for image in images for _, rows in image for _, row in rows)
    assert any(row == [3] for image in images for _, rows in image for _, row in rows)


async def test_a_checkpointer_sync_from_before_an_unlogged_batch_does_not_stand_for_its_sync(
    tmp_path: Path,
) -> None:
    """A checkpointer pass takes an actor's last LSN, syncs its file in a thread, then
    calls ``file_durable`` with that LSN. If a schema change (no log record: its own
    file sync must make it durable) committed meanwhile, that call must not clear the
    actor's pending sync: the power-cut soak found the batch after it logged with a
    ``prev`` that neither the file nor the log held."""
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
        actor = pool._actors["k"]
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        before = actor.last_lsn
        actor.last_lsn = before + 1  # the unlogged batch, committed after the sync began
        actor.needs_file_sync = True
        durability.file_durable(actor, before)
        assert actor.needs_file_sync
        durability.file_durable(actor, before + 1)
        assert not actor.needs_file_sync
        actor.last_lsn = before


async def test_many_files_are_made_durable_with_one_syncfs_and_the_log_trimmed(
    tmp_path: Path,
) -> None:
    """The default sync path: 16 files or more to sync take one syncfs(2), after which
    none is left unsynced and the log is trimmed below all of them."""
    config = ActorConfig(log_segment_bytes=16 * 1024, log_checkpoint_interval_s=3600)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        keys = [f"many-{i}" for i in range(40)]
        for key in keys:
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
        for n in range(400):
            await pool.call(keys[n % len(keys)], Sql("INSERT INTO t VALUES (?, ?)", [n, "x" * 100]))
        shard = durability.shards[str(tmp_path)]
        assert len(shard.unsynced) == len(keys) and len(shard.log.segments) > 1
        await durability.checkpoint_shard(shard)
        stats = durability.statistics()
        assert stats["syncfs_calls"] == 1 and stats["unsynced_actors"] == 0
        assert stats["trimmed_segments"] > 0 and len(shard.log.segments) == 1


async def test_a_syncfs_pass_runs_in_slices_and_leaves_writes_made_during_it_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bookkeeping after a syncfs (10,000 files: 10s of ms) runs in slices with the
    loop free between them. A write that lands while the syncfs runs is not covered by
    it: its actor stays unsynced from that write's LSN, and the log keeps the record."""
    import shardlite.actor._logcheckpoint as logcheckpoint_module

    monkeypatch.setattr(logcheckpoint_module, "DURABLE_SLICE", 7)
    config = ActorConfig(log_checkpoint_interval_s=3600)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        keys = [f"slice-{i}" for i in range(40)]
        for key in keys:  # a table (synced in its file), then a logged row
            await pool.call(key, Sql("CREATE TABLE t(v)"))
            await pool.call(key, Sql("INSERT INTO t VALUES ('early')"))
        late = keys[len(keys) // 2]

        others = [pool._actors[k] for k in keys if k != late]
        synced_seen: list[int] = []  # files done, as other tasks see it during the pass
        synced_done = False

        def syncfs_then_write(directory: str) -> None:
            nonlocal synced_done
            syncfs(directory)
            trio.from_thread.run(pool.call, late, Sql("INSERT INTO t VALUES ('late')"))
            synced_done = True

        async def watch() -> None:
            while True:
                await trio.lowlevel.checkpoint()
                if synced_done:
                    synced_seen.append(sum(a.file_lsn == a.last_lsn for a in others))

        monkeypatch.setattr(logcheckpoint_module, "syncfs", syncfs_then_write)
        shard = durability.shards[str(tmp_path)]
        actor = pool._actors[late]
        covered = actor.last_lsn
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await durability.checkpoint_shard(shard)
            nursery.cancel_scope.cancel()
        # the loop ran between slices: other tasks saw some files done and some not yet
        assert any(0 < n < len(others) for n in synced_seen), synced_seen
        assert actor.last_lsn > covered  # the late write
        assert list(shard.unsynced.items()) == [(actor, covered + 1)]
        assert actor.file_lsn == covered
        assert all(a.file_lsn == a.last_lsn for a in others)
        assert durability.statistics()["syncfs_calls"] == 1
        assert shard.log.segments[0][0] <= actor.last_lsn  # its record is kept


def test_records_reserved_before_a_segment_switch_are_read_back_from_the_next_segment(
    tmp_path: Path,
) -> None:
    """The flusher writes a round while the loop reserves LSNs for the next one; when the
    round fills the segment, the next segment must start at the first of those LSNs
    (the header says every record in it has a larger or equal LSN), or recovery drops
    them as out of order."""
    log = shardlog_module.ShardLog(str(tmp_path), 256)
    log.open()
    first, second, third = log.reserve(), log.reserve(), log.reserve()
    log.write(shardlog_module.encode_record(first, "k", b"a" * 300, prev=0), first)  # fills it
    assert len(log.segments) == 2
    log.write(
        shardlog_module.encode_record(second, "k", b"b", prev=first)
        + shardlog_module.encode_record(third, "k", b"c", prev=second),
        third,
    )
    log.close()
    again = shardlog_module.ShardLog(str(tmp_path), 256)
    recovered = again.open()
    again.close()
    assert [r.payload for r in recovered.records["k"]] == [b"a" * 300, b"b", b"c"]
    assert recovered.torn == 0


async def test_recovery_makes_the_replayed_files_durable_with_one_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery replays what each file lacks, keeps each WAL as it is, and then makes
    them all durable with one syncfs, not with a checkpoint (two fsyncs) per file."""
    config = ActorConfig(log_checkpoint_interval_s=3600)
    keys = [f"rec-{i}" for i in range(20)]
    async with open_actor_pool(config, str(tmp_path)) as pool:
        for key in keys:
            await pool.call(key, Sql("CREATE TABLE t(v)"))
    files = {}
    for key in keys:
        (path,) = tmp_path.rglob(f"{key}.db")
        files[key] = (path, path.read_bytes())  # each file before its INSERT
    async with open_actor_pool(config, str(tmp_path)) as pool:
        for key in keys:
            await pool.call(key, Sql("INSERT INTO t VALUES (?)", [key]))
    for path, before in files.values():  # the files lose the INSERT; the log keeps it
        path.write_bytes(before)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    synced = []
    monkeypatch.setattr(logrecovery_module, "syncfs", lambda d: synced.append(d) or syncfs(d))
    async with open_actor_pool(config, str(tmp_path)) as pool:
        durability = pool.durability
        assert isinstance(durability, LogDurability)
        await durability.wait_recovered()  # it runs while the shard serves
        assert synced == [str(tmp_path)]
        assert durability.recovered_actors == len(keys)
        for path, _ in files.values():  # replayed into the WAL, not checkpointed
            assert os.path.getsize(f"{path}-wal") > 0
        for key in keys:
            assert (await pool.call(key, Sql("SELECT v FROM t"))).rows == [(key,)]


class _DiskFullVFS(apsw.VFS):
    """Writes to a WAL fail with SQLITE_FULL while ``full`` is set."""

    def __init__(self, name: str) -> None:
        self.vfs_name = name
        self.full = False
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        return _DiskFullFile(self, name, flags)


class _DiskFullFile(apsw.VFSFile):
    def __init__(self, vfs: _DiskFullVFS, name: Any, flags: list[int]) -> None:
        self._vfs = vfs
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        self._wal = str(path).endswith("-wal")
        super().__init__("", name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:
        if self._vfs.full and self._wal:
            raise apsw.FullError("the disk is full (test)")
        super().xWrite(data, offset)


async def test_a_commit_that_fails_leaves_no_record_for_recovery_to_replay(tmp_path: Path) -> None:
    """COMMIT can fail after the batch's record was put in the log's buffer (a full disk
    when the WAL is written): the client is told the write failed, so the record must
    not reach the log, or recovery would apply the write the client saw fail."""
    vfs = _DiskFullVFS(f"diskfull-{os.getpid()}")
    # each batch commits its file (with more batches to a commit, a full disk fails the
    # file's commit instead, after the batches were acknowledged: test_filetxn.py)
    config = ActorConfig(vfs=vfs.vfs_name, log_checkpoint_interval_s=3600, log_batches_per_commit=1)
    try:
        async with open_actor_pool(config, str(tmp_path)) as pool:
            await pool.call("k", Sql("CREATE TABLE t(v)"))
            await pool.call("k", Sql("INSERT INTO t VALUES (1)"))
            vfs.full = True
            with pytest.raises(Error):  # 507, as for a full quota
                await pool.call("k", Sql("INSERT INTO t VALUES (2)"))
            vfs.full = False
            assert (await pool.call("k", Sql("SELECT v FROM t"))).rows == [(1,)]
            await pool.call("other", Sql("CREATE TABLE t(v)"))  # the shard's log goes on
            await pool.call("other", Sql("INSERT INTO t VALUES (3)"))
        async with open_actor_pool(config, str(tmp_path)) as pool:  # recovery
            assert (await pool.call("k", Sql("SELECT v FROM t"))).rows == [(1,)]
            assert (await pool.call("other", Sql("SELECT v FROM t"))).rows == [(3,)]
    finally:
        vfs.unregister()
