"""Recovery replays exactly: a Hypothesis state machine against a model of the writes.

Each step is an acknowledged write (rows of a rowid table and of a WITHOUT ROWID table,
KV entries), or a power cut followed by recovery; after every recovery each actor's
contents must equal the model exactly. The pool runs in its own trio thread so that the
(synchronous) rules can call it.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import shardlite.actor._shardlog as shardlog_module
from shardlite.actor import Error, KvDelete, KvList, KvPut, Sql, open_actor_pool

from .conftest import PowerCutVFS
from .test_shardlog import Harness, LogCut

KEYS = ("alpha", "beta", "gamma")
_names = itertools.count()


class PoolThread:
    """An actor pool on a trio loop of its own; power cuts restart it on the same data."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.pool: Any = None
        self.token: Any = None
        self._ready = threading.Event()
        self._cut = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(30), "the pool did not start"

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # surfaced by the next call
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        while not self._stopping:
            cut = trio.Event()
            self._cut_event = cut
            async with open_actor_pool(
                self.harness.config, str(self.harness.data), self.harness.durability()
            ) as pool:
                self.pool = pool
                self._ready.set()
                await cut.wait()
                if not self._stopping:
                    self.harness.power_cut()
            if not self._stopping:
                self.harness.restore()
                self.harness.vfs.revive()
                self.harness.cut.is_cut = False

    def call(self, key: str, op: Any) -> Any:
        if self.error is not None:
            raise self.error
        return trio.from_thread.run(self.pool.call, key, op, trio_token=self.token)

    def power_cut_and_recover(self) -> None:
        self._ready.clear()
        trio.from_thread.run_sync(self._cut_event.set, trio_token=self.token)
        assert self._ready.wait(60), "recovery did not finish"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stopping = True
        trio.from_thread.run_sync(self._cut_event.set, trio_token=self.token)
        self.thread.join(60)


values = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.binary(max_size=8)
)


class ReplayMachine(RuleBasedStateMachine):
    PER_COMMIT = 1
    """log_batches_per_commit: batches an actor file's transaction holds."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = pytest.MonkeyPatch()
        self.vfs = PowerCutVFS(f"model{next(_names)}")
        cut = LogCut()
        self.patch.setattr(shardlog_module, "os", cut)
        self.harness = Harness(Path(tempfile.mkdtemp()), self.vfs, cut)
        if self.PER_COMMIT > 1:  # (the harness's frequent log checkpoints commit them too)
            self.harness.config = msgspec.structs.replace(
                self.harness.config,
                log_batches_per_commit=self.PER_COMMIT,
                log_checkpoint_interval_s=3600,
            )
        self.runner = PoolThread(self.harness)
        self.rows: dict[str, dict[int, Any]] = {k: {} for k in KEYS}
        self.named: dict[str, dict[str, Any]] = {k: {} for k in KEYS}
        self.kv: dict[str, dict[str, Any]] = {k: {} for k in KEYS}

    @initialize()
    def create_tables(self) -> None:
        for key in KEYS:
            self.runner.call(key, Sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
            self.runner.call(key, Sql("CREATE TABLE w(name TEXT PRIMARY KEY, v) WITHOUT ROWID"))

    @rule(key=st.sampled_from(KEYS), row=st.integers(0, 30), value=values)
    def upsert_row(self, key: str, row: int, value: Any) -> None:
        self.runner.call(key, Sql("INSERT OR REPLACE INTO t(id, v) VALUES (?, ?)", [row, value]))
        self.rows[key][row] = value

    @rule(key=st.sampled_from(KEYS), row=st.integers(0, 30))
    def delete_row(self, key: str, row: int) -> None:
        self.runner.call(key, Sql("DELETE FROM t WHERE id = ?", [row]))
        self.rows[key].pop(row, None)

    @rule(key=st.sampled_from(KEYS), name=st.text(min_size=1, max_size=4), value=values)
    def upsert_named(self, key: str, name: str, value: Any) -> None:
        self.runner.call(key, Sql("INSERT OR REPLACE INTO w(name, v) VALUES (?, ?)", [name, value]))
        self.named[key][name] = value

    @rule(key=st.sampled_from(KEYS), prefix=st.text(max_size=1))
    def delete_named(self, key: str, prefix: str) -> None:
        self.runner.call(
            key, Sql("DELETE FROM w WHERE substr(name, 1, ?) = ?", [len(prefix), prefix])
        )
        for name in [n for n in self.named[key] if n.startswith(prefix)]:
            del self.named[key][name]

    @rule(
        key=st.sampled_from(KEYS),
        name=st.sampled_from("abcd"),
        value=st.integers(-(2**63), 2**63 - 1),
    )
    def kv_put(self, key: str, name: str, value: int) -> None:
        self.runner.call(key, KvPut(name, value))
        self.kv[key][name] = value

    @rule(key=st.sampled_from(KEYS), name=st.sampled_from("abcd"))
    def kv_delete(self, key: str, name: str) -> None:
        self.runner.call(key, KvDelete(name))
        self.kv[key].pop(name, None)

    @rule(key=st.sampled_from(KEYS), row=st.integers(0, 30))
    def failing_write(self, key: str, row: int) -> None:
        """Fails when the row exists, and SQLite rolls back the whole transaction then:
        the file's open transaction with it, whose batches must be put back."""
        try:
            self.runner.call(key, Sql("INSERT OR ROLLBACK INTO t(id, v) VALUES (?, 'x')", [row]))
        except Error:
            assert row in self.rows[key]
        else:
            assert row not in self.rows[key]
            self.rows[key][row] = "x"

    @invariant()
    def read_back(self) -> None:
        """After every step, without a cut too: what the actors serve is the model
        (nothing of an earlier batch went with a rolled-back transaction)."""
        if self.runner.pool is not None:
            for key in KEYS:
                self._check(key)

    def _check(self, key: str) -> None:
        rows = self.runner.call(key, Sql("SELECT id, v FROM t ORDER BY id")).rows
        assert dict(rows) == self.rows[key], key
        named = self.runner.call(key, Sql("SELECT name, v FROM w")).rows
        assert dict(named) == self.named[key], key
        items = self.runner.call(key, KvList("", 1000)).items
        assert dict(items) == self.kv[key], key

    @rule()
    def power_cut(self) -> None:
        self.runner.power_cut_and_recover()
        for key in KEYS:
            self._check(key)
            check = self.runner.call(key, Sql("PRAGMA integrity_check")).rows
            assert check == [("ok",)]

    def teardown(self) -> None:
        self.runner.stop()
        self.vfs.unregister()
        self.patch.undo()


ReplayMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_recovery_replays_exactly = ReplayMachine.TestCase


class FileTxnReplayMachine(ReplayMachine):
    """The same with actor files committing every 4 batches (actor/_filetxn.py)."""

    PER_COMMIT = 4


FileTxnReplayMachine.TestCase.settings = settings(ReplayMachine.TestCase.settings, max_examples=40)
test_recovery_replays_exactly_with_file_transactions = FileTxnReplayMachine.TestCase
