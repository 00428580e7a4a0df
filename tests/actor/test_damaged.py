"""When the shard log and an actor file disagree. A file recovery cannot bring up to the
log is marked damaged: that key answers 503 (not retryable) until an operator restores
it or accepts what its file holds, and the rest of its shard serves (docs/shardlog.md,
"Damage"). A log whose own files were lost does not hand out LSNs below the files'."""

from __future__ import annotations

import os
from pathlib import Path

import apsw
import pytest

from shardlite.actor import ActorConfig, ActorDamaged, LogDurability, Sql, open_actor_pool
from shardlite.actor._connection import DAMAGED_SUFFIX
from shardlite.actor._keys import resolve_actor_path

# every batch commits its file: the copies taken below hold the rows written before them
CONFIG = ActorConfig(
    log_segment_bytes=4 * 1024, log_checkpoint_interval_s=3600, log_batches_per_commit=1
)


async def _rows(pool: object, key: str) -> list[tuple[object, ...]]:
    return (await pool.call(key, Sql("SELECT id FROM t ORDER BY id"))).rows  # type: ignore[attr-defined]


async def _write_k_and_other(tmp_path: Path, *, trim: bool) -> dict[str, bytes]:
    """k gets rows 1 to 9, ``other`` rows 1 and 2; returns k's file (and WAL) as it was
    after row 1. With ``trim``, the log is trimmed past row 8 first."""
    path = resolve_actor_path(str(tmp_path), "k")
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        for key in ("k", "other"):
            await pool.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
            await pool.call(key, Sql("INSERT INTO t VALUES (1, 'x')"))
        copy = {suffix: Path(path + suffix).read_bytes() for suffix in ("", "-wal")}
        for n in range(2, 9):
            await pool.call("k", Sql("INSERT INTO t VALUES (?, ?)", [n, "x" * 1500]))
        if trim:
            durability = pool.durability
            assert isinstance(durability, LogDurability)
            await durability.checkpoint_shard(durability.shards[str(tmp_path)])
            assert durability.statistics()["trimmed_segments"] > 0
        await pool.call("k", Sql("INSERT INTO t VALUES (9, 'x')"))
        await pool.call("other", Sql("INSERT INTO t VALUES (2, 'x')"))
    return copy


def _put_back(tmp_path: Path, copy: dict[str, bytes]) -> str:
    path = resolve_actor_path(str(tmp_path), "k")
    for suffix in ("-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    for suffix, data in copy.items():
        Path(path + suffix).write_bytes(data)
    return path


async def test_a_hole_in_a_keys_log_marks_that_key_damaged_and_the_shard_serves(
    tmp_path: Path,
) -> None:
    """Each record names the LSN its key's file held before the batch. A file put back
    from an older copy, with the log trimmed past the copy's writes, would take the later
    records' rows over the copy's: rows 1 and 9 without 2 to 8, a state the actor never
    had. Recovery keeps the file as the copy, marks the key, and serves the others."""
    copy = await _write_k_and_other(tmp_path, trim=True)
    path = _put_back(tmp_path, copy)

    for _ in range(2):  # and again after a restart: the mark is durable
        async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
            assert await _rows(pool, "other") == [(1,), (2,)]
            with pytest.raises(ActorDamaged) as caught:
                await _rows(pool, "k")
            err = caught.value
            assert err.status == 503 and err.code == "unavailable" and not err.retryable
            assert "actor 'k' is not served" in err.message
            assert "acknowledged writes between are in neither" in err.message
            assert f"delete {path}{DAMAGED_SUFFIX}" in err.message
            problem = await pool.verify("k")
            assert "acknowledged writes between are in neither" in problem
            assert await pool.verify("other") == ""
            durability = pool.durability
            assert isinstance(durability, LogDurability)
            assert durability.statistics()["damaged_actors"] == 1  # /metrics has it

    # accepting what the file holds: delete the mark; the key serves the copy's rows,
    # and its next writes chain on from its file (no hole found at the next recovery)
    os.unlink(path + DAMAGED_SUFFIX)
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "k") == [(1,)]
        await pool.call("k", Sql("INSERT INTO t VALUES (10, 'x')"))
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "k") == [(1,), (10,)]
    assert not os.path.exists(path + DAMAGED_SUFFIX)


async def test_a_record_that_does_not_apply_marks_the_key_and_a_restore_clears_it(
    tmp_path: Path,
) -> None:
    """A record that cannot apply to its file (here: its table dropped behind the
    server's back) rolls back every record of the key and marks the key; restoring the
    key from a backup is the other remedy, and clears the mark."""
    copy = await _write_k_and_other(tmp_path, trim=False)
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        backup = await pool.snapshot("k", str(tmp_path))
        assert backup is not None
    path = _put_back(tmp_path, copy)
    conn = apsw.Connection(path)
    conn.execute("DROP TABLE t")
    conn.close()

    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "other") == [(1,), (2,)]
        with pytest.raises(ActorDamaged, match="does not apply to its file") as caught:
            await pool.call("k", Sql("SELECT 1"))
        assert "the record changes table 't', which the file lacks" in caught.value.message
        assert "none of its records past" in caught.value.message
        await pool.restore("k", backup[0])
        assert await _rows(pool, "k") == list((n,) for n in range(1, 10))
    assert not os.path.exists(path + DAMAGED_SUFFIX)
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "k") == list((n,) for n in range(1, 10))


