"""Durable workflows: ``@shardlite.workflow`` methods whose steps are journalled.

A workflow run is a row of ``_shardlite_workflows`` in its actor's file; each step is
a row of ``_shardlite_steps`` keyed by (workflow, seq). The body runs as a task of its
own (a *runner*), outside the actor's transactions, and touches the file only through
its steps:

* ``await wf.step(name, fn)``: if the journal holds step ``seq`` done, its result is
  returned without running ``fn``. Else a plain ``fn`` runs inside the actor, in one
  transaction with the journal row (its writes and its completion are atomic: exactly
  once); an ``async fn`` runs in the runner and its result is journalled afterwards (at
  least once: a crash in between runs it again). Failures retry with backoff per the
  step's policy; the last one is journalled and raised into the body.
* ``await wf.sleep(s)`` / ``sleep_until(t)``: journals the wake time and sets the
  workflow's alarm to it; the runner ends, and the alarm starts a new one then.

Resuming after a crash: while a workflow runs, its alarm (``_wf:<id>``) is kept
``RESUME_AFTER_S`` ahead. If the process dies, the alarm fires after the restart, and a
runner replays the body: completed steps return their journalled results, so nothing
they did runs twice. Bodies must be deterministic between steps (same steps, same
order): a step whose name differs from the journal's fails the workflow.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import trio

from ._actor import Actor as Executor
from ._app import MethodInfo, set_alarm
from ._errors import BadRequest, Error, NotFound, StepFailed
from ._ops import (
    CallMethod,
    CallResult,
    Inline,
    StepInfo,
    WorkflowGet,
    WorkflowInfo,
    WorkflowItems,
    WorkflowList,
)
from ._sandbox import internal_sql

if TYPE_CHECKING:
    from ._appruntime import AppRuntime

log = logging.getLogger("shardlite.workflow")

ALARM_PREFIX = "_wf:"
RESUME_AFTER_S = 5.0
"""A running workflow's alarm is kept this far ahead: how soon it resumes after a crash."""
INLINE_SLEEP_S = 1.0
"""Sleeps shorter than this wait in the runner instead of ending it."""
MAX_WORKFLOW_ID_BYTES = 256
STATUSES = ("running", "sleeping", "completed", "failed")

