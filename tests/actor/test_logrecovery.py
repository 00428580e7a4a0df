"""durability=log: recovery runs while the shard serves (actor/_logrecovery.py).

A restart reads the shard log and serves at once; a background task brings each key's
file up to the records the log held, and a key opened before its turn is brought up
first. The log is kept whole until every such file is durable. The crashes here are the
files as a kill -9 leaves them: copied aside while the pool is open, before any close
commits the batches its files' transactions hold (``log_batches_per_commit``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio

import shardlite.actor._logrecovery as logrecovery_module
from shardlite.actor import (
    ActorConfig,
    LogDurability,
    Sql,
    Unavailable,
    open_actor_pool,
    resolve_actor_path,
)
from shardlite.actor._logrecovery import LogRecoveryMixin
from shardlite.actor._recovery import RecoveryFailed

from .waiting import wait_until

CONFIG = ActorConfig(
    log_batches_per_commit=64, log_checkpoint_interval_s=3600, log_segment_bytes=4096
)
KEYS = [f"lazy-{i}" for i in range(12)]
ROWS = 5


async def _crashed_copy(tmp_path: Path) -> Path:
    """A shard whose files lack every key's INSERTs (the log alone holds them)."""
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    async with open_actor_pool(CONFIG, str(data)) as pool:
        for key in KEYS:
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"))
            for n in range(ROWS):
                await pool.call(key, Sql("INSERT INTO t VALUES (?, ?)", [n, key]))
        shutil.copytree(data, crashed)  # the files as a crash leaves them
    return crashed


async def _count(pool: Any, key: str) -> int:
    rows = (await pool.call(key, Sql("SELECT count(*) FROM t WHERE v = ?", [key]))).rows
    return int(rows[0][0])


def _hold_background_recovery(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """The background recovery waits for the returned event (set it to let it go)."""
    go = trio.Event()
    original = LogRecoveryMixin._run_recovery

    async def held(self: LogRecoveryMixin, shard: Any) -> None:
        await go.wait()
        await original(self, shard)

    monkeypatch.setattr(LogRecoveryMixin, "_run_recovery", held)
    return go


def _log_durability(pool: Any) -> LogDurability:
    durability = pool.durability
    assert isinstance(durability, LogDurability)
    return durability


async def test_a_restart_serves_every_key_before_the_background_recovery_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = await _crashed_copy(tmp_path)
    go = _hold_background_recovery(monkeypatch)
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        durability = _log_durability(pool)
        shard = durability.shards[str(crashed)]
        assert durability.statistics()["recovering_actors"] == len(KEYS)
        assert shard.replay_floor is not None and not shard.recovered.is_set()

        # a key is brought up to the log when it is first called, ahead of the others
        assert await _count(pool, KEYS[0]) == ROWS
        assert durability.statistics()["recovering_actors"] == len(KEYS) - 1
        assert durability.recovered_actors == 1

        # so is a key an exclusive call copies first (backups, moves)
        copy = await pool.snapshot(KEYS[1], str(tmp_path))
        assert copy is not None
        conn = apsw.Connection(copy[0])
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(ROWS,)]
        conn.close()

        # writes go on on top of it, and a checkpoint pass (sync, trim) keeps the log
        # of the keys not brought up yet: a second crash now loses none of them
        await pool.call(KEYS[0], Sql("INSERT INTO t VALUES (?, ?)", [ROWS, KEYS[0]]))
        await durability.checkpoint_shard(shard)
        again = tmp_path / "again"
        shutil.copytree(crashed, again)
        assert durability.statistics()["recovering_actors"] == len(KEYS) - 2
        async with open_actor_pool(CONFIG, str(again)) as second:
            for key in KEYS:
                assert await _count(second, key) == (ROWS + 1 if key == KEYS[0] else ROWS)

        go.set()
        await durability.wait_recovered()
        assert durability.statistics()["recovering_actors"] == 0
        assert shard.replay_floor is None
        for key in KEYS:
            assert await _count(pool, key) == (ROWS + 1 if key == KEYS[0] else ROWS)
        size = shard.log.size_bytes()
        await durability.checkpoint_shard(shard)
        assert shard.log.size_bytes() < size  # now the log is trimmed


async def test_a_key_whose_file_cannot_be_written_answers_503_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = await _crashed_copy(tmp_path)
    go = _hold_background_recovery(monkeypatch)
    failing = {KEYS[0]}
    original = logrecovery_module.replay_key

    def replay_key(directory: str, key: str, *args: Any) -> int:
        if key in failing:
            raise RecoveryFailed(f"actor {key!r} could not be brought up (disk I/O error)")
        return original(directory, key, *args)

    monkeypatch.setattr(logrecovery_module, "replay_key", replay_key)
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        durability = _log_durability(pool)
        with pytest.raises(Unavailable) as caught:
            await _count(pool, KEYS[0])
        assert caught.value.retryable and "disk I/O error" in caught.value.message
        assert await _count(pool, KEYS[1]) == ROWS  # the others serve
        assert durability.statistics()["recovering_actors"] == len(KEYS) - 1

        failing.clear()  # the disk is back: the next call brings it up
        assert await _count(pool, KEYS[0]) == ROWS
        go.set()
        await durability.wait_recovered()
        for key in KEYS:
            assert await _count(pool, key) == ROWS


