"""Running actor classes inside the actor pool.

* A plain ``def`` method runs inline in the group commit, in a savepoint of its own
  (``Actor._run_call``): a failing method undoes only its own writes.
* An ``async def`` method becomes an :class:`Exclusive` mailbox entry when submitted:
  it runs alone on its actor, ``BEGIN`` at its start and ``COMMIT`` at its return, its
  reply through the same output gate as every other write.
* Before the first call after an open, :meth:`AppRuntime.prepare` creates the instance
  and, if the class's ``schema_version`` is newer than the file's, runs ``migrate`` in
  a transaction of its own.
* Alarms: the scheduler (``_alarms.py``) submits an :class:`FireAlarms` call for a due
  key; the actor runs every due alarm's ``on_alarm`` in a savepoint, deletes the ones
  that succeeded and backs off the ones that failed. Workflow wake-ups are alarms too
  (``_workflow.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import apsw
import msgspec
import trio

from ._actor import Actor as Executor
from ._actor import Call, Exclusive, Sink
from ._alarms import AlarmScheduler
from ._app import ALARMS_DDL, Alarms, App, ClassInfo, Db, Kv, MethodInfo, current_executor
from ._app import Actor as UserActor
from ._config import ActorConfig, Durability
from ._connection import META_GET, META_PUT
from ._errors import BadRequest, Error, Internal, MethodError, Timeout, no_class_error
from ._keys import shard_of_path
from ._ops import (
    CallMethod,
    CallResult,
    FireAlarms,
    Inline,
    Op,
    Result,
    SqlResult,
    WorkflowGet,
    WorkflowList,
)
from ._sandbox import internal_sql
from ._sqlerrors import map_error
from ._workflow import WORKFLOW_DDL, WorkflowEngine, is_workflow_alarm

log = logging.getLogger("shardlite.app")

MAX_ALARM_ATTEMPTS = 8
ALARM_BACKOFF_FIRST_S = 1.0
ALARM_BACKOFF_MAX_S = 600.0
FIRE_BATCH = 100
"""Alarms one fire call runs; more due ones fire in the next call."""
DELIVERED = object()
"""An exclusive call that handed its reply to the durability policy itself."""

_DUE = internal_sql(
    "SELECT name, at, payload, attempts FROM _shardlite_alarms WHERE at <= ? ORDER BY at LIMIT ?"
)
_NEXT = internal_sql("SELECT min(at) FROM _shardlite_alarms")
_DONE = internal_sql("DELETE FROM _shardlite_alarms WHERE name = ? AND at = ?")
_RETRY = internal_sql("UPDATE _shardlite_alarms SET at = ?, attempts = ? WHERE name = ? AND at = ?")
_SAVEPOINT = internal_sql("SAVEPOINT alarm")
_RELEASE = internal_sql("RELEASE alarm")
_ROLLBACK_TO = internal_sql("ROLLBACK TO alarm")
_HAS_ALARMS = internal_sql("SELECT count(*) FROM sqlite_schema WHERE name = '_shardlite_alarms'")
_encode = msgspec.msgpack.Encoder().encode


class _Due(NamedTuple):
    name: str
    at: float
    payload: Any
    attempts: int


class AppRuntime:
    """The actor classes of one process, their alarm scheduler and workflow engine."""

    def __init__(self, app: App, config: ActorConfig) -> None:
        self.app = app
        self.config = config
        self.scheduler = AlarmScheduler(full_sync=config.durability is Durability.FSYNC)
        self.workflows = WorkflowEngine(self)
        self.pool: Any = None  # the ActorPool (set by it)
        self.remote: Callable[[str, Op], Awaitable[Any]] | None = None
        """How to call an actor this process may not own (set by the shard server)."""
        self.calls = 0
        self.alarms_run = 0

    # ------------------------------------------------------------------ binding

    def bind(self, executor: Executor) -> None:
        executor.app = self.app.class_for(executor.key)
        executor.runtime = self

    def convert(self, executor: Executor, call: Call) -> None:
        """At submit: an async method becomes an exclusive entry; a workflow start
        learns to start its runner once its row is durable."""
        info = executor.app
        op = call.op
        if info is None:
            return
        if type(op) is CallMethod:
            m = info.methods.get(op.method)
            if m is None:
                return
            if m.kind == "workflow":
                call.sink = _AfterDurable(call.sink, self.workflows.started, executor.key)
            elif m.is_async:
                call.op = Exclusive(
                    functools.partial(self._run_async, op, call.sink, call.tag, call.idem)
                )
        elif type(op) is FireAlarms and info.alarm_is_async:
            call.op = Exclusive(functools.partial(self._run_async_fire, call.sink, call.tag))

    # ------------------------------------------------------------------ in the batch

    def apply(self, executor: Executor, op: Any) -> Result:
        """Run a class operation inside the batch's transaction (a savepoint is open)."""
        kind = type(op)
        if kind is Inline or kind is FireAlarms:
            token = current_executor.set(executor)
            try:
                return op.fn(executor)  # type: ignore[no-any-return]
            except (Error, apsw.Error):
                raise
            except Exception as exc:  # user code (a workflow step): undo it, say why
                raise MethodError(f"{type(exc).__name__}: {exc}") from None
            finally:
                current_executor.reset(token)
        info = executor.app
        if info is None:
            raise no_class_error(executor.key, op)
        if kind is CallMethod:
            m = info.method(op.method)
            if m.kind == "workflow":
                return self.workflows.start(executor, m, op)
            self.calls += 1
            value = self.invoke(executor, m, op.args, op.kwargs)
            return CallResult(value)
        if kind is WorkflowList:
            return self.workflows.list_runs(executor, op)
        if kind is WorkflowGet:
            return self.workflows.get_run(executor, op)
        raise BadRequest(f"unknown operation {kind.__name__}")

    def invoke(self, executor: Executor, m: MethodInfo, args: Any, kwargs: Any) -> Any:
        """Call a sync method on the instance; user exceptions become MethodError."""
        token = current_executor.set(executor)
        try:
            value = m.fn(executor.instance, *args, **kwargs)
        except Error:
            raise
        except apsw.Error:
            raise
        except TypeError as exc:
            raise _bad_args(m, args, kwargs, exc) from None
        except Exception as exc:
            raise MethodError(_describe(m.name, exc)) from None
        finally:
            current_executor.reset(token)
        return _checked(executor, m.name, value)

    # ------------------------------------------------------------------ open, migrate

    def prepare(self, executor: Executor) -> Error | None:
        """The instance, and the migration if the file's schema version is older."""
        info = executor.app
        assert info is not None and executor.conn is not None
        auth = executor._auth
        assert auth is not None
        auth.trusted = True
        try:
            rows = executor.conn.execute(META_GET, ("app_version",)).fetchall()
            has_alarms = executor.conn.execute(_HAS_ALARMS).fetchall()[0][0]
        finally:
            auth.trusted = False
        version = int(rows[0][0]) if rows else 0  # type: ignore[arg-type]
        try:
            instance = _instantiate(info, executor, self)
        except Exception as exc:
            return MethodError(f"{info.name}() failed: {type(exc).__name__}: {exc}")
        if version >= info.schema_version and has_alarms:
            executor.instance = instance
            executor.app_ready = True
            return None

        def migrate() -> None:
            auth.trusted = True
            try:
                conn = executor.conn
                assert conn is not None
                conn.execute(ALARMS_DDL)
                for ddl in WORKFLOW_DDL:
                    conn.execute(ddl)
                conn.execute(META_PUT, ("app_version", max(version, info.schema_version)))
                conn.execute(META_PUT, ("app_class", info.name))
            finally:
                auth.trusted = False
            executor.schema_changed = True
            if version >= info.schema_version:
                return
            token = current_executor.set(executor)
            try:
                if info.migrate_wants_version:
                    instance.migrate(instance.db, version)  # type: ignore[call-arg]
                else:
                    instance.migrate(instance.db)
            except Error:
                raise
            except Exception as exc:
                raise MethodError(
                    f"migration of {executor.key!r} to version {info.schema_version} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            finally:
                current_executor.reset(token)

        err = executor.run_own_transaction(migrate)
        if err is None:
            executor.instance = instance
            executor.app_ready = True
        return err

    # ------------------------------------------------------------------ alarms

    def alarms_changed(self, executor: Executor) -> None:
        """After a COMMIT that touched the alarms table: tell the scheduler (inline)."""
        executor.alarms_dirty = False
        conn, auth = executor.conn, executor._auth
        if conn is None or auth is None:
            return
        auth.trusted = True
        try:
            at = conn.execute(_NEXT).fetchall()[0][0]
        except apsw.SQLError:
            at = None  # no alarms table (a failed migration)
        finally:
            auth.trusted = False
        directory = shard_of_path(executor.path)
        self.scheduler.note(executor.key, directory, None if at is None else float(at))

    def deleted(self, key: str, path: str) -> None:
        self.scheduler.note(key, shard_of_path(path), None)

    def fire(self, key: str) -> None:
        """Submit a fire call for ``key`` (the scheduler's ``fire``)."""
        path = self.pool.path_of(key)
        if not os.path.exists(path):  # deleted (a crash kept its index entry): never create it
            self.scheduler.fired_ok(key)
            self.scheduler.note(key, shard_of_path(path), None)
            return
        self.pool.submit_nowait(key, [Call(FireAlarms(self._fire_sync), _FireSink(self, key))])
        self.pool.wake_runner()

    def _due(self, executor: Executor) -> list[tuple[str, float, Any, int]]:
        conn, auth = executor.conn, executor._auth
        assert conn is not None and auth is not None
        auth.trusted = True
        try:
            rows = conn.execute(_DUE, (time.time(), FIRE_BATCH)).fetchall()
        finally:
            auth.trusted = False
        executor.alarms_dirty = True  # whatever happens, report the next time afterwards
        return [(str(n), float(a), p, int(t)) for n, a, p, t in rows]  # type: ignore[arg-type]

    def _user_alarms(self, executor: Executor, resumed: list[str]) -> Iterator[_Due]:
        """The due alarms for ``on_alarm``, each inside a savepoint of its own (finish it
        with :meth:`_alarm_done`); workflow wake-ups are handled here, into ``resumed``."""
        for name, at, payload, attempts in self._due(executor):
            if is_workflow_alarm(name):
                self.workflows.on_alarm(executor, name, at, resumed)
                continue
            self._internal(executor, _SAVEPOINT)
            self.alarms_run += 1
            yield _Due(name, at, _payload(payload), attempts)

    def _alarm_done(self, executor: Executor, due: _Due, exc: BaseException | None) -> None:
        """Keep the handler's writes and drop the alarm, or undo them and back it off."""
        if exc is not None:
            self._internal(executor, _ROLLBACK_TO)
        self._internal(executor, _RELEASE)
        if exc is None:
            self._internal(executor, _DONE, (due.name, due.at))
        else:
            self._alarm_failed(executor, due.name, due.at, due.attempts, exc)

    def _fire_sync(self, executor: Executor) -> Result:
        resumed: list[str] = []
        for due in self._user_alarms(executor, resumed):
            try:
                executor.instance.on_alarm(due.name, due.payload)
            except Exception as exc:
                self._alarm_done(executor, due, exc)
                continue
            self._alarm_done(executor, due, None)
        return CallResult(resumed)

    async def _run_async_fire(self, sink: Sink, tag: Any, executor: Executor) -> Any:
        error = await self._open_and_prepare(executor)
        if error is not None:
            return error
        executor.begin_exclusive()
        token = current_executor.set(executor)
        resumed: list[str] = []
        try:
            for due in self._user_alarms(executor, resumed):
                try:
                    with trio.fail_after(self.config.call_timeout_s):
                        await executor.instance.on_alarm(due.name, due.payload)
                except Exception as exc:
                    self._alarm_done(executor, due, exc)
                    continue
                self._alarm_done(executor, due, None)
        finally:
            current_executor.reset(token)
        await self._finish(
            executor, [Call(Exclusive(_never), sink, tag)], [CallResult(resumed)], True
        )
        return DELIVERED

    def _alarm_failed(
        self, executor: Executor, name: str, at: float, attempts: int, exc: BaseException
    ) -> None:
        attempts += 1
        if attempts >= MAX_ALARM_ATTEMPTS:
            log.error(
                "actor %r: alarm %r failed %d times, dropped: %s",
                executor.key,
                name,
                attempts,
                _describe("on_alarm", exc),
            )
            self._internal(executor, _DONE, (name, at))
            return
        delay = min(ALARM_BACKOFF_FIRST_S * 2 ** (attempts - 1), ALARM_BACKOFF_MAX_S)
        log.warning(
            "actor %r: alarm %r failed (attempt %d), retrying in %.0f s: %s",
            executor.key,
            name,
            attempts,
            delay,
            _describe("on_alarm", exc),
        )
        self._internal(executor, _RETRY, (time.time() + delay, attempts, name, at))

    @staticmethod
    def _internal(executor: Executor, sql: str, params: tuple[Any, ...] = ()) -> None:
        auth = executor._auth
        assert executor.conn is not None and auth is not None
        auth.trusted = True
        try:
            executor.conn.execute(sql, params)
        finally:
            auth.trusted = False

    # ------------------------------------------------------------------ async methods

    async def _open_and_prepare(self, executor: Executor) -> Error | None:
        if executor.conn is None:
            try:
                await self.pool.open_exclusive(executor)
            except Error as exc:
                return exc
        if not executor.app_ready:
            error = self.prepare(executor)
            await self.pool.sync_if_needed(executor)
            return error
        return None

    async def _run_async(
        self, op: CallMethod, sink: Sink, tag: Any, idem: str | None, executor: Executor
    ) -> Any:
        """An async method: alone on its actor, one transaction across its awaits."""
        error = await self._open_and_prepare(executor)
        if error is not None:
            return error
        info = executor.app
        assert info is not None
        m = info.method(op.method)
        self.calls += 1
        executor.begin_exclusive()
        token = current_executor.set(executor)
        result: Result | Error
        try:
            done = executor._idem_lookup(idem, op) if idem is not None else None
            if done is not None:
                result = done
            else:
                with trio.fail_after(self.config.call_timeout_s):
                    value = await m.fn(executor.instance, *op.args, **op.kwargs)
                result = CallResult(_checked(executor, m.name, value))
                if idem is not None:
                    executor._idem_record(idem, op, result)
        except trio.TooSlowError:
            result = Timeout(
                f"{m.name} did not return within {self.config.call_timeout_s:g} s "
                "(a cycle of actors calling each other waits until this timeout)"
            )
        except Error as exc:
            result = exc
        except apsw.Error as exc:
            result = map_error(exc, executor._auth)
        except TypeError as exc:
            result = _bad_args(m, op.args, op.kwargs, exc)
        except Exception as exc:
            result = MethodError(_describe(m.name, exc))
        finally:
            current_executor.reset(token)
        ok = not isinstance(result, Error)
        await self._finish(executor, [Call(op, sink, tag)], [result], ok)
        return DELIVERED

    async def _finish(
        self, executor: Executor, calls: list[Call], results: list[Result | Error], ok: bool
    ) -> None:
        executor.finish_exclusive(calls, results, commit=ok)
        if executor.alarms_dirty:
            self.alarms_changed(executor)
        await self.pool.sync_if_needed(executor)

    # ------------------------------------------------------------------ calls out

    def peer(self, caller: str) -> Callable[[str], Peer]:
        return functools.partial(Peer, self, caller)

    async def call_key(self, key: str, op: Any) -> Any:
        if self.remote is not None:
            return await self.remote(key, op)
        return await self.pool.call(key, op)

    def statistics(self) -> dict[str, Any]:
        return {
            "method_calls": self.calls,
            "alarms_run": self.alarms_run,
            **self.scheduler.statistics(),
            **self.workflows.statistics(),
        }


class Peer:
    """``self.actor(key)``: another actor, called from an async method or a workflow."""

    def __init__(self, runtime: AppRuntime, caller: str, key: str) -> None:
        self._runtime = runtime
        self._caller = caller
        self.key = key

    def _check(self) -> None:
        running = current_executor.get()
        if running is not None and running.key == self.key:
            raise BadRequest(
                f"actor {self.key!r} cannot call itself from a method (it would wait for "
                "itself): call the method directly"
            )

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        result: CallResult = await self._runtime.call_key(
            self.key, CallMethod(method, list(args), kwargs)
        )
        return result.value

    async def sql(self, sql: str, params: Any = None) -> SqlResult:
        from ._ops import Sql

        self._check()
        result: SqlResult = await self._runtime.call_key(self.key, Sql(sql, params))
        return result


class _AfterDurable:
    """A sink that tells ``then(key, result)`` of a successful result, then delivers."""

    __slots__ = ("_key", "_sink", "_then")

    def __init__(self, sink: Sink, then: Callable[[str, Any], None], key: str) -> None:
        self._sink = sink
        self._then = then
        self._key = key

    def deliver(self, tag: Any, result: Any) -> None:
        if not isinstance(result, Error):
            self._then(self._key, result)
        self._sink.deliver(tag, result)


class _FireSink:
    __slots__ = ("_key", "_runtime")

    def __init__(self, runtime: AppRuntime, key: str) -> None:
        self._runtime = runtime
        self._key = key

    def deliver(self, tag: Any, result: Any) -> None:
        scheduler = self._runtime.scheduler
        if isinstance(result, Error):
            scheduler.fired_failed(self._key, result.message)
            return
        scheduler.fired_ok(self._key)
        for wf_id in result.value:
            self._runtime.workflows.resume(self._key, wf_id)


async def _never(executor: Executor) -> None:  # pragma: no cover - a placeholder op
    raise AssertionError


def _instantiate(info: ClassInfo, executor: Executor, runtime: AppRuntime) -> UserActor:
    obj: UserActor = info.cls.__new__(info.cls)
    obj.key = executor.key
    obj.db = Db(executor)
    obj.kv = Kv(executor)
    obj.alarms = Alarms(executor)
    obj._shardlite_peer = runtime.peer(executor.key)
    obj.__init__()  # type: ignore[misc]
    return obj


def _checked(executor: Executor, name: str, value: Any) -> Any:
    """``value`` if it can be sent back (msgspec-encodable), else a MethodError."""
    try:
        _encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MethodError(f"{name} returned a value that cannot be sent: {exc}") from None
    conn = executor.conn
    if conn is not None and conn.get_autocommit():
        raise Internal(f"{name}: SQLite rolled back the transaction (an error was swallowed)")
    return value


def _bad_args(m: MethodInfo, args: Any, kwargs: Any, exc: TypeError) -> Error:
    import inspect

    try:
        inspect.signature(m.fn).bind(None, *args, **kwargs)
    except TypeError as bind_exc:
        return BadRequest(f"bad arguments for {m.name}: {bind_exc}")
    return MethodError(_describe(m.name, exc))


def _describe(name: str, exc: BaseException) -> str:
    return f"{name} raised {type(exc).__name__}: {exc}"


def _payload(blob: Any) -> Any:
    return None if blob is None else msgspec.msgpack.decode(blob)


__all__ = ["DELIVERED", "AppRuntime", "FireAlarms", "Inline", "MethodError", "Peer"]
