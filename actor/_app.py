"""Actor classes: the user's code per key (the Durable Objects programming model).

    class Counter(shardlite.Actor):
        def migrate(self, db):
            db.sql("CREATE TABLE IF NOT EXISTS hits (at REAL NOT NULL) STRICT")

        @shardlite.method
        def hit(self) -> int:
            self.db.sql("INSERT INTO hits VALUES (unixepoch('subsec'))")
            return self.db.sql("SELECT count(*) FROM hits").rows[0][0]

Each key gets one instance while its actor is open (in-memory fields are lost when it is
closed: keep state in ``self.db`` or ``self.kv``). Only methods marked ``@method`` or
``@workflow`` can be called from outside. The runtime that runs them is ``_appruntime.py``.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import apsw
import msgspec

from ._errors import BadRequest, Error, NotFound
from ._ops import KvDelete, KvGet, KvList, KvPut, Params, SqlResult
from ._sandbox import internal_sql
from ._sqlerrors import map_error

if TYPE_CHECKING:
    from ._actor import Actor as Executor

log = logging.getLogger("shardlite.app")

F = TypeVar("F", bound=Callable[..., Any])

RESERVED_ALARM_PREFIX = "_"
"""Alarm names starting with this are shardlite's own (workflow wake-ups)."""
MAX_ALARM_NAME_BYTES = 512

ALARMS_DDL = internal_sql(
    "CREATE TABLE IF NOT EXISTS _shardlite_alarms (name TEXT PRIMARY KEY, at REAL NOT NULL,"
    " payload BLOB, attempts INTEGER NOT NULL DEFAULT 0) STRICT, WITHOUT ROWID"
)
_ALARM_SET = internal_sql(
    "INSERT OR REPLACE INTO _shardlite_alarms (name, at, payload, attempts) VALUES (?, ?, ?, 0)"
)
_ALARM_DEL = internal_sql("DELETE FROM _shardlite_alarms WHERE name = ?")
_ALARM_GET = internal_sql("SELECT at FROM _shardlite_alarms WHERE name = ?")
_ALARM_LIST = internal_sql(
    "SELECT name, at, payload FROM _shardlite_alarms WHERE name NOT LIKE '\\_%' ESCAPE '\\'"
    " ORDER BY at"
)

_msgpack_encode = msgspec.msgpack.Encoder().encode
_msgpack_decode = msgspec.msgpack.decode

current_executor: contextvars.ContextVar[Executor | None] = contextvars.ContextVar(
    "shardlite_current_executor", default=None
)
"""The actor whose transaction the running code may use (set while a method, an alarm
handler, a migration or a workflow step runs)."""


def method(fn: F) -> F:
    """Make an actor-class method callable over HTTP, RPC and from other actors.

    A plain ``def`` runs inline in the actor's group commit, in a savepoint of its own:
    atomic, and the caller gets the result once its writes are durable. An ``async def``
    runs alone on its actor as one transaction, from its start to its return, across
    its awaits (other calls to the actor wait); it may ``await self.actor(k).call(...)``.
    """
    fn._shardlite_kind = "method"  # type: ignore[attr-defined]
    return fn


def workflow(fn: F) -> F:
    """Make an ``async def`` a durable workflow: ``async def name(self, wf, *args)``.

    Each ``await wf.step(name, fn)`` result is journalled in the actor's file; a workflow
    resumed after a crash or restart skips the steps it completed. ``await wf.sleep(s)``
    survives restarts too (an alarm wakes it).
    """
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@shardlite.workflow needs an async def, got {fn!r}")
    fn._shardlite_kind = "workflow"  # type: ignore[attr-defined]
    return fn


class Db:
    """``self.db``: SQL on the actor's own file, inside the running call's transaction."""

    __slots__ = ("_executor",)

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def sql(self, sql: str, params: Params = None) -> SqlResult:
        """Run one statement (same sandbox and limits as a client's ``sql``)."""
        executor = _require(self._executor)
        try:
            return executor._exec_sql(sql, params)
        except apsw.Error as exc:
            raise map_error(exc, executor._auth) from None


class Kv:
    """``self.kv``: the actor's key-value store (the same one clients see)."""

    __slots__ = ("_executor",)

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return _require(self._executor)._apply_kv(KvGet(name)).value  # type: ignore[union-attr]
        except NotFound:
            return default

    def put(self, name: str, value: Any) -> None:
        _require(self._executor)._apply_kv(KvPut(name, value))

    def delete(self, name: str) -> bool:
        return bool(_require(self._executor)._apply_kv(KvDelete(name)).deleted)  # type: ignore[union-attr]

    def list(self, prefix: str = "", limit: int = 100, after: str | None = None) -> list[Any]:
        return list(_require(self._executor)._apply_kv(KvList(prefix, limit, after)).items)  # type: ignore[union-attr]


