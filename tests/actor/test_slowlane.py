"""The slow lane (long reads leave the event loop) and the temp-storage bound."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from shardlite.actor import (
    ActorConfig,
    Error,
    QuotaExceeded,
    Sql,
    SqlResult,
    Timeout,
    open_actor_pool,
)

from .test_batches import run_batch
from .waiting import wait_until

RUNAWAY = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
SLOW_COUNT = (
    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 300000) "
    "SELECT count(*), (SELECT count(*) FROM t) FROM r"
)
BIG_SORT = (
    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 20000) "
    "SELECT count(*) FROM (SELECT randomblob(1000) AS b FROM r ORDER BY b)"
)
SMALL_SORT = BIG_SORT.replace("20000", "500")


async def test_a_long_read_leaves_the_loop_and_other_actors_keep_being_served(
    tmp_path: Any,
) -> None:
    config = ActorConfig(statement_timeout_s=2.0, inline_slice_s=0.01)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("victim", Sql("CREATE TABLE t(v)"))
        hog_result: list[Any] = []

        async def hog() -> None:
            try:
                await pool.call("hog", Sql(RUNAWAY))
            except Error as exc:
                hog_result.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog)
            await wait_until(lambda: pool.slow_calls == 1)
            for i in range(20):  # served while the runaway runs in the slow lane
                await pool.call("victim", Sql("INSERT INTO t VALUES (?)", [i]))
            rows = await pool.call("victim", Sql("SELECT count(*) FROM t"))
            assert rows.rows == [(20,)]
            assert hog_result == []  # still running: the victim did not wait for it
        assert isinstance(hog_result[0], Timeout)
        # the hog's actor serves again after its budget ran out
        assert (await pool.call("hog", Sql("SELECT 1"))).rows == [(1,)]
        assert pool.statistics()["slow_calls"] == 1


async def test_a_slow_read_sees_the_writes_before_it_and_not_those_after(
    tmp_path: Any,
) -> None:
    config = ActorConfig(inline_slice_s=0.001)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        results = await run_batch(
            pool,
            "k",
            [
                Sql("INSERT INTO t VALUES ('before')"),
                Sql(SLOW_COUNT),
                Sql("INSERT INTO t VALUES ('after')"),
            ],
        )
        assert all(isinstance(r, SqlResult) for r in results), results
        assert results[1].rows == [(300000, 1)]
        assert results[1].columns == ["count(*)", "(SELECT count(*) FROM t)"]
        assert results[2].last_insert_rowid == 2
        assert pool.statistics()["slow_calls"] == 1
        rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY rowid"))
        assert rows.rows == [("before",), ("after",)]


async def test_writes_and_idempotent_reads_stay_on_the_loop(tmp_path: Any) -> None:
    # the 300,000-row insert takes 0.26-0.45 s here, near the default 0.5 s statement
    # budget, and past it on a loaded CI machine: this test is about where statements
    # run, not their budget
    config = ActorConfig(inline_slice_s=0.001, statement_timeout_s=30.0)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        ins = await pool.call(
            "k",
            Sql(
                "INSERT INTO t SELECT x FROM (WITH RECURSIVE r(x) AS "
                "(SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 300000) SELECT x FROM r)"
            ),
        )
        assert ins.changes == 300000
        first = await pool.call("k", Sql("SELECT count(*), sum(v) FROM t"), idempotency_key="q-1")
        again = await pool.call("k", Sql("SELECT count(*), sum(v) FROM t"), idempotency_key="q-1")
        assert first.rows == again.rows == [(300000, 300000 * 300001 // 2)]
        assert pool.statistics()["slow_calls"] == 0
        # the same read without a key is slow enough to move
        plain = await pool.call("k", Sql("SELECT count(*), sum(v) FROM t"))
        assert plain.rows == first.rows
        assert pool.statistics()["slow_calls"] == 1


@pytest.mark.parametrize("slice_s", [0.0, 0.01], ids=["inline", "slow-lane"])
async def test_temporary_storage_of_a_statement_is_bounded(tmp_path: Any, slice_s: float) -> None:
    config = ActorConfig(max_temp_bytes=4 << 20, inline_slice_s=slice_s, statement_timeout_s=5)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        await pool.call("k", Sql("CREATE TABLE t(v)"))
        await pool.call("k", Sql("INSERT INTO t VALUES ('kept')"))
        with pytest.raises(QuotaExceeded) as info:
            await pool.call("k", Sql(BIG_SORT))
        assert info.value.code == "quota_exceeded"
        assert "temporary storage" in info.value.message
        # a write whose sort is too big writes nothing; the calls beside it commit
        results = await run_batch(
            pool,
            "k",
            [
                Sql("INSERT INTO t VALUES ('a')"),
                Sql("INSERT INTO t " + BIG_SORT.replace("count(*)", "length(b)")),
                Sql("INSERT INTO t VALUES ('b')"),
            ],
        )
        assert isinstance(results[1], QuotaExceeded)
        assert isinstance(results[0], SqlResult) and isinstance(results[2], SqlResult)
        assert (await pool.call("k", Sql(SMALL_SORT))).rows == [(500,)]
        rows = await pool.call("k", Sql("SELECT v FROM t ORDER BY rowid"))
        assert rows.rows == [("kept",), ("a",), ("b",)]


async def test_the_slow_lane_stops_a_sort_past_the_temp_bound_and_keeps_no_budget(
    tmp_path: Any,
) -> None:
    # a constant subquery burns time first (preempted with no memory used yet), then
    # the sort fills memory in the slow lane, where the loop's watchdog stops it
    late_sort = (
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 20000) "
        "SELECT count(*) FROM (SELECT randomblob(1000) AS b FROM r WHERE (SELECT count(*) "
        "FROM (WITH RECURSIVE q(y) AS (SELECT 1 UNION ALL SELECT y + 1 FROM q LIMIT 300000) "
        "SELECT y FROM q)) > 0 ORDER BY b)"
    )
    config = ActorConfig(max_temp_bytes=4 << 20, inline_slice_s=0.001, statement_timeout_s=5)
    async with open_actor_pool(config, str(tmp_path)) as pool:
        with pytest.raises(QuotaExceeded):
            await pool.call("k", Sql(late_sort))
        assert pool.statistics()["slow_calls"] == 1
        # no budget outlives its statement: a reopen's own queries must not be stopped
        assert pool._actors["k"].over_budget() is False
        small = late_sort.replace("LIMIT 20000", "LIMIT 100")
        assert (await pool.call("k", Sql(small))).rows == [(100,)]
        assert pool.statistics()["slow_calls"] == 2
