"""What the sync and async clients share: building operations, reading results.

The clients (``_client.py``, ``_aclient.py``) are thin: each call builds a wire
operation here, sends it through a transport (RPC frames or HTTP) and turns the reply
into the documented Python value here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from shardlite.actor import (
    Batch,
    BatchResult,
    CallMethod,
    CallResult,
    Deleted,
    Error,
    ExportResult,
    KvDelete,
    KvGet,
    KvItems,
    KvList,
    KvOk,
    KvPut,
    KvValue,
    Params,
    Sql,
    SqlResult,
    Statement,
    Unavailable,
    WorkflowGet,
    WorkflowInfo,
    WorkflowItems,
    WorkflowList,
    error_from_dict,
)

from . import _wire as wire
from ._placement import NodeRecord, Placement, PlacementMap, ShardRecord

MAX_ROUTE_ATTEMPTS = 6
"""Tries of one request across placement refreshes (``wrong_shard``, ``moved``, an owner
that cannot be reached) before the error is the caller's."""
ROUTE_BACKOFF_FIRST_S = 0.05
ROUTE_BACKOFF_MAX_S = 1.0


def route_backoff(attempt: int) -> float:
    """Pause before re-routing try ``attempt`` (1, 2, ...): the directory needs a moment."""
    return float(min(ROUTE_BACKOFF_FIRST_S * (1 << (attempt - 1)), ROUTE_BACKOFF_MAX_S))


DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RPC_PORT = 7070
DEFAULT_HTTP_PORT = 8080


class ConnectionLost(Unavailable):
    """The connection broke while a request was in flight: it may or may not have run."""


class Target(msgspec.Struct, frozen=True):
    scheme: str  # "rpc" | "http" | "https"
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def token_or_env(token: str | None) -> str | None:
    """The token to send: the one given, else ``$SHARDLITE_TOKEN`` (None: none)."""
    if token is not None:
        return token or None
    return os.environ.get("SHARDLITE_TOKEN") or None


def parse_url(url: str) -> Target:
    """``rpc://host:port`` or ``http(s)://host:port``."""
    parts = urlsplit(url)
    if parts.scheme not in ("rpc", "http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected rpc://HOST:PORT or http://HOST:PORT")
    default = DEFAULT_RPC_PORT if parts.scheme == "rpc" else DEFAULT_HTTP_PORT
    return Target(parts.scheme, parts.hostname, parts.port or default)