class Alarms:
    """``self.alarms``: named durable timers of this actor (any number of them).

    Setting a name again moves it. When one is due, the actor (woken if it was closed)
    runs ``on_alarm(name, payload)`` in a transaction; if that raises, it is retried
    with exponential backoff (at least once delivery). Alarms survive restarts.
    """

    __slots__ = ("_executor",)

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def set(
        self, name: str, *, delay: float | None = None, at: float | None = None, payload: Any = None
    ) -> float:
        """Fire ``name`` after ``delay`` seconds, or at ``at`` (a Unix time). Returns the time."""
        _check_alarm_name(name)
        return set_alarm(_require(self._executor), name, _when(delay, at), payload)

    def cancel(self, name: str) -> bool:
        """Remove ``name``; True if it was set."""
        _check_alarm_name(name)
        executor = _require(self._executor)
        with _trusted(executor):
            executor.conn.execute(_ALARM_DEL, (name,))  # type: ignore[union-attr]
            removed = executor.conn.changes() > 0  # type: ignore[union-attr]
        executor.alarms_dirty = True
        return removed

    def get(self, name: str) -> float | None:
        """When ``name`` fires next (a Unix time), or None."""
        executor = _require(self._executor)
        with _trusted(executor):
            rows = executor.conn.execute(_ALARM_GET, (name,)).fetchall()  # type: ignore[union-attr]
        return float(rows[0][0]) if rows else None  # type: ignore[arg-type]

    def list(self) -> list[tuple[str, float, Any]]:
        """Every alarm set: (name, time, payload), soonest first."""
        executor = _require(self._executor)
        with _trusted(executor):
            rows = executor.conn.execute(_ALARM_LIST).fetchall()  # type: ignore[union-attr]
        return [(str(n), float(a), _decode_payload(p)) for n, a, p in rows]  # type: ignore[arg-type]


def set_alarm(executor: Executor, name: str, at: float, payload: Any) -> float:
    """Set an alarm inside the actor's open transaction (no checks: shardlite's own use)."""
    try:
        blob = None if payload is None else _msgpack_encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"alarm payload cannot be stored: {exc}") from None
    with _trusted(executor):
        executor.conn.execute(_ALARM_SET, (name, at, blob))  # type: ignore[union-attr]
    executor.alarms_dirty = True
    return at


def _decode_payload(blob: Any) -> Any:
    return None if blob is None else _msgpack_decode(blob)


def _when(delay: float | None, at: float | None) -> float:
    if (delay is None) == (at is None):
        raise BadRequest("set an alarm with exactly one of delay= or at=")
    when = time.time() + float(delay) if delay is not None else float(at)  # type: ignore[arg-type]
    if not math.isfinite(when):
        raise BadRequest("an alarm's time must be a finite number")
    return when


def _check_alarm_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise BadRequest("an alarm name is a non-empty string")
    if name.startswith(RESERVED_ALARM_PREFIX):
        raise BadRequest(f"alarm names starting with {RESERVED_ALARM_PREFIX!r} are reserved")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_ALARM_NAME_BYTES:
        raise BadRequest(f"an alarm name is at most {MAX_ALARM_NAME_BYTES} bytes")


class _trusted:
    """Run shardlite's own statements on the actor's connection (the sandbox allows them)."""

    __slots__ = ("_auth",)

    def __init__(self, executor: Executor) -> None:
        self._auth = executor._auth

    def __enter__(self) -> None:
        assert self._auth is not None
        self._auth.trusted = True

    def __exit__(self, *exc: object) -> None:
        assert self._auth is not None
        self._auth.trusted = False


def _require(executor: Executor) -> Executor:
    if current_executor.get() is not executor or executor.conn is None:
        raise Error(
            "self.db, self.kv and self.alarms work only while this actor runs a method, an "
            "alarm, a migration or a workflow step (in a workflow, touch the database "
            "inside wf.step)"
        )
    return executor


