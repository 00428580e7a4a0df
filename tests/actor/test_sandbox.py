"""The SQL sandbox: what a tenant may not do, and that it leaves no trace when refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardlite.actor import (
    ActorConfig,
    ActorPool,
    Error,
    Forbidden,
    QuotaExceeded,
    Sql,
    TooLarge,
    open_actor_pool,
)

DENIED = [
    "ATTACH DATABASE 'other.db' AS other",
    "DETACH DATABASE main",
    "VACUUM INTO '/tmp/shardlite-exfiltrated.db'",
    "SELECT load_extension('/tmp/evil.so')",
    "PRAGMA synchronous = OFF",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA journal_mode",
    "PRAGMA max_page_count = 1000000000",
    "PRAGMA mmap_size = 1000000",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -1000000",
    "PRAGMA writable_schema = ON",
    "PRAGMA trusted_schema = ON",
    "PRAGMA wal_autocheckpoint = 1",
    "PRAGMA locking_mode = NORMAL",
    "PRAGMA schema_version = 1",
    "PRAGMA secure_delete = OFF",
    "PRAGMA query_only = ON",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s",
    "RELEASE s",
    "SELECT * FROM _shardlite_meta",
    "SELECT * FROM _shardlite_kv",
    "UPDATE _shardlite_meta SET value = 'other' WHERE name = 'key'",
    "DELETE FROM _shardlite_kv",
    "DROP TABLE _shardlite_meta",
    "CREATE TABLE _shardlite_mine(a)",
    "CREATE INDEX i ON _shardlite_kv(value)",
    "CREATE TRIGGER tr AFTER INSERT ON _shardlite_kv BEGIN SELECT 1; END",
    "CREATE TEMP TABLE tt(a)",
    "CREATE TEMP VIEW tv AS SELECT 1",
    "CREATE VIRTUAL TABLE d USING dbstat",
    "ATTACH DATABASE 'file:other.db?mode=rwc' AS other",
    "ATTACH DATABASE ':memory:' AS scratch",
    "SELECT * FROM _shardlite_lsn",
    "UPDATE _shardlite_lsn SET lsn = 0",
    "SELECT * FROM _shardlite_idem",
    "INSERT INTO _shardlite_alarms VALUES ('x', 0, NULL, 0)",
    "DELETE FROM _shardlite_workflows",
    "SELECT * FROM sqlite_temp_master",
    "PRAGMA legacy_alter_table = ON",
    "PRAGMA recursive_triggers = ON",
    "PRAGMA foreign_keys = OFF",
    "PRAGMA cell_size_check = OFF",
    "PRAGMA data_store_directory = '/tmp'",
    "PRAGMA temp_store_directory = '/tmp'",
    "PRAGMA key = 'x'",
    "PRAGMA main.page_size = 512",
    "PRAGMA auto_vacuum = FULL",
    "VACUUM",
    "SELECT writefile('/tmp/shardlite-pwned', 'x')",
    "SELECT readfile('/etc/passwd')",
    "SELECT edit('x')",
    "SELECT fts3_tokenizer('simple')",
]


def _files_except(root: Path, mine: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root`` but the actor ``mine``'s own."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith(mine):
            st = path.stat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("sql", DENIED)
async def test_sandbox_refuses(pool: ActorPool, sql: str, tmp_path: Path) -> None:
    await pool.call("bystander", Sql("CREATE TABLE IF NOT EXISTS t(v)"))
    await pool.call("bystander", Sql("INSERT INTO t VALUES ('theirs')"))
    await pool.call("victim", Sql("CREATE TABLE IF NOT EXISTS t(v)"))
    await pool.call("victim", Sql("INSERT INTO t VALUES (1)"))
    before = _files_except(tmp_path, "victim")
    outside = set(os.listdir("/tmp"))
    with pytest.raises(Error) as info:
        await pool.call("victim", Sql(sql))
    assert info.value.code in ("forbidden", "sql_error"), info.value
    assert info.value.message
    # refused means nothing changed, and the actor still serves
    assert (await pool.call("victim", Sql("SELECT count(*) FROM t"))).rows == [(1,)]
    assert (await pool.call("victim", Sql("PRAGMA user_version"))).rows == [(0,)]
    # no other file moved, none appeared outside, and the other tenant's data is intact
    assert _files_except(tmp_path, "victim") == before
    assert not {
        n for n in set(os.listdir("/tmp")) - outside if "shardlite-pwned" in n or "exfiltrated" in n
    }
    assert (await pool.call("bystander", Sql("SELECT v FROM t"))).rows == [("theirs",)]


async def test_functions_in_schema_objects_do_not_run(pool: ActorPool) -> None:
    # a view may name a dangerous function; using it is refused like calling it directly
    await pool.call("schemer", Sql("CREATE VIEW v AS SELECT load_extension('/tmp/evil.so') AS x"))
    with pytest.raises(Error) as info:
        await pool.call("schemer", Sql("SELECT * FROM v"))
    assert info.value.code in ("forbidden", "sql_error")
    await pool.call("schemer", Sql("CREATE TABLE t (a)"))
    await pool.call(
        "schemer",
        Sql("CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT load_extension('/tmp/evil.so'); END"),
    )
    with pytest.raises(Error):
        await pool.call("schemer", Sql("INSERT INTO t VALUES (1)"))
    assert (await pool.call("schemer", Sql("SELECT count(*) FROM t"))).rows == [(0,)]


async def test_denial_message_names_the_problem(pool: ActorPool) -> None:
    with pytest.raises(Forbidden) as info:
        await pool.call("k", Sql("PRAGMA synchronous = OFF"))
    assert "synchronous" in info.value.message
    with pytest.raises(Forbidden) as info:
        await pool.call("k", Sql("ATTACH DATABASE 'x.db' AS x"))
    assert "ATTACH" in info.value.message


async def test_vacuum_into_writes_no_file(pool: ActorPool, tmp_path: Path) -> None:
    target = tmp_path / "stolen.db"
    with pytest.raises(Error):
        await pool.call("k", Sql(f"VACUUM INTO '{target}'"))
    assert not target.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA table_info(t)",
        "SELECT * FROM pragma_table_info('t')",
        "PRAGMA user_version = 7",
        "PRAGMA integrity_check",
        "CREATE VIRTUAL TABLE docs USING fts5(body)",
        "CREATE VIEW v AS SELECT * FROM t",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 5) SELECT sum(x) FROM r",
        "SELECT json_extract('{\"a\": 1}', '$.a')",
        "ANALYZE",
    ],
)
async def test_sandbox_allows_ordinary_sql(pool: ActorPool, sql: str) -> None:
    await pool.call("k", Sql("CREATE TABLE IF NOT EXISTS t(a, b)"))
    await pool.call("k", Sql(sql))


async def test_tenant_cannot_reuse_the_actors_own_commit_statement(pool: ActorPool) -> None:
    """The actor's cached COMMIT must not run for a tenant (SQLite skips the authorizer
    for cached statements): a tenant COMMIT mid-batch would break the batch's atomicity."""
    await pool.call("k", Sql("CREATE TABLE t(v)"))
    for text in ("COMMIT", "commit", "BEGIN", "ROLLBACK"):
        with pytest.raises(Forbidden):
            await pool.call("k", Sql(text))


