"""The operations an actor performs and the results it returns.

These structs are also the RPC wire format (``router/_wire.py`` wraps them in an
envelope), so they are tagged and array-like: ``["sql", "SELECT ?", [1]]``.
"""

from __future__ import annotations

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


Op: TypeAlias = Sql | Batch | KvGet | KvPut | KvDelete | KvList
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


Result: TypeAlias = SqlResult | BatchResult | KvValue | KvOk | Deleted | KvItems | ExportResult

MAX_KV_NAME_BYTES = 2048
MAX_KV_LIST_LIMIT = 1000