class Actor:
    """Base of actor classes: subclass it and mark callable methods with ``@method``.

    Attributes: ``key`` (this instance's actor key), ``db``, ``kv``, ``alarms``.
    ``schema_version`` (class attribute, default 1): ``migrate(db)`` runs once per actor
    file whenever it is newer than the version the file has, atomically, before the
    first call. ``migrate(db, version)`` also gets the version the file had (0: new).
    """

    schema_version: ClassVar[int] = 1
    key: str
    db: Db
    kv: Kv
    alarms: Alarms
    _shardlite_peer: Callable[[str], Any]

    def migrate(self, db: Db) -> None:
        """Bring the file's schema to ``schema_version`` (default: nothing to do)."""

    def on_alarm(self, name: str, payload: Any) -> Any:
        """An alarm set with ``self.alarms.set`` is due. May be ``async def``."""
        log.warning("actor %r: alarm %r fired but %s has no on_alarm", self.key, name, type(self))

    def actor(self, key: str) -> Any:
        """Another actor, to ``await .call(method, ...)`` or ``await .sql(...)`` from an
        ``async`` method or a workflow (routed like any client call)."""
        return self._shardlite_peer(key)


class MethodInfo:
    __slots__ = ("fn", "is_async", "kind", "name", "wants_version")

    def __init__(self, name: str, fn: Callable[..., Any], kind: str) -> None:
        self.name = name
        self.fn = fn
        self.kind = kind
        self.is_async = inspect.iscoroutinefunction(fn)
        self.wants_version = False


class ClassInfo:
    """What the runtime needs to know of an actor class, computed once."""

    def __init__(self, cls: type[Actor]) -> None:
        self.cls = cls
        self.name = f"{cls.__module__}.{cls.__qualname__}"
        version = getattr(cls, "schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise TypeError(f"{self.name}.schema_version must be an integer >= 1")
        self.schema_version = version
        self.methods: dict[str, MethodInfo] = {}
        for name in dir(cls):
            fn = getattr(cls, name, None)
            kind = getattr(fn, "_shardlite_kind", None)
            if kind is not None and callable(fn):
                self.methods[name] = MethodInfo(name, fn, kind)
        migrate = cls.migrate
        if inspect.iscoroutinefunction(migrate):
            raise TypeError(f"{self.name}.migrate must be a plain def (it runs in a transaction)")
        self.migrate_wants_version = len(inspect.signature(migrate).parameters) >= 3
        self.alarm_is_async = inspect.iscoroutinefunction(cls.on_alarm)

    def method(self, name: str) -> MethodInfo:
        info = self.methods.get(name)
        if info is None:
            raise NotFound(
                f"{self.cls.__qualname__} has no method {name!r} (callable methods are marked "
                "@shardlite.method or @shardlite.workflow)"
            )
        return info


class App:
    """Which actor class serves which keys: the longest matching prefix wins.

        app = shardlite.App({"counter-": Counter, "order-": Order}, default=Doc)

    Keys no class serves are plain SQL actors (``call`` answers not_found).
    """

    def __init__(
        self,
        classes: Mapping[str, type[Actor]] | None = None,
        *,
        default: type[Actor] | None = None,
    ) -> None:
        self._by_prefix = sorted((classes or {}).items(), key=lambda kv: -len(kv[0]))
        self.default = default
        self._infos: dict[type[Actor], ClassInfo] = {}
        for cls in [c for _, c in self._by_prefix] + ([default] if default else []):
            if not (isinstance(cls, type) and issubclass(cls, Actor)):
                raise TypeError(f"{cls!r} is not a subclass of shardlite.Actor")
            self._infos[cls] = ClassInfo(cls)

    def class_for(self, key: str) -> ClassInfo | None:
        for prefix, cls in self._by_prefix:
            if key.startswith(prefix):
                return self._infos[cls]
        return self._infos[self.default] if self.default is not None else None

    def describe(self) -> str:
        parts = [f"{p!r}: {self._infos[c].name}" for p, c in self._by_prefix]
        if self.default is not None:
            parts.append(f"default: {self._infos[self.default].name}")
        return ", ".join(parts)


def load_app(spec: str) -> App:
    """``MODULE:OBJECT`` (an Actor subclass or an App), imported with the working
    directory on the path, like ``uvicorn`` and ``hypercorn`` do."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--app {spec!r}: expected MODULE:OBJECT, e.g. counter:Counter")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--app {spec!r}: {module_name} has no {attr!r}") from None
    if isinstance(obj, App):
        return obj
    if isinstance(obj, type) and issubclass(obj, Actor):
        return App(default=obj)
    raise ValueError(f"--app {spec!r}: {obj!r} is neither a shardlite.Actor subclass nor an App")


AsyncFn = Callable[..., Awaitable[Any]]

__all__ = [
    "ALARMS_DDL",
    "Actor",
    "Alarms",
    "App",
    "ClassInfo",
    "Db",
    "Kv",
    "MethodInfo",
    "current_executor",
    "load_app",
    "method",
    "set_alarm",
    "workflow",
]