WORKFLOW_DDL = (
    internal_sql(
        "CREATE TABLE IF NOT EXISTS _shardlite_workflows (id TEXT PRIMARY KEY, method TEXT NOT NULL,"
        " args BLOB NOT NULL, status TEXT NOT NULL, result BLOB, error TEXT,"
        " created REAL NOT NULL, updated REAL NOT NULL) STRICT, WITHOUT ROWID"
    ),
    internal_sql(
        "CREATE TABLE IF NOT EXISTS _shardlite_steps (workflow TEXT NOT NULL, seq INTEGER NOT NULL,"
        " name TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL, result BLOB,"
        " error TEXT, updated REAL NOT NULL, PRIMARY KEY (workflow, seq)) STRICT, WITHOUT ROWID"
    ),
)
_WF_GET = internal_sql(
    "SELECT id, method, status, created, updated, result, error, args FROM _shardlite_workflows WHERE id = ?"
)
_WF_LIST = internal_sql(
    "SELECT id, method, status, created, updated, result, error, args FROM _shardlite_workflows"
    " WHERE ?1 IS NULL OR status = ?1 ORDER BY created DESC LIMIT ?2"
)
_WF_INSERT = internal_sql(
    "INSERT INTO _shardlite_workflows (id, method, args, status, created, updated)"
    " VALUES (?, ?, ?, 'running', ?, ?)"
)
_WF_STATUS = internal_sql(
    "UPDATE _shardlite_workflows SET status = ?, result = ?, error = ?, updated = ? WHERE id = ?"
)
_STEPS = internal_sql(
    "SELECT seq, name, status, attempts, result, error, updated FROM _shardlite_steps"
    " WHERE workflow = ? ORDER BY seq"
)
_STEP_PUT = internal_sql(
    "INSERT OR REPLACE INTO _shardlite_steps (workflow, seq, name, status, attempts, result, error, updated)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_ALARM_DEL = internal_sql("DELETE FROM _shardlite_alarms WHERE name = ?")

_encode = msgspec.msgpack.Encoder().encode


def _decode(blob: Any) -> Any:
    return None if blob is None else msgspec.msgpack.decode(blob)


def is_workflow_alarm(name: str) -> bool:
    return name.startswith(ALARM_PREFIX)


class _Suspend(BaseException):
    """The body sleeps until an alarm: end this runner (not an error)."""


class _Pause(BaseException):
    """The actor cannot be reached now (overloaded, shutting down): end this runner; the
    workflow's alarm resumes it. Not a failure of the step."""


class Workflow:
    """The ``wf`` argument of a workflow method: its id, steps and sleeps."""

    def __init__(
        self, engine: WorkflowEngine, key: str, wf_id: str, steps: dict[int, StepInfo]
    ) -> None:
        self._engine = engine
        self.key = key
        self.id = wf_id
        self._steps = steps
        self._seq = 0

    def _journalled(self, name: str) -> tuple[int, StepInfo | None]:
        self._seq += 1
        seq = self._seq
        row = self._steps.get(seq)
        if row is not None and row.name != name:
            raise BadRequest(
                f"workflow {self.id!r} is not deterministic: step {seq} was {row.name!r} "
                f"in the journal, now {name!r}"
            )
        return seq, row

    async def step(
        self,
        name: str,
        fn: Any,
        *,
        retries: int = 0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> Any:
        """Run ``fn()`` once for this workflow; its result is journalled.

        ``fn`` is a plain function (runs inside the actor: ``self.db`` works, atomic with
        the journal) or an async one (runs here, for I/O and calls to other actors).
        It is retried up to ``retries`` times, waiting ``backoff`` seconds, doubling.
        """
        seq, row = self._journalled(name)
        attempts = 0
        if row is not None:
            if row.status == "done":
                return row.result
            if row.status == "failed":
                raise StepFailed(f"step {name!r} failed: {row.error}")
            attempts = row.attempts
        engine = self._engine
        ref = _StepRef(self.id, seq, name)
        is_async = inspect.iscoroutinefunction(fn)
        while True:
            attempts += 1
            try:
                if is_async:
                    value = await fn()
                    _encode(value)
                    await engine.inline(
                        self.key,
                        functools.partial(
                            _record_step, ref, status="done", attempts=attempts, value=value
                        ),
                    )
                else:
                    result = await engine.inline(
                        self.key, functools.partial(_run_sync_step, ref, fn, attempts)
                    )
                    value = result.value
                return value
            except (trio.Cancelled, _Suspend, _Pause):
                raise
            except Exception as exc:
                if isinstance(exc, Error) and exc.retryable:
                    # the actor cannot be reached (overloaded, shutting down), which is no
                    # failure of the step: end the runner, the workflow's alarm resumes it
                    raise _Pause(exc.message) from exc
                error = exc.message if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}"
                last = attempts > retries
                await engine.inline(
                    self.key,
                    functools.partial(
                        _record_step,
                        ref,
                        status="failed" if last else "retrying",
                        attempts=attempts,
                        error=error,
                    ),
                )
                if last:
                    raise StepFailed(
                        f"step {name!r} failed after {attempts} attempt(s): {error}"
                    ) from None
                await trio.sleep(min(backoff * 2 ** (attempts - 1), max_backoff))

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, durably: a restart meanwhile does not shorten or lose it."""
        await self._sleep_until("sleep", time.time() + float(seconds))

    async def sleep_until(self, when: float) -> None:
        """Wait until the Unix time ``when``, durably."""
        await self._sleep_until("sleep", float(when))

    async def _sleep_until(self, name: str, when: float) -> None:
        seq, row = self._journalled(name)
        if row is None:
            await self._engine.inline(
                self.key, functools.partial(_record_sleep, self.id, seq, name, when)
            )
        else:
            when = float(row.result)
        remaining = when - time.time()
        if remaining <= 0:
            return
        if remaining < INLINE_SLEEP_S:
            await trio.sleep(remaining)
            return
        raise _Suspend


class WorkflowEngine:
    """Starts, resumes and inspects the workflows of one process's actors."""

    def __init__(self, runtime: AppRuntime) -> None:
        self.runtime = runtime
        self.running: set[tuple[str, str]] = set()
        self.started_count = 0
        self.completed = 0
        self.failed = 0

    # ------------------------------------------------------------------ in the actor

    def start(self, executor: Executor, m: MethodInfo, op: CallMethod) -> CallResult:
        """Insert the workflow row (or find it: idempotent by id); its runner starts
        once this is durable (``started``)."""
        wf_id = op.workflow_id or uuid.uuid4().hex
        if not wf_id or len(wf_id.encode("utf-8", "surrogatepass")) > MAX_WORKFLOW_ID_BYTES:
            raise BadRequest(f"a workflow id is 1 to {MAX_WORKFLOW_ID_BYTES} bytes long")
        conn = executor.conn
        assert conn is not None
        existing = _query(executor, _WF_GET, (wf_id,))
        if existing:
            info = _info(existing[0])
            if info.method != m.name:
                raise BadRequest(
                    f"workflow id {wf_id!r} is already used by a {info.method!r} workflow"
                )
            return CallResult(_summary(info))
        try:
            args = _encode((op.args, op.kwargs))
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"workflow arguments cannot be stored: {exc}") from None
        now = time.time()
        _exec(executor, _WF_INSERT, (wf_id, m.name, args, now, now))
        set_alarm(executor, ALARM_PREFIX + wf_id, now + RESUME_AFTER_S, None)
        return CallResult(
            {"workflow_id": wf_id, "method": m.name, "status": "running", "created": now}
        )

    def list_runs(self, executor: Executor, op: WorkflowList) -> WorkflowItems:
        if op.status is not None and op.status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        if not 0 < op.limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        return WorkflowItems([_info(r) for r in _query(executor, _WF_LIST, (op.status, op.limit))])

    def get_run(self, executor: Executor, op: WorkflowGet) -> WorkflowInfo:
        rows = _query(executor, _WF_GET, (op.id,))
        if not rows:
            raise NotFound(f"actor {executor.key!r} has no workflow {op.id!r}")
        info = _info(rows[0])
        info.steps = [_step(r) for r in _query(executor, _STEPS, (op.id,))]
        return info

    def on_alarm(self, executor: Executor, name: str, at: float, resumed: list[str]) -> None:
        """The workflow's alarm is due: push it ahead and resume it unless it runs."""
        wf_id = name[len(ALARM_PREFIX) :]
        rows = _query(executor, _WF_GET, (wf_id,))
        if not rows or rows[0][2] not in ("running", "sleeping"):
            _exec(executor, _ALARM_DEL, (name,))
            return
        set_alarm(executor, name, time.time() + RESUME_AFTER_S, None)
        if (executor.key, wf_id) not in self.running:
            resumed.append(wf_id)

    # ------------------------------------------------------------------ runners

    def started(self, key: str, result: Any) -> None:
        value = result.value if isinstance(result, CallResult) else None
        if isinstance(value, dict) and value.get("status") in ("running",):
            self.resume(key, value["workflow_id"])

    def resume(self, key: str, wf_id: str) -> None:
        if (key, wf_id) in self.running:
            return
        self.running.add((key, wf_id))
        self.runtime.pool._spawn(self._run, key, wf_id)

    async def inline(self, key: str, fn: Any) -> Any:
        return await self.runtime.pool.call(key, Inline(fn))

    async def _run(self, key: str, wf_id: str) -> None:
        try:
            loaded = await self.inline(key, functools.partial(_load, wf_id))
            info, instance, m = loaded.value
            if info.status not in ("running", "sleeping"):
                return
            self.started_count += 1
            if info.status == "sleeping":
                await self.inline(key, functools.partial(_set_status, wf_id, "running", None, None))
            steps = {s.seq: s for s in info.steps}
            wf = Workflow(self, key, wf_id, steps)
            args, kwargs = info.result
            try:
                value = await m.fn(instance, wf, *args, **kwargs)
                _encode(value)
            except _Pause as pause:
                log.info("workflow %s of %r paused: %s", wf_id, key, pause)
                return
            except _Suspend:
                await self.inline(
                    key, functools.partial(_set_status, wf_id, "sleeping", None, None)
                )
                return
            except trio.Cancelled:
                raise
            except Exception as exc:
                error = exc.message if isinstance(exc, Error) else f"{type(exc).__name__}: {exc}"
                log.warning("workflow %s of %r failed: %s", wf_id, key, error)
                self.failed += 1
                await self.inline(key, functools.partial(_set_status, wf_id, "failed", None, error))
                return
            self.completed += 1
            await self.inline(key, functools.partial(_set_status, wf_id, "completed", value, None))
        except Error as exc:  # the actor cannot be reached now: its alarm resumes it later
            log.warning("workflow %s of %r paused: %s", wf_id, key, exc.message)
        finally:
            self.running.discard((key, wf_id))

    def statistics(self) -> dict[str, Any]:
        return {
            "workflows_running": len(self.running),
            "workflows_started": self.started_count,
            "workflows_completed": self.completed,
            "workflows_failed": self.failed,
        }


