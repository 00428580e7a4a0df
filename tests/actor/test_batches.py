"""Group commit: one transaction per batch, each call isolated, order kept per key."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from shardlite.actor import (
    ActorPool,
    Batch,
    Call,
    Constraint,
    Error,
    Sql,
    SqlResult,
    Statement,
    Timeout,
)

RUNAWAY_INSERT = (
    "INSERT INTO t(v) SELECT x FROM (WITH RECURSIVE r(x) AS "
    "(SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT x FROM r)"
)


class Collect:
    """A sink that records results by tag."""

    def __init__(self) -> None:
        self.results: dict[Any, Any] = {}
        self.done = trio.Event()
        self.expected = 0

    def deliver(self, tag: Any, result: Any) -> None:
        self.results[tag] = result
        if len(self.results) >= self.expected:
            self.done.set()


async def run_batch(pool: ActorPool, key: str, ops: list[Any]) -> list[Any]:
    """Submit ``ops`` together, so that they run as one batch, and collect the results."""
    sink = Collect()
    sink.expected = len(ops)
    pool.submit_nowait(key, [Call(op, sink, i) for i, op in enumerate(ops)])
    pool.wake_runner()
    with trio.fail_after(10):
        await sink.done.wait()
    return [sink.results[i] for i in range(len(ops))]


async def count(pool: ActorPool, key: str, where: str = "1") -> int:
    result = await pool.call(key, Sql(f"SELECT count(*) FROM t WHERE {where}"))
    return int(result.rows[0][0])


async def test_failing_call_in_a_batch_leaves_the_others_applied(pool: ActorPool) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
    results = await run_batch(
        pool,
        "k",
        [
            Sql("INSERT INTO t(v) VALUES ('a')"),
            Sql("INSERT INTO t(v) VALUES ('a')"),  # UNIQUE violation
            Sql("INSERT INTO t(v) VALUES ('b')"),
        ],
    )
    assert isinstance(results[0], SqlResult) and results[0].changes == 1
    assert isinstance(results[1], Constraint)
    assert isinstance(results[2], SqlResult) and results[2].changes == 1
    assert pool.batches >= 2  # the three ran as one batch after the CREATE
    rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
    assert rows.rows == [("a",), ("b",)]


async def test_batch_operation_is_all_or_nothing(pool: ActorPool) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
    op = Batch(
        [
            Statement("INSERT INTO t(v) VALUES ('x')"),
            Statement("INSERT INTO t(v) VALUES ('y')"),
            Statement("INSERT INTO t(v) VALUES (NULL)"),
        ]
    )
    with pytest.raises(Constraint) as info:
        await pool.call("k", op)
    assert info.value.details["index"] == 2
    assert "statement 2" in info.value.message
    assert await count(pool, "k") == 0
    ok = await pool.call("k", Batch([Statement("INSERT INTO t(v) VALUES (?)", ["z"])]))
    assert ok.results[0].changes == 1


async def test_failed_batch_operation_inside_a_group_commit_spares_its_neighbours(
    pool: ActorPool,
) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
    results = await run_batch(
        pool,
        "k",
        [
            Sql("INSERT INTO t(v) VALUES ('before')"),
            Batch(
                [
                    Statement("INSERT INTO t(v) VALUES ('lost')"),
                    Statement("INSERT INTO t(v) VALUES (NULL)"),
                ]
            ),
            Sql("INSERT INTO t(v) VALUES ('after')"),
        ],
    )
    assert isinstance(results[1], Constraint)
    rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
    assert rows.rows == [("before",), ("after",)]


async def test_calls_for_one_key_run_in_submission_order(pool: ActorPool) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER)"))
    ops = [Sql("INSERT INTO t(v) VALUES (?)", [i]) for i in range(500)]
    results = await run_batch(pool, "k", ops)
    rowids = [r.last_insert_rowid for r in results]
    assert rowids == sorted(rowids) and len(set(rowids)) == 500
    rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
    assert [r[0] for r in rows.rows] == list(range(500))


async def test_interrupted_write_rolls_back_only_itself(tmp_path: Any) -> None:
    from shardlite.actor import ActorConfig, open_actor_pool

    config = ActorConfig(statement_timeout_s=0.05)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
        results = await run_batch(
            pool,
            "k",
            [
                Sql("INSERT INTO t(v) VALUES ('a')"),
                Sql(RUNAWAY_INSERT),  # SQLite rolls back the whole transaction on interrupt
                Sql("INSERT INTO t(v) VALUES ('b')"),
            ],
        )
        assert isinstance(results[1], Timeout)
        assert all(isinstance(r, SqlResult) for r in (results[0], results[2]))
        rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY id"))
        assert rows.rows == [("a",), ("b",)]


async def test_statement_budget_interrupts_a_runaway_query_and_the_actor_recovers(
    tmp_path: Any,
) -> None:
    from shardlite.actor import ActorConfig, open_actor_pool

    config = ActorConfig(statement_timeout_s=0.05)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        with pytest.raises(Timeout):
            await pool.call(
                "k",
                Sql(
                    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
                ),
            )
        assert (await pool.call("k", Sql("SELECT 40 + 2"))).rows == [(42,)]


async def test_multi_statement_sql_and_empty_sql_are_refused(pool: ActorPool) -> None:
    for sql in ("SELECT 1; SELECT 2", "", "  -- just a comment"):
        with pytest.raises(Error) as info:
            await pool.call("k", Sql(sql))
        assert info.value.code == "bad_request"
    # a trailing comment or semicolon is still one statement
    assert (await pool.call("k", Sql("SELECT 1; -- done"))).rows == [(1,)]


async def test_results_carry_columns_changes_and_rowid(pool: ActorPool) -> None:
    await pool.call("k", Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
    empty = await pool.call("k", Sql("SELECT id, v AS value FROM t"))
    assert empty.columns == ["id", "value"] and empty.rows == []
    ins = await pool.call("k", Sql("INSERT INTO t(v) VALUES (:a), (:b)", {"a": 1, "b": b"\x00"}))
    assert (ins.changes, ins.last_insert_rowid) == (2, 2)
    upd = await pool.call("k", Sql("UPDATE t SET v = NULL"))
    assert upd.changes == 2
    ddl = await pool.call("k", Sql("CREATE INDEX t_v ON t(v)"))
    assert ddl.changes == 0
    rows = await pool.call("k", Sql("SELECT v FROM t"))
    assert rows.rows == [(None,), (None,)]


async def test_bad_parameters_are_bad_requests(pool: ActorPool) -> None:
    cases: list[Sql] = [
        Sql("SELECT ?, ?", [1]),
        Sql("SELECT :a", {"b": 1}),
        Sql("SELECT ?", [[1, 2]]),
        Sql("SELECT ?", [1 << 70]),
        Sql("SELECT 1", [1]),
    ]
    for op in cases:
        with pytest.raises(Error) as info:
            await pool.call("k", op)
        assert info.value.code == "bad_request", (op, info.value)


async def test_or_fail_partial_writes_are_undone_with_the_failed_call(pool: ActorPool) -> None:
    """INSERT OR FAIL keeps the rows before the failure; the call must not, on error."""
    await pool.call("k", Sql("CREATE TABLE t(v UNIQUE)"))
    await pool.call("k", Sql("CREATE TABLE u(v)"))
    await pool.call(
        "k",
        Sql(
            "CREATE TRIGGER tr BEFORE INSERT ON u WHEN new.v = 99 BEGIN SELECT raise(FAIL, 'nope'); END"
        ),
    )
    results = await run_batch(
        pool,
        "k",
        [
            Sql("INSERT INTO t VALUES ('kept')"),
            Sql("INSERT OR FAIL INTO t VALUES ('x'), ('y'), ('kept')"),
            Sql("INSERT INTO u VALUES (1), (2), (99)"),
            Sql("INSERT INTO t VALUES ('also kept')"),
        ],
    )
    assert isinstance(results[1], Constraint) and isinstance(results[2], Constraint)
    assert (await pool.call("k", Sql("SELECT v FROM t ORDER BY rowid"))).rows == [
        ("kept",),
        ("also kept",),
    ]
    assert (await pool.call("k", Sql("SELECT count(*) FROM u"))).rows == [(0,)]


async def test_a_write_whose_result_cannot_be_sent_is_undone(pool: ActorPool) -> None:
    await pool.call("k", Sql("CREATE TABLE t(v)"))
    results = await run_batch(
        pool,
        "k",
        [
            Sql("INSERT INTO t VALUES (CAST(x'ff' AS TEXT)) RETURNING v"),  # not UTF-8
            Sql("INSERT INTO t VALUES ('next')"),
        ],
    )
    assert isinstance(results[0], Error) and results[0].code == "bad_request"
    assert "UTF-8" in results[0].message
    assert isinstance(results[1], SqlResult)
    assert (await pool.call("k", Sql("SELECT v FROM t"))).rows == [("next",)]


async def test_a_large_result_is_refused_without_being_built_whole(tmp_path: Any) -> None:
    from shardlite.actor import ActorConfig, TooLarge, open_actor_pool

    config = ActorConfig(max_result_bytes=100_000)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        with pytest.raises(TooLarge):
            await pool.call(
                "k",
                Sql(
                    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                    "SELECT zeroblob(10000) FROM r LIMIT 100000"
                ),
            )
        assert (await pool.call("k", Sql("SELECT 1"))).rows == [(1,)]


async def test_slow_calls_are_split_across_batches_so_the_loop_is_not_held(tmp_path: Any) -> None:
    """A batch stops taking calls once it has run for a statement budget."""
    from shardlite.actor import ActorConfig, open_actor_pool

    slow = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
    config = ActorConfig(statement_timeout_s=0.02)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        before = pool.batches
        results = await run_batch(pool, "k", [Sql(slow) for _ in range(6)])
        assert all(isinstance(r, Timeout) for r in results)
        assert pool.batches - before >= 3  # about two slow calls per batch, not six


async def test_repeated_whole_transaction_rollbacks_run_each_call_at_most_twice(
    tmp_path: Any,
) -> None:
    from shardlite.actor import ActorConfig, open_actor_pool

    config = ActorConfig(statement_timeout_s=0.02)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        await pool.call("k", Sql("CREATE TABLE n(v)"))
        await pool.call("k", Sql("INSERT INTO n VALUES (0)"))
        count_runs = "UPDATE n SET v = v + 1"  # counts how often the good calls ran
        ops: list[Any] = []
        for i in range(4):
            ops.append(Sql(count_runs))
            ops.append(Sql(RUNAWAY_INSERT))  # rolls back the whole transaction
            ops.append(Sql("INSERT INTO t VALUES (?)", [i]))
        results = await run_batch(pool, "k", ops)
        assert [type(r).__name__ for r in results[1::3]] == ["Timeout"] * 4
        assert (await pool.call("k", Sql("SELECT count(*) FROM t"))).rows == [(4,)]
        assert (await pool.call("k", Sql("SELECT v FROM n"))).rows == [(4,)]
