"""The Python clients against a real server: sync over rpc:// and http://, async under trio
and asyncio, typed errors, and many concurrent requests on one async client."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio

import shardlite
from shardlite.actor import key_to_relpath
from shardlite.actor._connection import DAMAGED_SUFFIX

SERVER_ARGS = (
    "--max-request-bytes",
    "256KiB",
    "--statement-timeout",
    "200ms",
    "--max-db-bytes",
    "256KiB",
)
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
_keys = itertools.count()


@pytest.fixture(params=["rpc", "http"])
def url(request: pytest.FixtureRequest, module_server: Any) -> str:
    return str(module_server.rpc_url if request.param == "rpc" else module_server.http_url)


@pytest.fixture
def key() -> str:
    return f"client-{next(_keys)}"


# error cases: (statement, params, the exception class, its code)
ERROR_CASES = {
    "constraint": (
        "INSERT INTO t(id, v) VALUES (1, 'dup')",
        None,
        shardlite.Constraint,
        "constraint",
    ),
    "not-null": ("INSERT INTO t(v) VALUES (NULL)", None, shardlite.Constraint, "constraint"),
    "syntax": ("SELEC 1", None, shardlite.SqlError, "sql_error"),
    "no-table": ("SELECT * FROM nope", None, shardlite.SqlError, "sql_error"),
    "multi-statement": ("SELECT 1; SELECT 2", None, shardlite.BadRequest, "bad_request"),
    "empty-sql": ("   ", None, shardlite.BadRequest, "bad_request"),
    "binding-count": ("SELECT ?, ?", [1], shardlite.BadRequest, "bad_request"),
    "missing-named": ("SELECT :a", {"b": 1}, shardlite.BadRequest, "bad_request"),
    "int-too-big": ("SELECT ?", [2**63], shardlite.BadRequest, "bad_request"),
    "sandbox": ("ATTACH DATABASE 'x.db' AS x", None, shardlite.Forbidden, "forbidden"),
    "hidden-table": ("SELECT * FROM _shardlite_kv", None, shardlite.Forbidden, "forbidden"),
    "timeout": (f"{FOREVER} SELECT count(*) FROM c", None, shardlite.Timeout, "timeout"),
    "result-too-large": (
        f"{FOREVER} SELECT randomblob(10000) FROM c LIMIT 2000",  # 20 MB > 16 MiB
        None,
        shardlite.TooLarge,
        "too_large",
    ),
    "quota": (
        f"{FOREVER} INSERT INTO t(v) SELECT hex(randomblob(5000)) FROM c",
        None,
        shardlite.QuotaExceeded,
        "quota_exceeded",
    ),
}
INVALID_KEYS = ["", ".", "..", "../x", "a/b", "a\\b", "a\x00b", "k" * 257]


def check_error(exc: BaseException, cls: type[shardlite.Error], code: str) -> None:
    assert isinstance(exc, shardlite.Error), repr(exc)
    assert type(exc) is cls, repr(exc)
    assert exc.code == code
    assert isinstance(exc.message, str) and exc.message.strip()
    assert exc.retryable is False


def setup_table(actor: shardlite.ActorHandle) -> None:
    actor.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT")
    actor.sql("INSERT INTO t(id, v) VALUES (1, 'one')")


# ------------------------------------------------------------------ sync


def test_sync_client_runs_the_readme_example(url: str, key: str, tmp_path: Path) -> None:
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        actor.sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT) STRICT")
        inserted = actor.sql("INSERT INTO t (v) VALUES (?)", ["hello"])
        assert (inserted.changes, inserted.last_insert_rowid) == (1, 1)
        result = actor.sql("SELECT id, v FROM t")
        assert result.columns == ["id", "v"]
        assert result.rows == [(1, "hello")]
        results = actor.batch(
            [("INSERT INTO t (v) VALUES (?)", ["a"]), ("INSERT INTO t (v) VALUES (?)", ["b"])]
        )
        assert [r.last_insert_rowid for r in results] == [2, 3]
        actor.kv.put("name", {"any": ["json", 1]})
        assert actor.kv.get("name") == {"any": ["json", 1]}
        data = actor.export(str(tmp_path / "copy.db"))
        assert (tmp_path / "copy.db").read_bytes() == data
        with apsw.Connection(str(tmp_path / "copy.db")) as conn:
            assert conn.execute("SELECT v FROM t ORDER BY id").fetchall() == [
                ("hello",),
                ("a",),
                ("b",),
            ]
        assert actor.delete() is True
        assert actor.delete() is False


def test_sync_client_params_and_values_round_trip(url: str, key: str) -> None:
    values = [None, 1, -(2**63), 2**63 - 1, 2.5, "ü ✓", b"\x00\xff", b""]
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        assert actor.sql("SELECT " + ", ".join("?" * len(values)), values).rows == [tuple(values)]
        assert actor.sql("SELECT :a, :b", {"a": b"blob", "b": "text"}).rows == [(b"blob", "text")]
        assert actor.sql("SELECT ?", (7,)).rows == [(7,)]


def test_sync_client_kv_api(url: str, key: str) -> None:
    with shardlite.connect(url) as client:
        kv = client.actor(key).kv
        assert kv.get("missing") is None
        assert kv.get("missing", "default") == "default"
        for name in ["a1", "a2", "a3", "b1"]:
            kv.put(name, {"name": name, "bin": name.encode()})
        assert kv.get("a2") == {"name": "a2", "bin": b"a2"}
        assert [n for n, _ in kv.list()] == ["a1", "a2", "a3", "b1"]
        assert [n for n, _ in kv.list(prefix="a", limit=2)] == ["a1", "a2"]
        assert [n for n, _ in kv.list(prefix="a", after="a2")] == ["a3"]
        assert kv.delete("a1") is True
        assert kv.delete("a1") is False
        assert kv.get("a1") is None


@pytest.mark.parametrize("name", [".", "..", "../x", "a/b", "?x#y", "%2e%2e", "ü"])
def test_sync_client_kv_names_that_look_like_paths_address_the_entry(
    url: str, key: str, name: str
) -> None:
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        setup_table(actor)
        actor.kv.put(name, "value")
        assert actor.kv.get(name) == "value"
        assert actor.kv.list() == [(name, "value")]
        assert actor.kv.delete(name) is True
        assert actor.kv.get(name) is None
        # the actor itself, and its table, are untouched
        assert actor.sql("SELECT v FROM t").rows == [("one",)]


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_sync_client_errors_are_typed_shardlite_errors(
    url: str, key: str, case: tuple[str, Any, type[shardlite.Error], str]
) -> None:
    statement, params, cls, code = case
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        setup_table(actor)
        with pytest.raises(shardlite.Error) as info:
            actor.sql(statement, params)
        check_error(info.value, cls, code)
        # the client and the actor go on
        assert actor.sql("SELECT v FROM t").rows == [("one",)]


def test_sync_client_batch_error_names_the_statement_and_applies_nothing(
    url: str, key: str
) -> None:
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        setup_table(actor)
        with pytest.raises(shardlite.Constraint) as info:
            actor.batch(["INSERT INTO t(v) VALUES ('two')", "INSERT INTO t(id, v) VALUES (1, 'x')"])
        check_error(info.value, shardlite.Constraint, "constraint")
        assert "statement 1" in info.value.message
        assert actor.sql("SELECT count(*) FROM t").rows == [(1,)]


def test_sync_client_missing_things_are_not_found(url: str, key: str) -> None:
    with shardlite.connect(url) as client:
        with pytest.raises(shardlite.NotFound) as info:
            client.actor(f"{key}-never").export()
        check_error(info.value, shardlite.NotFound, "not_found")


def test_sync_client_a_damaged_actor_is_unavailable_and_not_retryable(
    url: str, key: str, module_server: Any
) -> None:
    """A damage mark beside an actor file (recovery writes one: docs/shardlog.md,
    "Damage") keeps that key from being served until an operator acts; other keys serve."""
    marks = [
        Path(str(shard / key_to_relpath(key)) + DAMAGED_SUFFIX)
        for shard in (module_server.data / "shards").iterdir()
    ]
    for mark in marks:  # the key's own shard is among them; the others never look
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text("its log record 0x1 does not apply to its file\n")
    try:
        with shardlite.connect(url) as client:
            with pytest.raises(shardlite.Unavailable) as info:
                client.actor(key).sql("SELECT 1")
            assert info.value.code == "unavailable" and info.value.retryable is False
            assert "is not served: its log record 0x1 does not apply" in info.value.message
            assert client.actor(f"{key}-other").sql("SELECT 1").rows == [(1,)]
            for mark in marks:
                mark.unlink()
            assert client.actor(key).sql("SELECT 1").rows == [(1,)]
    finally:
        for mark in marks:
            mark.unlink(missing_ok=True)


@pytest.mark.parametrize("bad_key", INVALID_KEYS, ids=repr)
def test_sync_client_invalid_key_is_bad_request(url: str, bad_key: str) -> None:
    with shardlite.connect(url) as client:
        with pytest.raises(shardlite.Error) as info:
            client.actor(bad_key).sql("CREATE TABLE pwned(x)")
        check_error(info.value, shardlite.BadRequest, "bad_request")
        assert "key" in info.value.message


def test_sync_client_request_over_the_size_limit_is_too_large_and_the_client_goes_on(
    url: str, key: str
) -> None:
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        setup_table(actor)
        with pytest.raises(shardlite.Error) as info:
            actor.sql("INSERT INTO t(v) VALUES (?)", ["x" * 300_000])
        check_error(info.value, shardlite.TooLarge, "too_large")
        for _ in range(3):
            assert actor.sql("SELECT count(*) FROM t").rows == [(1,)]


def test_sync_client_can_be_shared_by_threads(url: str, key: str) -> None:
    errors: list[BaseException] = []
    with shardlite.connect(url) as client:
        client.actor(key).sql("CREATE TABLE t(v)")

        def work(n: int) -> None:
            try:
                for i in range(20):
                    rows = client.actor(key).sql("SELECT ?", [n * 1000 + i]).rows
                    assert rows == [(n * 1000 + i,)]
                    client.actor(key).sql("INSERT INTO t VALUES (?)", [n])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert client.actor(key).sql("SELECT count(*) FROM t").rows == [(160,)]


# ------------------------------------------------------------------ async: shared scenarios


async def scenario_basic(client: shardlite.AsyncClient, key: str) -> None:
    actor = client.actor(key)
    await actor.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT")
    r = await actor.sql("INSERT INTO t(v) VALUES (?)", ["x"])
    assert (r.changes, r.last_insert_rowid) == (1, 1)
    results = await actor.batch(
        [("INSERT INTO t(v) VALUES (:v)", {"v": "y"}), "SELECT count(*) FROM t"]
    )
    assert results[1].rows == [(2,)]
    assert (await actor.sql("SELECT ?", [b"\x00"])).rows == [(b"\x00",)]
    await actor.kv.put("k", [1, b"2"])
    assert await actor.kv.get("k") == [1, b"2"]
    assert await actor.kv.get("nope", 0) == 0
    assert await actor.kv.list() == [("k", [1, b"2"])]
    assert await actor.kv.delete("k") is True
    exported = await actor.export()
    assert exported.startswith(b"SQLite format 3\x00")
    assert await actor.delete() is True


async def scenario_errors(client: shardlite.AsyncClient, key: str) -> None:
    actor = client.actor(key)
    await actor.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT")
    await actor.sql("INSERT INTO t(id, v) VALUES (1, 'one')")
    for statement, params, cls, code in ERROR_CASES.values():
        try:
            await actor.sql(statement, params)
        except shardlite.Error as exc:
            check_error(exc, cls, code)
        else:
            raise AssertionError(f"{statement!r} did not fail")
    for bad_key in INVALID_KEYS:
        try:
            await client.actor(bad_key).sql("SELECT 1")
        except shardlite.Error as exc:
            check_error(exc, shardlite.BadRequest, "bad_request")
        else:
            raise AssertionError(f"key {bad_key!r} was accepted")
    assert (await actor.sql("SELECT v FROM t")).rows == [("one",)]


async def scenario_too_large_then_go_on(client: shardlite.AsyncClient, key: str) -> None:
    actor = client.actor(key)
    await actor.sql("CREATE TABLE t(v)")
    try:
        await actor.sql("INSERT INTO t VALUES (?)", ["x" * 300_000])
    except shardlite.Error as exc:
        check_error(exc, shardlite.TooLarge, "too_large")
    else:
        raise AssertionError("an oversize request was accepted")
    assert (await actor.sql("SELECT count(*) FROM t")).rows == [(0,)]


def concurrent_scenario(
    n: int, start: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]]
) -> Any:
    """``n`` tasks on one client, each checking its own answer; ``start`` runs them all."""

    async def run(client: shardlite.AsyncClient, key: str) -> None:
        actor = client.actor(key)
        await actor.sql("CREATE TABLE t(v INTEGER)")
        seen: list[int] = []

        def task(i: int) -> Callable[[], Awaitable[None]]:
            async def one() -> None:
                other = client.actor(f"{key}-{i % 7}")
                rows = (await other.sql("SELECT ?, ?", [i, f"{key}-{i % 7}"])).rows
                assert rows == [(i, f"{key}-{i % 7}")]
                await actor.sql("INSERT INTO t VALUES (?)", [i])
                seen.append(i)

            return one

        await start([task(i) for i in range(n)])
        assert sorted(seen) == list(range(n))
        count = await actor.sql("SELECT count(*), sum(v) FROM t")
        assert count.rows == [(n, n * (n - 1) // 2)]

    return run


async def trio_all(fns: list[Callable[[], Awaitable[None]]]) -> None:
    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(fn)


async def asyncio_all(fns: list[Callable[[], Awaitable[None]]]) -> None:
    await asyncio.gather(*(fn() for fn in fns))


# ------------------------------------------------------------------ async under trio


async def test_async_client_under_trio_runs_every_operation(url: str, key: str) -> None:
    async with shardlite.connect_async(url) as client:
        await scenario_basic(client, key)


async def test_async_client_under_trio_raises_typed_errors(url: str, key: str) -> None:
    async with shardlite.connect_async(url) as client:
        await scenario_errors(client, key)


async def test_async_client_under_trio_goes_on_after_an_oversize_request(
    url: str, key: str
) -> None:
    async with shardlite.connect_async(url) as client:
        await scenario_too_large_then_go_on(client, key)


async def test_many_concurrent_requests_on_one_async_client_under_trio(url: str, key: str) -> None:
    n = 1000 if url.startswith("rpc") else 200
    async with shardlite.connect_async(url) as client:
        await concurrent_scenario(n, trio_all)(client, key)


# ------------------------------------------------------------------ async under asyncio


def run_asyncio(url: str, key: str, scenario: Any) -> None:
    async def main() -> None:
        async with shardlite.connect_async(url) as client:
            await scenario(client, key)

    asyncio.run(main())


def test_async_client_under_asyncio_runs_every_operation(url: str, key: str) -> None:
    run_asyncio(url, key, scenario_basic)


def test_async_client_under_asyncio_raises_typed_errors(url: str, key: str) -> None:
    run_asyncio(url, key, scenario_errors)


def test_async_client_under_asyncio_goes_on_after_an_oversize_request(url: str, key: str) -> None:
    run_asyncio(url, key, scenario_too_large_then_go_on)


def test_many_concurrent_requests_on_one_async_client_under_asyncio(url: str, key: str) -> None:
    n = 1000 if url.startswith("rpc") else 200
    run_asyncio(url, key, concurrent_scenario(n, asyncio_all))


async def test_async_client_survives_a_request_cancelled_while_being_sent(
    start_server: Any, key: str
) -> None:
    """Half a frame on the shared connection would put it out of step for good: the
    client must drop that connection and go on with a new one."""
    server = start_server("--max-request-bytes", "128MiB", "--durability", "os")
    big = "x" * (64 << 20)  # tens of milliseconds on loopback: cancelled mid-send
    async with shardlite.connect_async(server.rpc_url, timeout=10) as client:
        actor = client.actor(key)
        await actor.sql("SELECT 1")
        with trio.move_on_after(0.002) as scope:
            await actor.sql("SELECT length(?)", [big])
        assert scope.cancelled_caught
        for _ in range(3):
            with trio.fail_after(10):
                assert (await actor.sql("SELECT 2")).rows == [(2,)]


@pytest.mark.parametrize("scheme", ["rpc", "http"])
def test_idempotency_key_makes_a_retried_write_apply_once(
    module_server: Any, scheme: str, key: str
) -> None:
    url = module_server.rpc_url if scheme == "rpc" else module_server.http_url
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        actor.sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
        first = actor.sql("INSERT INTO t(v) VALUES (?) RETURNING id", ["x"], idempotency_key="op-1")
        again = actor.sql("INSERT INTO t(v) VALUES (?) RETURNING id", ["x"], idempotency_key="op-1")
        assert again.rows == first.rows
        actor.batch([("INSERT INTO t(v) VALUES ('b')", None)], idempotency_key="op-2")
        actor.batch([("INSERT INTO t(v) VALUES ('b')", None)], idempotency_key="op-2")
        actor.kv.put("n", 1, idempotency_key="op-3")
        assert actor.sql("SELECT count(*) FROM t").rows == [(2,)]
        with pytest.raises(shardlite.BadRequest, match="different request"):
            actor.sql("DELETE FROM t", idempotency_key="op-1")