# ---------------------------------------------------------------------- in the actor


def _query(executor: Executor, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    auth = executor._auth
    assert executor.conn is not None and auth is not None
    auth.trusted = True
    try:
        return executor.conn.execute(sql, params).fetchall()
    finally:
        auth.trusted = False


def _exec(executor: Executor, sql: str, params: tuple[Any, ...]) -> None:
    _query(executor, sql, params)


def _info(row: tuple[Any, ...]) -> WorkflowInfo:
    wf_id, method, status, created, updated, result, error, _args = row
    return WorkflowInfo(wf_id, method, status, created, updated, _decode(result), error)


def _summary(info: WorkflowInfo) -> dict[str, Any]:
    return {
        "workflow_id": info.id,
        "method": info.method,
        "status": info.status,
        "created": info.created,
    }


def _step(row: tuple[Any, ...]) -> StepInfo:
    seq, name, status, attempts, result, error, updated = row
    return StepInfo(seq, name, status, attempts, _decode(result), error, updated)


def _load(wf_id: str, executor: Executor) -> CallResult:
    rows = _query(executor, _WF_GET, (wf_id,))
    if not rows:
        raise NotFound(f"no workflow {wf_id!r}")
    info = _info(rows[0])
    info.steps = [_step(r) for r in _query(executor, _STEPS, (wf_id,))]
    info.result = _decode(rows[0][7])  # the arguments, carried in the result slot
    assert executor.app is not None
    m = executor.app.method(info.method)
    return CallResult((info, executor.instance, m))


def _keep_alive(executor: Executor, wf_id: str) -> None:
    set_alarm(executor, ALARM_PREFIX + wf_id, time.time() + RESUME_AFTER_S, None)


class _StepRef(NamedTuple):
    wf_id: str
    seq: int
    name: str


def _run_sync_step(ref: _StepRef, fn: Any, attempts: int, executor: Executor) -> CallResult:
    value = fn()  # apply() has made this actor current: the step may use self.db
    _record_step(ref, executor, status="done", attempts=attempts, value=value)
    return CallResult(value)


def _record_step(
    ref: _StepRef,
    executor: Executor,
    *,
    status: str,
    attempts: int,
    value: Any = None,
    error: str | None = None,
) -> CallResult:
    try:
        blob = None if value is None else _encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(
            f"step {ref.name!r} returned a value that cannot be journalled: {exc}"
        ) from None
    row = (ref.wf_id, ref.seq, ref.name, status, attempts, blob, error, time.time())
    _exec(executor, _STEP_PUT, row)
    _keep_alive(executor, ref.wf_id)
    return CallResult(None)


def _record_sleep(wf_id: str, seq: int, name: str, when: float, executor: Executor) -> CallResult:
    _exec(executor, _STEP_PUT, (wf_id, seq, name, "sleeping", 1, _encode(when), None, time.time()))
    set_alarm(executor, ALARM_PREFIX + wf_id, max(when, time.time()), None)
    return CallResult(None)


def _set_status(
    wf_id: str, status: str, value: Any, error: str | None, executor: Executor
) -> CallResult:
    blob = None if value is None else _encode(value)
    _exec(executor, _WF_STATUS, (status, blob, error, time.time(), wf_id))
    if status in ("completed", "failed"):
        _exec(executor, _ALARM_DEL, (ALARM_PREFIX + wf_id,))
        executor.alarms_dirty = True
    elif status == "running":
        _keep_alive(executor, wf_id)
    return CallResult(None)


__all__ = [
    "ALARM_PREFIX",
    "WORKFLOW_DDL",
    "StepFailed",
    "Workflow",
    "WorkflowEngine",
    "is_workflow_alarm",
]
