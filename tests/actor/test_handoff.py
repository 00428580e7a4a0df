"""A move's copy is exact: copies plus shipped records equal the source (Hypothesis).

The source pool tracks its shard's writes while random operations run (rows of a
rowid table and of a WITHOUT ROWID table, schema changes, KV entries, deletes of whole
actors) and, at random moments, single actors are copied (the backup API) or the
written changes are taken and applied to the copies (records replayed, the rest copied
whole) as a move's catch-up rounds do. At the end every actor the source has must read
the same in the copy, and no other copy may exist.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import apsw
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlite.actor import (
    ActorConfig,
    ActorPool,
    KvList,
    KvPut,
    Sql,
    next_alarm_of_file,
    open_actor_pool,
    resolve_actor_path,
)
from shardlite.shards._shardfiles import apply_records, list_actor_keys

KEYS = ("k0", "k1", "k2")
CONFIG = ActorConfig()

_statement = st.one_of(
    st.tuples(st.just("ins"), st.integers(0, 20), st.text(max_size=8)),
    st.tuples(st.just("upd"), st.integers(0, 20), st.text(max_size=8)),
    st.tuples(st.just("del"), st.integers(0, 20), st.just("")),
    st.tuples(st.just("kv"), st.integers(0, 5), st.text(max_size=8)),
    st.tuples(st.just("rowid"), st.integers(0, 3), st.text(max_size=8)),
    st.tuples(st.just("ddl"), st.just(0), st.just("")),
    st.tuples(st.just("drop"), st.just(0), st.just("")),
    st.tuples(st.just("copy"), st.just(0), st.just("")),
    st.tuples(st.just("catch_up"), st.just(0), st.just("")),
)
_ops = st.lists(st.tuples(st.sampled_from(KEYS), _statement), max_size=40)

SETUP = [
    "CREATE TABLE IF NOT EXISTS p (id INTEGER PRIMARY KEY, v TEXT) STRICT",
    "CREATE TABLE IF NOT EXISTS w (id INTEGER PRIMARY KEY, v TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS r (v TEXT)",  # rowids: the copy must keep them
]


def _sql(kind: str, n: int, text: str) -> tuple[str, list[Any]] | None:
    if kind == "ins":
        return "INSERT OR REPLACE INTO w (id, v) VALUES (?, ?)", [n, text]
    if kind == "upd":
        return "UPDATE p SET v = ? WHERE id % 3 = ? % 3", [text, n]
    if kind == "del":
        return "DELETE FROM w WHERE id = ?", [n]
    if kind == "rowid":
        return "INSERT INTO r (v) VALUES (?)", [f"{n}:{text}"]
    if kind == "ddl":
        return "CREATE TABLE IF NOT EXISTS extra (x INTEGER PRIMARY KEY)", []
    return None


async def _contents(pool: ActorPool, key: str) -> Any:
    tables = await pool.call(
        key,
        Sql(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE "
            "'\\_shardlite%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY 1"
        ),
    )
    out: dict[str, Any] = {}
    for (name,) in tables.rows:
        query = (
            f"SELECT rowid, * FROM {name} ORDER BY rowid"
            if name == "r"
            else f"SELECT * FROM {name} ORDER BY 1"
        )
        out[name] = (await pool.call(key, Sql(query))).rows
    out["kv"] = (await pool.call(key, KvList("", 100))).items
    return out


async def _copy(pool: ActorPool, key: str, dst: Path, scratch: str) -> None:
    target = resolve_actor_path(str(dst), key)
    got = await pool.snapshot(key, scratch)
    if got is None:
        for suffix in ("", "-wal"):
            if os.path.exists(target + suffix):
                os.unlink(target + suffix)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(got[0], target)


async def _scenario(ops: list[Any], root: Path) -> None:
    src, dst, scratch = root / "src", root / "dst", str(root / "scratch")
    os.makedirs(scratch)
    copied: set[str] = set()
    async with open_actor_pool(CONFIG, str(src)) as pool:
        pool.track_writes(str(src))

        async def catch_up() -> None:
            records, whole = pool.take_written(str(src))
            have = {k: v for k, v in records.items() if k in copied}
            failed = apply_records(str(dst), have, CONFIG, {})
            for key in {*whole, *failed, *(set(records) - set(have))}:
                await _copy(pool, key, dst, scratch)
                copied.add(key)

        for key, (kind, n, text) in ops:
            if kind == "copy":
                await _copy(pool, key, dst, scratch)
                copied.add(key)
            elif kind == "catch_up":
                await catch_up()
            elif kind == "drop":
                await pool.delete(key)
            elif kind == "kv":
                await pool.call(key, KvPut(f"n{n}", text))
            else:
                for statement in SETUP:
                    await pool.call(key, Sql(statement))
                if kind == "upd":
                    await pool.call(
                        key, Sql("INSERT OR IGNORE INTO p (id, v) VALUES (?, ?)", [n, text])
                    )
                sql = _sql(kind, n, text)
                assert sql is not None
                await pool.call(key, Sql(*sql))
        for key in list_actor_keys(str(src), pool.keys_by_path(str(src))):  # the listing
            if key not in copied:
                await _copy(pool, key, dst, scratch)
                copied.add(key)
        await catch_up()  # the last round, under the fence
        expected = {k: await _contents(pool, k) for k in list_actor_keys(str(src), {})}
    assert set(list_actor_keys(str(dst), {})) == set(expected)
    async with open_actor_pool(CONFIG, str(dst)) as copy:
        for key, contents in expected.items():
            assert await _contents(copy, key) == contents, key


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_copies_plus_shipped_records_equal_the_source(ops: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        trio.run(_scenario, ops, Path(root))


async def test_catch_up_ships_records_not_files(pool: ActorPool, tmp_path: Path) -> None:
    src = os.path.dirname(pool.path_of("a"))
    src = os.path.dirname(src)
    dst, scratch = tmp_path / "dst", tmp_path / "scratch"
    os.makedirs(scratch)
    await pool.call("a", Sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT) STRICT"))
    pool.track_writes(src)
    await _copy(pool, "a", dst, str(scratch))
    for i in range(50):
        await pool.call("a", Sql("INSERT INTO t (v) VALUES (?)", [f"v{i}"]))
    await pool.call("b", KvPut("x", 1))  # created since the listing: no copy to replay into
    records, whole = pool.take_written(src)
    assert len(records["a"]) == 50 and whole == [] and "b" in records
    assert apply_records(str(dst), records, CONFIG, {}) == ["b"]
    await pool.call("a", Sql("ALTER TABLE t ADD COLUMN w TEXT"))  # no record describes DDL
    await pool.delete("b")
    records, whole = pool.take_written(src)
    assert records == {} and whole == ["a", "b"]
    pool.untrack_writes(src)


def test_the_next_alarm_of_a_closed_file_counts_what_only_its_wal_holds(tmp_path: Path) -> None:
    """A file closed without a checkpoint (crash recovery keeps the WALs) may hold its
    last alarm change only in its WAL; a split reads the alarm of each file it moves."""
    path = str(tmp_path / "closed.db")
    conn = apsw.Connection(path)
    assert conn.pragma("locking_mode", "EXCLUSIVE") == "exclusive"  # as actors: no -shm
    assert conn.pragma("journal_mode", "WAL") == "wal"
    conn.execute("CREATE TABLE _shardlite_alarms(at REAL)")
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)  # the table is in the file
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.execute("INSERT INTO _shardlite_alarms VALUES (1234.5)")  # only in the WAL
    conn.close()
    wal = os.path.getsize(path + "-wal")
    assert wal > 0
    assert next_alarm_of_file(path) == 1234.5
    assert os.path.getsize(path + "-wal") == wal and not os.path.exists(path + "-shm")
    assert next_alarm_of_file(str(tmp_path / "missing.db")) is None
    conn = apsw.Connection(path)  # checkpointed and closed: a bare file, as a staged copy
    conn.execute("SELECT count(*) FROM _shardlite_alarms").fetchall()
    conn.close()
    assert not os.path.exists(path + "-wal")
    assert next_alarm_of_file(path) == 1234.5
    assert not os.path.exists(path + "-wal")  # reading it made nothing beside it
