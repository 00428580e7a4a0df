"""Idempotency keys: a retried request returns its first result and applies nothing twice.

A call may carry a key (HTTP ``Idempotency-Key``, the 4th element of an RPC request).
The actor looks it up in its own file before running the call; on a hit it answers the
stored result without running anything. After a call succeeds the key, a fingerprint of
the request and the encoded result are written *in the same transaction* as the call's
writes: they are durable together, logged together, and rolled back together. Entries
expire after a TTL (default a day); a key reused for a different request is refused.
Failed calls store nothing: they applied nothing, so running them again is safe.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import apsw
import msgspec

from ._errors import BadRequest
from ._ops import (
    BatchResult,
    CallResult,
    Deleted,
    KvItems,
    KvOk,
    KvValue,
    Result,
    SqlResult,
    WorkflowInfo,
)
from ._sandbox import internal_sql

MAX_IDEMPOTENCY_KEY_BYTES = 256
CLEANUP_EVERY = 64
CLEANUP_BATCH = 100

IDEM_DDL = internal_sql(
    "CREATE TABLE IF NOT EXISTS _shardlite_idem (key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL,"
    " result BLOB NOT NULL, expires REAL NOT NULL) STRICT, WITHOUT ROWID"
)
_GET = internal_sql("SELECT fingerprint, result, expires FROM _shardlite_idem WHERE key = ?")
_PUT = internal_sql(
    "INSERT OR REPLACE INTO _shardlite_idem (key, fingerprint, result, expires) VALUES (?, ?, ?, ?)"
)
_EXPIRE = internal_sql(
    "DELETE FROM _shardlite_idem WHERE key IN "
    "(SELECT key FROM _shardlite_idem WHERE expires < ? LIMIT ?)"
)

_TYPES: dict[str, type[msgspec.Struct]] = {
    "sql": SqlResult,
    "batch": BatchResult,
    "kv_value": KvValue,
    "kv_ok": KvOk,
    "deleted": Deleted,
    "kv_items": KvItems,
    "call": CallResult,
    "workflow": WorkflowInfo,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}
_encode = msgspec.msgpack.Encoder().encode


def check_key(key: str) -> None:
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_IDEMPOTENCY_KEY_BYTES:
        raise BadRequest(f"an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes long")


def fingerprint(op: Any) -> bytes:
    return hashlib.blake2b(_encode(op), digest_size=16).digest()


def lookup(conn: apsw.Connection, key: str, op: Any) -> Result | None:
    """The stored result of an earlier call with this key, or None."""
    rows = conn.execute(_GET, (key,)).fetchall()
    if not rows:
        return None
    stored_fp, blob, expires = rows[0]
    if expires < time.time():  # type: ignore[operator]
        return None
    if stored_fp != fingerprint(op):
        raise BadRequest(
            f"idempotency key {key!r} was already used for a different request; "
            "use a new key for a new request"
        )
    name, raw = msgspec.msgpack.decode(blob)  # type: ignore[arg-type]
    result: Result = msgspec.convert(raw, _TYPES[name])  # type: ignore[assignment]
    return result


def record(
    conn: apsw.Connection, key: str, op: Any, result: Result, *, ttl_s: float, n: int
) -> None:
    """Store the result (inside the call's transaction); now and then drop expired keys."""
    now = time.time()
    blob = _encode((_NAMES[type(result)], result))
    conn.execute(_PUT, (key, fingerprint(op), blob, now + ttl_s))
    if n % CLEANUP_EVERY == 0:
        conn.execute(_EXPIRE, (now, CLEANUP_BATCH))