async def test_deleting_a_damaged_key_removes_its_mark(tmp_path: Path) -> None:
    copy = await _write_k_and_other(tmp_path, trim=True)
    path = _put_back(tmp_path, copy)
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        with pytest.raises(ActorDamaged):
            await _rows(pool, "k")
        assert await pool.delete("k")
        assert not os.path.exists(path + DAMAGED_SUFFIX)
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
        assert await _rows(pool, "k") == []


async def test_a_split_carries_a_damage_mark_with_its_file(tmp_path: Path) -> None:
    """A split renames the files of half its keys into the new shard: a damaged key's
    mark goes with them (without it the new shard would serve what the file lacks)."""
    from shardlite.shards._split import move_files

    source, target = tmp_path / "source", tmp_path / "target"
    async with open_actor_pool(CONFIG, str(source)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
    Path(resolve_actor_path(str(source), "k") + DAMAGED_SUFFIX).write_text("lost writes\n")
    assert move_files(str(source), str(target), [(0, 16)], 16, log_epoch=1) == 1
    moved = resolve_actor_path(str(target), "k")
    assert Path(moved + DAMAGED_SUFFIX).read_text() == "lost writes\n"
    assert not os.path.exists(resolve_actor_path(str(source), "k") + DAMAGED_SUFFIX)
    async with open_actor_pool(CONFIG, str(target)) as pool:
        with pytest.raises(ActorDamaged, match="is not served: lost writes"):
            await _rows(pool, "k")


async def test_a_lost_log_directory_does_not_make_lsns_go_back(tmp_path: Path) -> None:
    """With its log directory gone, a shard's new log would start at epoch 1 again,
    below the LSNs its actor files hold: recovery would skip the new records and replies
    would leave before their flush. The log's LSNs jump past the file's first."""
    import shutil

    path = resolve_actor_path(str(tmp_path), "k")
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
        for n in range(1, 4):
            await pool.call("k", Sql("INSERT INTO t VALUES (?, 'x')", [n]))
    copy = {s: Path(path + s).read_bytes() for s in ("", "-wal") if os.path.exists(path + s)}
    shutil.rmtree(tmp_path / "log")
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        await pool.call("k", Sql("INSERT INTO t VALUES (4, 'x')"))
    assert list((tmp_path / "log").glob("*.log"))  # the record of row 4 is still there
    _put_back(tmp_path, copy)  # the file as it was before row 4: the log must have it
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "k") == [(1,), (2,), (3,), (4,)]


def test_a_lost_epoch_file_does_not_make_lsns_go_back(tmp_path: Path) -> None:
    from shardlite.actor._shardlog import EPOCH_FILE, SEQ_BITS, ShardLog

    for _ in range(3):
        log = ShardLog(str(tmp_path), 4096)
        log.open()
        log.close()
    (tmp_path / EPOCH_FILE).unlink()
    log = ShardLog(str(tmp_path), 4096)
    log.open()
    assert log.epoch == 4 and log.reserve() >> SEQ_BITS == 4
    log.close()


async def test_unreadable_alarms_do_not_keep_a_key_or_its_shard_from_serving(
    tmp_path: Path,
) -> None:
    """Recovery reads each file's next alarm after applying its records; a damaged page
    there is logged, and the records applied are served."""
    path = resolve_actor_path(str(tmp_path), "k")
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, pad TEXT)"))
    conn = apsw.Connection(path)
    conn.execute("CREATE TABLE _shardlite_alarms(name TEXT PRIMARY KEY, at REAL)")
    conn.execute(
        "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 2000) "
        "INSERT INTO _shardlite_alarms SELECT 'a' || n, n FROM s"
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    copy = {s: Path(path + s).read_bytes() for s in ("", "-wal") if os.path.exists(path + s)}
    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        for n in range(1, 4):
            await pool.call("k", Sql("INSERT INTO t VALUES (?, 'x')", [n]))
    _put_back(tmp_path, copy)  # recovery has rows 1 to 3 to apply
    conn = apsw.Connection(path)
    root = conn.execute(
        "SELECT rootpage FROM sqlite_schema WHERE name = '_shardlite_alarms'"
    ).fetchall()[0][0]
    page_size = conn.execute("PRAGMA page_size").fetchall()[0][0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 64)

    async with open_actor_pool(CONFIG, str(tmp_path)) as pool:
        assert await _rows(pool, "k") == [(1,), (2,), (3,)]
    assert not os.path.exists(path + DAMAGED_SUFFIX)
