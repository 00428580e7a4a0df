"""Actor classes in process: methods, atomicity, migrations, alarms, workflows.

Every test runs a real pool on real files, in each durability mode where it matters.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import shardlite
from shardlite.actor import (
    ActorConfig,
    ActorPool,
    App,
    BadRequest,
    CallMethod,
    Constraint,
    Durability,
    MethodError,
    NotFound,
    Sql,
    Timeout,
    WorkflowGet,
    WorkflowList,
    open_actor_pool,
)

from .waiting import wait_until

CALLS: list[str] = []  # side effects the tests count (reset per test)


class Counter(shardlite.Actor):
    def migrate(self, db: Any) -> None:
        CALLS.append(f"migrate:{self.key}")
        db.sql("CREATE TABLE IF NOT EXISTS hits (n INTEGER NOT NULL) STRICT")

    @shardlite.method
    def hit(self, by: int = 1) -> int:
        self.db.sql("INSERT INTO hits VALUES (?)", [by])
        return int(self.db.sql("SELECT sum(n) FROM hits").rows[0][0])

    @shardlite.method
    def hit_then_fail(self) -> None:
        self.db.sql("INSERT INTO hits VALUES (1000)")
        raise ValueError("out of luck")

    @shardlite.method
    def total(self) -> int:
        return int(self.db.sql("SELECT coalesce(sum(n), 0) FROM hits").rows[0][0])

    @shardlite.method
    def duplicate(self) -> None:
        self.db.sql("CREATE TABLE IF NOT EXISTS u (id INTEGER PRIMARY KEY) STRICT")
        self.db.sql("INSERT INTO u VALUES (1)")
        self.db.sql("INSERT INTO u VALUES (1)")

    @shardlite.method
    def unsendable(self) -> object:
        return object()

    def not_exposed(self) -> str:
        return "secret"

    @shardlite.method
    async def add_from(self, other: str) -> int:
        theirs = await self.actor(other).call("total")
        self.db.sql("INSERT INTO hits VALUES (?)", [theirs])
        return int(self.db.sql("SELECT sum(n) FROM hits").rows[0][0])

    @shardlite.method
    async def add_then_fail(self) -> None:
        self.db.sql("INSERT INTO hits VALUES (500)")
        await trio.lowlevel.checkpoint()
        raise RuntimeError("after an await")

    @shardlite.method
    async def call_myself(self) -> None:
        await self.actor(self.key).call("total")

    @shardlite.method
    async def slow(self) -> None:
        await trio.sleep_forever()  # only the call timeout ends it


class Alarmed(shardlite.Actor):
    def migrate(self, db: Any) -> None:
        db.sql("CREATE TABLE IF NOT EXISTS fired (name TEXT, payload ANY, at REAL) STRICT")

    @shardlite.method
    def arm(self, name: str, delay: float, payload: Any = None) -> float:
        return self.alarms.set(name, delay=delay, payload=payload)

    @shardlite.method
    def cancel(self, name: str) -> bool:
        return self.alarms.cancel(name)

    @shardlite.method
    def fired(self) -> list[Any]:
        return [list(r) for r in self.db.sql("SELECT name, payload FROM fired ORDER BY rowid").rows]

    @shardlite.method
    def pending(self) -> list[Any]:
        return [name for name, _, _ in self.alarms.list()]

    def on_alarm(self, name: str, payload: Any) -> None:
        if name == "flaky" and CALLS.count("flaky") == 0:
            CALLS.append("flaky")
            self.db.sql("INSERT INTO fired VALUES ('flaky-try', NULL, 0)")  # rolled back
            raise RuntimeError("first try fails")
        self.db.sql("INSERT INTO fired VALUES (?, ?, ?)", [name, repr(payload), time.time()])


class AsyncAlarmed(Alarmed):
    async def on_alarm(self, name: str, payload: Any) -> None:  # type: ignore[override]
        await trio.lowlevel.checkpoint()  # an await inside the alarm's transaction
        self.db.sql("INSERT INTO fired VALUES (?, ?, ?)", [name, repr(payload), time.time()])
        if name == "bad":
            raise RuntimeError("rolled back, retried")


class Versioned(shardlite.Actor):
    schema_version = 2

    def migrate(self, db: Any, version: int) -> None:
        CALLS.append(f"v{version}->2")
        if version < 1:
            db.sql("CREATE TABLE t (a INTEGER) STRICT")
        if version < 2:
            db.sql("ALTER TABLE t ADD COLUMN b TEXT")

    @shardlite.method
    def columns(self) -> list[str]:
        return [r[1] for r in self.db.sql("PRAGMA table_info(t)").rows]


class Flow(shardlite.Actor):
    def migrate(self, db: Any) -> None:
        db.sql("CREATE TABLE IF NOT EXISTS log (step TEXT) STRICT")

    @shardlite.workflow
    async def order(self, wf: shardlite.Workflow, n: int) -> int:
        def reserve() -> int:
            CALLS.append("reserve")
            self.db.sql("INSERT INTO log VALUES ('reserve')")
            return n * 2

        async def charge() -> str:
            CALLS.append("charge")
            return "receipt-1"

        doubled = await wf.step("reserve", reserve)
        receipt = await wf.step("charge", charge)
        await wf.sleep(0.05)
        attempts = []

        def flaky() -> int:
            attempts.append(1)
            if len(attempts) < 3:
                raise ConnectionError("try again")
            return len(attempts)

        tries = await wf.step("flaky", flaky, retries=5, backoff=0.01)
        return doubled + len(receipt) + tries

    @shardlite.workflow
    async def doomed(self, wf: shardlite.Workflow) -> None:
        def boom() -> None:
            raise ValueError("never works")

        await wf.step("boom", boom, retries=1, backoff=0.01)


APP = App(
    {"alarm-": Alarmed, "async-alarm-": AsyncAlarmed, "v-": Versioned, "flow-": Flow},
    default=Counter,
)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


@asynccontextmanager
async def app_pool(path: Path, durability: Durability = Durability.LOG) -> AsyncIterator[ActorPool]:
    config = ActorConfig(durability=durability, call_timeout_s=2.0)
    async with open_actor_pool(config, str(path), app=APP) as pool:
        yield pool


async def call(pool: ActorPool, key: str, method: str, *args: Any, **kwargs: Any) -> Any:
    return (await pool.call(key, CallMethod(method, list(args), kwargs))).value


@pytest.mark.parametrize("durability", list(Durability))
async def test_counter_under_concurrent_calls_is_exact(
    tmp_path: Path, durability: Durability
) -> None:
    async with app_pool(tmp_path, durability) as pool:
        results: list[int] = []

        async def worker() -> None:
            for _ in range(25):
                results.append(await call(pool, "page-1", "hit"))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker)
        assert sorted(results) == list(range(1, 201))  # each call saw a distinct count
        assert await call(pool, "page-1", "total") == 200
    async with app_pool(tmp_path, durability) as pool:
        assert await call(pool, "page-1", "total") == 200
    assert CALLS == ["migrate:page-1"]  # once per file, not per open


async def test_failing_method_rolls_back_only_itself(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:

        async def good() -> None:
            await call(pool, "k", "hit", 5)

        async def bad() -> None:
            with pytest.raises(MethodError, match="ValueError: out of luck"):
                await call(pool, "k", "hit_then_fail")

        async with trio.open_nursery() as nursery:  # in one group commit
            for i in range(10):
                nursery.start_soon(good if i % 2 else bad)
        assert await call(pool, "k", "total") == 25
        with pytest.raises(Constraint):
            await call(pool, "k", "duplicate")
        assert (
            await pool.call("k", Sql("SELECT name FROM sqlite_schema WHERE name = 'u'")) is not None
        )
        rows = (
            await pool.call("k", Sql("SELECT count(*) FROM sqlite_schema WHERE name = 'u'"))
        ).rows
        assert rows == [(0,)]  # the failed method's CREATE TABLE went too


async def test_method_errors_are_clear(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        with pytest.raises(NotFound, match="no method 'not_exposed'"):
            await call(pool, "k", "not_exposed")
        with pytest.raises(NotFound, match="no method 'nope'"):
            await call(pool, "k", "nope")
        with pytest.raises(BadRequest, match="bad arguments for hit"):
            await call(pool, "k", "hit", 1, 2, 3)
        with pytest.raises(BadRequest, match="bad arguments for hit"):
            await call(pool, "k", "hit", bogus=1)
        with pytest.raises(MethodError, match="cannot be sent"):
            await call(pool, "k", "unsendable")
        assert await call(pool, "k", "hit", 2) == 2  # the actor still serves


async def test_async_methods_call_other_actors_atomically(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        await call(pool, "a", "hit", 7)
        await call(pool, "b", "hit", 1)
        assert await call(pool, "b", "add_from", "a") == 8
        with pytest.raises(MethodError, match="RuntimeError: after an await"):
            await call(pool, "b", "add_then_fail")
        assert await call(pool, "b", "total") == 8  # the write before the await was undone
        with pytest.raises(BadRequest, match="cannot call itself"):
            await call(pool, "b", "call_myself")
        with pytest.raises(Timeout):
            await call(pool, "b", "slow")
        assert await call(pool, "b", "hit", 1) == 9


async def test_migrations_run_once_per_version(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        assert await call(pool, "v-1", "columns") == ["a", "b"]
        assert await call(pool, "v-1", "columns") == ["a", "b"]
    async with app_pool(tmp_path) as pool:
        assert await call(pool, "v-1", "columns") == ["a", "b"]
    assert CALLS == ["v0->2"]


async def test_no_class_for_key(tmp_path: Path) -> None:
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as pool:
        with pytest.raises(NotFound, match="no actor class serves"):
            await call(pool, "k", "hit")


@pytest.mark.parametrize("durability", list(Durability))
async def test_alarms_fire_retry_and_survive_restarts(
    tmp_path: Path, durability: Durability
) -> None:
    async with app_pool(tmp_path, durability) as pool:
        await call(pool, "alarm-1", "arm", "soon", 0.1, {"x": 1})
        await call(pool, "alarm-1", "arm", "later", 3600)
        await call(pool, "alarm-1", "arm", "gone", 0.2)
        assert await call(pool, "alarm-1", "cancel", "gone") is True
        await call(pool, "alarm-1", "arm", "flaky", 0.1)

        async def fired() -> Any:
            rows = await call(pool, "alarm-1", "fired")
            return rows if {r[0] for r in rows} >= {"soon", "flaky"} else None

        rows = await wait_until(fired)
        assert ["soon", "{'x': 1}"] in rows  # the payload came back as a value
        names = [r[0] for r in rows]
        assert "gone" not in names and "flaky-try" not in names
        assert await call(pool, "alarm-1", "pending") == ["later"]
        await call(pool, "alarm-2", "arm", "after-restart", 1.0)
    # closed before it was due: the next process fires it, opening the actor itself
    async with app_pool(tmp_path, durability) as pool:

        async def fired2() -> Any:
            return await call(pool, "alarm-2", "fired")

        await wait_until(fired2)
        assert await call(pool, "alarm-1", "pending") == ["later"]


async def test_alarm_wakes_a_closed_actor(tmp_path: Path) -> None:
    config = ActorConfig(idle_timeout_s=0.2, call_timeout_s=2.0, max_open_actors=1)
    async with open_actor_pool(config, str(tmp_path), app=APP) as pool:
        await call(pool, "alarm-3", "arm", "wake", 3.0)

        async def closed() -> bool:
            return bool(pool.statistics()["actors_open"] == 0)

        await wait_until(closed)  # passivated before the alarm is due
        opened = pool.statistics()["opened"]

        async def reopened() -> bool:  # by the scheduler: nobody calls the actor meanwhile
            return bool(pool.statistics()["opened"] > opened)

        await wait_until(reopened)
        assert [r[0] for r in await call(pool, "alarm-3", "fired")] == ["wake"]


async def test_async_alarm_handlers_run_in_a_transaction(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        await call(pool, "async-alarm-1", "arm", "good", 0.05, 7)
        await call(pool, "async-alarm-1", "arm", "bad", 0.05)

        async def fired() -> Any:
            rows = await call(pool, "async-alarm-1", "fired")
            return rows if rows else None

        assert await wait_until(fired) == [["good", "7"]]  # bad's insert was rolled back
        assert await call(pool, "async-alarm-1", "pending") == ["bad"]  # and it backs off


async def test_idempotent_method_calls(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        first = await pool.call("k", CallMethod("hit", [3], {}), idempotency_key="once")
        again = await pool.call("k", CallMethod("hit", [3], {}), idempotency_key="once")
        assert first.value == again.value == 3
        assert await call(pool, "k", "total") == 3
        with pytest.raises(BadRequest, match="different request"):
            await pool.call("k", CallMethod("hit", [4], {}), idempotency_key="once")


async def test_workflow_runs_steps_once_and_reports(tmp_path: Path) -> None:
    async with app_pool(tmp_path) as pool:
        started = (await pool.call("flow-1", CallMethod("order", [10], {}, "o-1"))).value
        assert started["workflow_id"] == "o-1" and started["status"] == "running"
        again = (await pool.call("flow-1", CallMethod("order", [10], {}, "o-1"))).value
        assert again["workflow_id"] == "o-1"  # idempotent by id

        async def done() -> Any:
            info = await pool.call("flow-1", WorkflowGet("o-1"))
            return info if info.status in ("completed", "failed") else None

        info = await wait_until(done)
        assert info.status == "completed", info
        assert info.result == 20 + len("receipt-1") + 3
        assert [s.name for s in info.steps] == ["reserve", "charge", "sleep", "flaky"]
        flaky = info.steps[-1]
        assert flaky.status == "done" and flaky.attempts == 3
        assert CALLS.count("reserve") == 1 and CALLS.count("charge") == 1
        listed = await pool.call("flow-1", WorkflowList())
        assert [w.id for w in listed.items] == ["o-1"]

        await pool.call("flow-1", CallMethod("doomed", [], {}, "d-1"))

        async def failed() -> Any:
            got = await pool.call("flow-1", WorkflowGet("d-1"))
            return got if got.status == "failed" else None

        doomed = await wait_until(failed)
        assert "never works" in (doomed.error or "")
        assert doomed.steps[0].attempts == 2
