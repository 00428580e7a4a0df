"""The key-value API of an actor: a hidden table in its own file, values as msgpack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apsw
import msgspec

from ._errors import BadRequest, NotFound, TooLarge
from ._ops import (
    MAX_KV_LIST_LIMIT,
    MAX_KV_NAME_BYTES,
    Deleted,
    KvDelete,
    KvGet,
    KvItems,
    KvList,
    KvOk,
    KvPut,
    KvValue,
    Op,
    Result,
)
from ._sandbox import Authorizer, internal_sql

_encode = msgspec.msgpack.Encoder().encode
_decode: Callable[[Any], Any] = msgspec.msgpack.Decoder().decode

_KV_GET = internal_sql("SELECT value FROM _shardlite_kv WHERE name = ?")
_KV_PUT = internal_sql(
    "INSERT INTO _shardlite_kv (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_KV_DELETE = internal_sql("DELETE FROM _shardlite_kv WHERE name = ?")
_KV_LIST = internal_sql(
    "SELECT name, value FROM _shardlite_kv WHERE name > ? AND name >= ? "
    "AND (? IS NULL OR name < ?) ORDER BY name LIMIT ?"
)


def apply_kv(conn: apsw.Connection, auth: Authorizer, op: Op, max_value_bytes: int) -> Result:
    """Run one KV operation inside the actor's open transaction."""
    if isinstance(op, KvList):
        if not 0 < op.limit <= MAX_KV_LIST_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_KV_LIST_LIMIT}, got {op.limit}")
        upper = _prefix_upper_bound(op.prefix)
        auth.trusted = True
        try:
            rows = conn.execute(
                _KV_LIST, (op.after or "", op.prefix, upper, upper, op.limit)
            ).fetchall()
        finally:
            auth.trusted = False
        return KvItems([(str(name), _decode(value)) for name, value in rows])
    name: str = op.name  # type: ignore[union-attr]
    if len(name.encode("utf-8", "surrogatepass")) > MAX_KV_NAME_BYTES:
        raise BadRequest(f"KV name is longer than {MAX_KV_NAME_BYTES} bytes")
    auth.trusted = True
    try:
        if isinstance(op, KvGet):
            rows = conn.execute(_KV_GET, (name,)).fetchall()
            if not rows:
                raise NotFound(f"no KV entry named {name!r}")
            return KvValue(_decode(rows[0][0]))
        if isinstance(op, KvPut):
            try:
                encoded = _encode(op.value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise BadRequest(f"KV value cannot be stored: {exc}") from None
            if len(encoded) > max_value_bytes:
                raise TooLarge(f"KV value is {len(encoded)} bytes; the limit is {max_value_bytes}")
            conn.execute(_KV_PUT, (name, encoded))
            return KvOk()
        if isinstance(op, KvDelete):
            conn.execute(_KV_DELETE, (name,))
            return Deleted(conn.changes() > 0)
    finally:
        auth.trusted = False
    raise BadRequest(f"unknown operation {type(op).__name__}")


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (BINARY order)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


__all__ = ["apply_kv"]