class RouteTable:
    """A routing client's cached placement: which process to send each key to.

    ``lookup`` gives the owner's direct address and the shard's epoch (sent with the
    request, so that a stale route is refused with ``wrong_shard`` rather than served by
    the wrong process). Until a placement is known, or when the server does not publish
    one (routing off), every request goes to the seed address without an epoch.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.placement: Placement | None = None
        self.stale = enabled

    def update(self, m: PlacementMap) -> None:
        self.placement = Placement.from_map(m)
        self.stale = False

    def disable(self) -> None:
        self.enabled = self.stale = False
        self.placement = None

    def learn(self, error: Error) -> bool:
        """Take a ``wrong_shard`` that names a newer owner of a shard (a move) into the
        table; False if it does not (then the whole placement is read again)."""
        placement = self.placement
        details = error.details
        shard = placement.shards.get(details.get("shard", "")) if placement else None
        epoch, owner, location = details.get("epoch"), details.get("owner"), details.get("location")
        if placement is None or shard is None or not isinstance(epoch, int) or not location:
            return False
        if epoch <= shard.epoch or not owner or owner == shard.owner:
            return False  # not newer, or not a move (a split changes slots: read them all)
        placement.shards[shard.id] = ShardRecord(shard.id, shard.ranges, owner, epoch)
        node = placement.nodes.get(owner)
        if node is None or node.rpc != location:
            host = owner.rpartition("/")[0]
            placement.nodes[owner] = NodeRecord(owner, host, location, "", 0, 0.0)
        return True

    def lookup(self, key: str, op: wire.WireOp) -> tuple[str | None, int | None]:
        placement = self.placement
        if placement is None or isinstance(op, (wire.GetPlacement, wire.GetStatus, wire.Ping)):
            return None, None
        try:
            shard = placement.shard_for(key)
        except LookupError:
            return None, None
        node = placement.nodes.get(shard.owner)
        if node is None or not node.rpc:
            return None, None  # no live owner known: let the seed forward (or say why)
        return node.rpc, shard.epoch


def split_address(address: str) -> Target:
    host, _, port = address.rpartition(":")
    return Target("rpc", host.strip("[]"), int(port))


def statements_of(items: Iterable[Any]) -> list[Statement]:
    """Accept ``"SQL"``, ``("SQL", params)`` or :class:`Statement` items."""
    out = []
    for item in items:
        if isinstance(item, Statement):
            out.append(item)
        elif isinstance(item, str):
            out.append(Statement(item))
        else:
            sql, params = item
            out.append(Statement(sql, _params(params)))
    return out


def _params(params: Any) -> Params:
    if params is None or isinstance(params, (list, dict)):
        return params
    return list(params)


def sql_op(sql: str, params: Any = None) -> Sql:
    return Sql(sql, _params(params))


def decode_rpc_result(op: wire.WireOp, status: int, body: msgspec.Raw) -> Any:
    if status != wire.STATUS_OK:
        raise error_from_dict(msgspec.msgpack.decode(body))
    return msgspec.msgpack.decode(body, type=wire.RESULT_TYPES[type(op)])


# ------------------------------------------------------------------ HTTP mapping


def _segment(text: str) -> str:
    """``text`` as one path segment. A ``.`` or ``..`` segment is escaped too: HTTP clients
    resolve it (``/v1/actors/k/kv/..`` would become ``/v1/actors/k``: the actor itself)."""
    segment = quote(text, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def http_request(op: wire.WireOp, key: str) -> tuple[str, str, Any, dict[str, Any] | None]:
    """(method, path, msgpack body or None, query) for an operation over HTTP."""
    base = f"/v1/actors/{_segment(key)}"
    if isinstance(op, Sql):
        return "POST", base + "/sql", {"sql": op.sql, "params": op.params}, None
    if isinstance(op, Batch):
        stmts = [{"sql": s.sql, "params": s.params} for s in op.statements]
        return "POST", base + "/batch", {"statements": stmts}, None
    if isinstance(op, KvGet):
        return "GET", f"{base}/kv/{_segment(op.name)}", None, None
    if isinstance(op, KvPut):
        return "PUT", f"{base}/kv/{_segment(op.name)}", op.value, None
    if isinstance(op, KvDelete):
        return "DELETE", f"{base}/kv/{_segment(op.name)}", None, None
    if isinstance(op, KvList):
        query: dict[str, Any] = {"prefix": op.prefix, "limit": op.limit}
        if op.after is not None:
            query["after"] = op.after
        return "GET", base + "/kv", None, query
    if isinstance(op, CallMethod):
        body: dict[str, Any] = {"args": op.args, "kwargs": op.kwargs}
        if op.workflow_id is not None:
            body["workflow_id"] = op.workflow_id
        return "POST", f"{base}/call/{_segment(op.method)}", body, None
    if isinstance(op, WorkflowList):
        wf_query: dict[str, Any] = {"limit": op.limit}
        if op.status is not None:
            wf_query["status"] = op.status
        return "GET", base + "/workflows", None, wf_query
    if isinstance(op, WorkflowGet):
        return "GET", f"{base}/workflows/{_segment(op.id)}", None, None
    if isinstance(op, wire.Delete):
        return "DELETE", base, None, None
    if isinstance(op, wire.Export):
        return "GET", base + "/export", None, None
    raise TypeError(f"{type(op).__name__} is not supported over HTTP")


def decode_http_result(op: wire.WireOp, status: int, content_type: str, body: bytes) -> Any:
    if status >= 400:
        try:
            data = (
                msgspec.msgpack.decode(body)
                if "msgpack" in content_type
                else msgspec.json.decode(body)
            )
            raise error_from_dict(data["error"])
        except (msgspec.DecodeError, KeyError, TypeError):
            raise Error(f"HTTP {status}: {body[:200]!r}") from None
    if isinstance(op, wire.Export):
        return ExportResult(body)
    data = msgspec.msgpack.decode(body)
    if isinstance(op, Sql):
        return _sql_result(data)
    if isinstance(op, Batch):
        return BatchResult([_sql_result(r) for r in data["results"]])
    if isinstance(op, KvGet):
        return KvValue(data)
    if isinstance(op, KvPut):
        return KvOk()
    if isinstance(op, (KvDelete, wire.Delete)):
        return Deleted(data["deleted"])
    if isinstance(op, KvList):
        return KvItems([(name, value) for name, value in data["items"]])
    if isinstance(op, CallMethod):
        return CallResult(data)
    if isinstance(op, WorkflowList):
        return WorkflowItems([msgspec.convert(w, WorkflowInfo) for w in data["workflows"]])
    if isinstance(op, WorkflowGet):
        return msgspec.convert(data, WorkflowInfo)
    raise TypeError(f"unexpected operation {type(op).__name__}")


def _sql_result(data: dict[str, Any]) -> SqlResult:
    return SqlResult(
        data["columns"],
        [tuple(row) for row in data["rows"]],
        data["changes"],
        data["last_insert_rowid"],
    )