async def test_quota_gives_quota_exceeded_and_reads_still_work(tmp_path: Path) -> None:
    config = ActorConfig(max_db_bytes=256 * 1024)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"))
        with pytest.raises(QuotaExceeded):
            for _ in range(200):
                await pool.call("k", Sql("INSERT INTO t(v) VALUES (randomblob(8000))"))
        n = (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows[0][0]
        assert 0 < n < 200
        await pool.call("k", Sql("DELETE FROM t"))
        await pool.call("k", Sql("INSERT INTO t(v) VALUES (randomblob(8000))"))


async def test_values_over_the_length_limit_are_too_large(tmp_path: Path) -> None:
    config = ActorConfig(max_value_bytes=10_000)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        for sql in ("SELECT zeroblob(20000)", "SELECT printf('%.*c', 20000, 'x')"):
            with pytest.raises(TooLarge):
                await pool.call("k", Sql(sql))


async def test_symlinked_actor_file_is_refused(pool: ActorPool, tmp_path: Path) -> None:
    from shardlite.actor import key_to_relpath

    secret = tmp_path / "secret.db"
    secret.write_bytes(b"not yours")
    link = tmp_path / key_to_relpath("mallory")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(secret, link)
    with pytest.raises(Error):
        await pool.call("mallory", Sql("SELECT 1"))
    assert secret.read_bytes() == b"not yours"


async def test_file_of_another_key_is_refused(tmp_path: Path) -> None:
    from shardlite.actor import key_to_relpath

    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        await pool.call("alice", Sql("CREATE TABLE secrets(v)"))
        await pool.call("alice", Sql("INSERT INTO secrets VALUES ('alice-only')"))
    # an operator mistake: alice's file (closed, so checkpointed) copied to bob's place
    bob = tmp_path / key_to_relpath("bob")
    bob.parent.mkdir(parents=True, exist_ok=True)
    bob.write_bytes((tmp_path / key_to_relpath("alice")).read_bytes())
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        with pytest.raises(Error) as info:
            await pool.call("bob", Sql("SELECT * FROM secrets"))
        assert info.value.code == "internal"
        assert "belongs to actor 'alice'" in info.value.message