async def test_the_background_recovery_tries_a_failed_key_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = await _crashed_copy(tmp_path)
    monkeypatch.setattr(logrecovery_module, "RECOVERY_RETRY_S", 0.05)
    tries: list[str] = []
    original = logrecovery_module.replay_key

    def replay_key(directory: str, key: str, *args: Any) -> int:
        tries.append(key)
        if tries.count(key) <= 2:  # every key fails twice (a whole chunk fails: a pause)
            raise RecoveryFailed(f"actor {key!r} could not be brought up (disk full)")
        return original(directory, key, *args)

    monkeypatch.setattr(logrecovery_module, "replay_key", replay_key)
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        durability = _log_durability(pool)
        with trio.fail_after(30):
            await durability.wait_recovered()
        assert sorted(set(tries)) == sorted(KEYS) and len(tries) == 3 * len(KEYS)
        assert durability.recovered_actors == len(KEYS)
        for key in KEYS:
            assert await _count(pool, key) == ROWS


async def test_a_detached_shard_holds_in_its_files_what_its_log_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard leaves a server (a move, a split) with its files holding everything:
    detaching finishes its recovery first."""
    crashed = await _crashed_copy(tmp_path)
    _hold_background_recovery(monkeypatch)  # never let go
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        assert await _count(pool, KEYS[0]) == ROWS
        await pool.detach_shard(str(crashed))
    shutil.rmtree(crashed / "log")  # a moved shard's copy has no log
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        for key in KEYS:
            assert await _count(pool, key) == ROWS


def _rows_in_file(shard: Path, key: str) -> int:
    """The rows the key's file holds, read with SQLite alone (no log)."""
    conn = apsw.Connection(resolve_actor_path(str(shard), key), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchall()[0][0])  # type: ignore[arg-type]
    finally:
        conn.close()


async def test_a_detach_that_cannot_bring_a_file_up_returns_its_key_and_keeps_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while a detach brings a file up to the log: the detach goes on (the
    shard must stop serving) but returns the key, so that a split does not carry the
    file away from the only log that holds its writes; the shard's next attach brings
    the file up."""
    crashed = await _crashed_copy(tmp_path)
    _hold_background_recovery(monkeypatch)  # never let go: the detach brings files up
    original = logrecovery_module.replay_key
    failing = {KEYS[1], KEYS[7]}

    def replay_key(directory: str, key: str, *args: Any) -> int:
        if key in failing:
            raise RecoveryFailed(f"actor {key!r} could not be brought up (disk I/O error)")
        return original(directory, key, *args)

    monkeypatch.setattr(logrecovery_module, "replay_key", replay_key)
    sync_closed_files = LogDurability.sync_closed_files
    checkpoints = []

    async def checkpoint_first(self: LogDurability, shard: Any) -> None:
        # the shard's checkpointer runs until the detach closes its log: a pass here,
        # after the detach's recovery, must not trim the records the failed files lack
        await self.checkpoint_shard(shard)
        checkpoints.append(shard.log.segments[0][0])
        await sync_closed_files(self, shard)

    monkeypatch.setattr(LogDurability, "sync_closed_files", checkpoint_first)
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        assert await _count(pool, KEYS[0]) == ROWS
        left = await pool.detach_shard(str(crashed))
    assert len(checkpoints) == 1
    assert sorted(left) == sorted(failing)
    assert [_rows_in_file(crashed, key) for key in sorted(failing)] == [0, 0]
    assert all(_rows_in_file(crashed, key) == ROWS for key in set(KEYS) - failing)
    failing.clear()  # the disk is back
    async with open_actor_pool(CONFIG, str(crashed)) as pool:
        for key in KEYS:
            assert await _count(pool, key) == ROWS
        assert await pool.detach_shard(str(crashed)) == []


async def test_an_alarm_only_the_log_held_fires_without_a_call(tmp_path: Path) -> None:
    """The background recovery hands each file's next alarm to the scheduler: an alarm
    armed in a batch its file lacked, with the alarm index lost too, still fires."""
    from .test_app import APP, call

    config = ActorConfig(
        log_batches_per_commit=64, log_checkpoint_interval_s=3600, call_timeout_s=5.0
    )
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    async with open_actor_pool(config, str(data), app=APP) as pool:
        await call(pool, "alarm-lazy", "arm", "later", 3600)  # creates the alarms table
        await call(pool, "alarm-lazy", "arm", "wake", 1.0)  # in the log alone
        shutil.copytree(data, crashed)
    for index in crashed.glob("alarms.db*"):
        index.unlink()
    async with open_actor_pool(config, str(crashed), app=APP) as pool:
        assert pool.runtime is not None
        scheduler = pool.runtime.scheduler

        async def fired() -> bool:  # no call opens the actor meanwhile
            return scheduler.fired > 0

        await wait_until(fired, timeout=30)
        assert [r[0] for r in await call(pool, "alarm-lazy", "fired")] == ["wake"]
        assert await call(pool, "alarm-lazy", "pending") == ["later"]
