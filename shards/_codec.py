"""HTTP bodies: JSON (default) or msgpack, typed decoding, and the $blob convention.

In JSON a blob is ``{"$blob": "<base64>"}``, in msgpack it is ``bin``. Request bodies
are decoded into typed structs that reject unknown fields; every failure becomes a
:class:`BadRequest` naming the problem and where it is (``at $.params[2]``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import msgspec

from shardlite.actor import (
    BadRequest,
    BatchResult,
    Error,
    Params,
    Result,
    SqlResult,
    Statement,
)

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
BLOB_KEY = "$blob"


class SqlBody(msgspec.Struct, forbid_unknown_fields=True):
    sql: str
    params: list[Any] | dict[str, Any] | None = None


class BatchBody(msgspec.Struct, forbid_unknown_fields=True):
    statements: list[SqlBody]


class CallBody(msgspec.Struct, forbid_unknown_fields=True):
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    workflow_id: str | None = None


def _reject_ext(code: int, data: memoryview) -> Any:
    raise BadRequest(f"msgpack extension type {code} is not supported")


_json_sql = msgspec.json.Decoder(SqlBody)
_json_batch = msgspec.json.Decoder(BatchBody)
_json_any = msgspec.json.Decoder()
_mp_sql = msgspec.msgpack.Decoder(SqlBody, ext_hook=_reject_ext)
_mp_batch = msgspec.msgpack.Decoder(BatchBody, ext_hook=_reject_ext)
_mp_any = msgspec.msgpack.Decoder(ext_hook=_reject_ext)
_json_call = msgspec.json.Decoder(CallBody)
_mp_call = msgspec.msgpack.Decoder(CallBody, ext_hook=_reject_ext)
json_encode = msgspec.json.Encoder().encode
msgpack_encode = msgspec.msgpack.Encoder().encode


def is_msgpack(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() in MSGPACK_TYPES  # type: ignore[union-attr]


def _decode(data: bytes, decoder: Any, what: str) -> Any:
    if not data:
        raise BadRequest(f"the request body is empty; expected {what}")
    try:
        return decoder.decode(data)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(f"invalid {what}: {exc}") from None


def decode_sql(data: bytes, msgpack: bool) -> Statement:
    body: SqlBody = _decode(data, _mp_sql if msgpack else _json_sql, '{"sql": ..., "params": ...}')
    return Statement(body.sql, params_from(body.params, msgpack, "$.params"))


def decode_batch(data: bytes, msgpack: bool) -> list[Statement]:
    body: BatchBody = _decode(data, _mp_batch if msgpack else _json_batch, '{"statements": [...]}')
    return [
        Statement(s.sql, params_from(s.params, msgpack, f"$.statements[{i}].params"))
        for i, s in enumerate(body.statements)
    ]


def decode_call(data: bytes, msgpack: bool) -> CallBody:
    """A method call: ``{"args": [...], "kwargs": {...}}`` (an empty body: no arguments)."""
    if not data.strip():
        return CallBody()
    body: CallBody = _decode(
        data, _mp_call if msgpack else _json_call, '{"args": [...], "kwargs": {...}}'
    )
    if not msgpack:
        body = CallBody(blobs_in(body.args), blobs_in(body.kwargs), body.workflow_id)
    return body


def decode_value(data: bytes, msgpack: bool) -> Any:
    """A KV value: any JSON value (``$blob`` objects become bytes) or any msgpack value."""
    value = _decode(data, _mp_any if msgpack else _json_any, "a JSON value")
    return value if msgpack else blobs_in(value)


def params_from(raw: Any, msgpack: bool, where: str) -> Params:
    if raw is None:
        return None
    if isinstance(raw, list):
        return [_param(v, msgpack, f"{where}[{i}]") for i, v in enumerate(raw)]
    return {k: _param(v, msgpack, f"{where}.{k}") for k, v in raw.items()}


def _param(v: Any, msgpack: bool, where: str) -> Any:
    t = type(v)
    if v is None or t is int or t is str or t is float or t is bool:
        return v
    if t is bytes and msgpack:
        return v
    if t is dict and len(v) == 1 and BLOB_KEY in v:
        return _blob(v[BLOB_KEY], where)
    raise BadRequest(
        f"unsupported parameter value at {where}: use null, a boolean, a number, a string"
        f' or {{"{BLOB_KEY}": "<base64>"}}'
    )


def _blob(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{BLOB_KEY} at {where} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{BLOB_KEY} at {where} is not valid base64") from None


def blobs_in(value: Any) -> Any:
    """Turn ``{"$blob": ...}`` objects inside a JSON value into bytes."""
    return _rebuild(value, _blob_in)


def blobs_out(value: Any) -> Any:
    """Turn bytes inside a value into ``{"$blob": ...}`` objects, for JSON."""
    return _rebuild(value, _blob_out)


_KEEP = object()


def _blob_in(v: Any) -> Any:
    if type(v) is dict and len(v) == 1 and BLOB_KEY in v:
        return _blob(v[BLOB_KEY], "$")
    return _KEEP


def _blob_out(v: Any) -> Any:
    if isinstance(v, bytes):
        return {BLOB_KEY: base64.b64encode(v).decode()}
    return _KEEP


def _rebuild(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with ``convert`` applied to every node (top-down; lists and dicts are copied,
    tuples become lists). Iterative: values nest as deep as their decoder allowed, deeper
    than Python's recursion limit leaves room for."""
    top = [value]
    stack: list[tuple[Any, Any]] = [(top, 0)]
    while stack:
        parent, slot = stack.pop()
        v = parent[slot]
        new = convert(v)
        if new is not _KEEP:
            parent[slot] = new
        elif isinstance(v, dict):
            copy = dict(v)
            parent[slot] = copy
            stack.extend((copy, k) for k in copy)
        elif isinstance(v, (list, tuple)):
            copy_list = list(v)
            parent[slot] = copy_list
            stack.extend((copy_list, i) for i in range(len(copy_list)))
    return top[0]


def sql_result_json(r: SqlResult) -> dict[str, Any]:
    rows: Any = r.rows
    if any(type(v) is bytes for row in rows for v in row):
        rows = blobs_out(rows)
    return {
        "columns": r.columns,
        "rows": rows,
        "changes": r.changes,
        "last_insert_rowid": r.last_insert_rowid,
    }


def result_body(result: Result | dict[str, Any], msgpack: bool) -> Any:
    """The HTTP body of a result, in the shape CONTRACT.md gives."""
    if isinstance(result, SqlResult):
        return sql_result_json(result) if not msgpack else _sql_result_dict(result)
    if isinstance(result, BatchResult):
        conv = _sql_result_dict if msgpack else sql_result_json
        return {"results": [conv(r) for r in result.results]}
    if isinstance(result, msgspec.Struct):
        out = msgspec.structs.asdict(result)
        return out if msgpack else blobs_out(out)
    return result if msgpack else blobs_out(result)


def _sql_result_dict(r: SqlResult) -> dict[str, Any]:
    return {
        "columns": r.columns,
        "rows": r.rows,
        "changes": r.changes,
        "last_insert_rowid": r.last_insert_rowid,
    }


def error_body(error: Error) -> dict[str, Any]:
    return {"error": error.to_dict()}
