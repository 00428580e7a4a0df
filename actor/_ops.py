"""The operations an actor performs and the results it returns.

These structs are also the RPC wire format (``router/_wire.py`` wraps them in an
envelope), so they are tagged and array-like: ``["sql", "SELECT ?", [1]]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import msgspec

Value: TypeAlias = bool | int | float | str | bytes | None
"""A SQLite value as shardlite carries it (bool binds as 0/1)."""
Params: TypeAlias = list[Any] | dict[str, Any] | None
"""Statement parameters: a list for ``?``, a dict for ``:name``; each a :data:`Value`.
(msgspec cannot type a str|bytes union, so the values are checked when they are bound.)"""


class Statement(msgspec.Struct, array_like=True, frozen=True):
    """One SQL statement with its parameters (positional list or named dict)."""

    sql: str
    params: Params = None


class Sql(msgspec.Struct, tag="sql", array_like=True, frozen=True):
    """Run one statement; a write is committed before the reply (group commit)."""

    sql: str
    params: Params = None


class Batch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Run several statements atomically: all succeed, or none is applied."""

    statements: list[Statement]


class KvGet(msgspec.Struct, tag="kv_get", array_like=True, frozen=True):
    name: str


class KvPut(msgspec.Struct, tag="kv_put", array_like=True, frozen=True):
    name: str
    value: Any


class KvDelete(msgspec.Struct, tag="kv_delete", array_like=True, frozen=True):
    name: str


class KvList(msgspec.Struct, tag="kv_list", array_like=True, frozen=True):
    prefix: str = ""
    limit: int = 100
    after: str | None = None


class CallMethod(msgspec.Struct, tag="call", array_like=True, frozen=True):
    """Call a method of the key's actor class (``@shardlite.method``), or start a
    ``@shardlite.workflow`` (then ``workflow_id`` names the run: starting it again with
    the same id returns the first run's status instead of starting another)."""

    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    workflow_id: str | None = None


class WorkflowList(msgspec.Struct, tag="workflows", array_like=True, frozen=True):
    """The workflows of an actor, newest first (``status``: only those in that state)."""

    status: str | None = None
    limit: int = 100


class WorkflowGet(msgspec.Struct, tag="workflow", array_like=True, frozen=True):
    """One workflow with its journal of steps."""

    id: str


Op: TypeAlias = (
    Sql | Batch | KvGet | KvPut | KvDelete | KvList | CallMethod | WorkflowList | WorkflowGet
)
"""An operation that runs inside the actor's transaction."""


class SqlResult(msgspec.Struct, array_like=True):
    """What one statement returned: column names, rows, rows changed, last rowid."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    changes: int = 0
    last_insert_rowid: int = 0


class BatchResult(msgspec.Struct, array_like=True):
    results: list[SqlResult]


class KvValue(msgspec.Struct, array_like=True):
    value: Any


class KvOk(msgspec.Struct, array_like=True):
    ok: bool = True


class Deleted(msgspec.Struct, array_like=True):
    """Whether something existed and was removed (a KV entry, an actor)."""

    deleted: bool


class KvItems(msgspec.Struct, array_like=True):
    items: list[tuple[str, Any]]


class ExportResult(msgspec.Struct, array_like=True):
    """A consistent copy of an actor's SQLite file."""

    data: bytes


class Inline:
    """A runtime-internal operation (never on the wire): ``fn(actor)`` runs inside the
    actor's transaction, in a savepoint, and returns the call's result."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn


class FireAlarms(Inline):
    """Run the key's due alarms (submitted by the alarm scheduler)."""


class CallResult(msgspec.Struct, array_like=True):
    """What a method returned (any msgspec-encodable value)."""

    value: Any


class StepInfo(msgspec.Struct):
    """One journalled step of a workflow."""

    seq: int
    name: str
    status: str  # "done" | "failed" | "retrying" | "sleeping"
    attempts: int
    result: Any = None
    error: str | None = None
    updated: float = 0.0


class WorkflowInfo(msgspec.Struct):
    """A workflow run of an actor: ``status`` is running, sleeping, completed or failed."""

    id: str
    method: str
    status: str
    created: float
    updated: float
    result: Any = None
    error: str | None = None
    steps: list[StepInfo] = []


class WorkflowItems(msgspec.Struct, array_like=True):
    items: list[WorkflowInfo]


Result: TypeAlias = (
    SqlResult
    | BatchResult
    | KvValue
    | KvOk
    | Deleted
    | KvItems
    | ExportResult
    | CallResult
    | WorkflowInfo
    | WorkflowItems
)

MAX_KV_NAME_BYTES = 2048
MAX_KV_LIST_LIMIT = 1000
