"""Turning a scenario into requests for each kind of target.

Every builder returns, per call, one request for a key drawn from the distribution:

* shardlite RPC: the frame's tail (``key`` and ``op`` encoded; the driver adds the length
  and the request id in front),
* shardlite HTTP: the raw HTTP/1.1 request bytes,
* PostgreSQL: a list of (statement, parameters) run as one transaction.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import msgspec

from shardlite.actor import Batch, CallMethod, KvGet, KvPut, Sql, Statement
from shardlite.router import wire

from ._spec import (
    INSERTED_ID_BASE,
    PG_INSERT,
    PG_KV_GET,
    PG_KV_PUT,
    PG_READ,
    SQLITE_INSERT,
    SQLITE_READ,
    KeyChooser,
    LoadSpec,
)

KV_NAMES = 10
_encode = msgspec.msgpack.Encoder().encode


class Scenario:
    """The operations of one run, drawn at random (seeded per generator process)."""

    def __init__(self, spec: LoadSpec, worker: int, workers: int) -> None:
        self.spec = spec
        self.keys = KeyChooser(spec, worker, workers)
        self.rng = random.Random(spec.seed * 7919 + worker)
        self._ids = itertools.count(INSERTED_ID_BASE + (worker << 40))
        self.value = "x" * spec.value_bytes
        self.auth_header = f"Authorization: Bearer {spec.token}\r\n" if spec.token else ""

    def kind(self) -> str:
        """Which operation the next request is: insert, read, kv_get, kv_put, batch, call, ping."""
        scenario = self.spec.scenario
        if scenario == "mixed":
            return "read" if self.rng.random() < self.spec.read_ratio else "insert"
        if scenario == "kv":
            return "kv_get" if self.rng.random() < self.spec.read_ratio else "kv_put"
        return scenario

    def shardlite_op(self, kind: str) -> Any:
        spec, rng = self.spec, self.rng
        if kind == "insert":
            return Sql(SQLITE_INSERT, [self.value])
        if kind == "read":
            return Sql(SQLITE_READ, [rng.randint(1, spec.rows)])
        if kind == "kv_get":
            return KvGet(f"k{rng.randrange(KV_NAMES)}")
        if kind == "kv_put":
            return KvPut(f"k{rng.randrange(KV_NAMES)}", self.value)
        if kind == "batch":
            return Batch([Statement(SQLITE_INSERT, [self.value])] * spec.batch_size)
        if kind == "call":
            return CallMethod(spec.method, list(spec.method_args))
        return wire.Ping()

    def rpc_tail(self) -> bytes:
        """``key`` and ``op`` of the next RPC request, encoded."""
        key = self.keys.name(self.keys.next())
        return _encode(key) + _encode(self.shardlite_op(self.kind()))

    def http_request(self, host: str) -> bytes:
        """The next HTTP request, bytes on the wire (JSON bodies, keep-alive)."""
        kind = self.kind()
        if kind == "ping":
            return f"GET /livez HTTP/1.1\r\nHost: {host}\r\n{self.auth_header}\r\n".encode()
        key = quote(self.keys.name(self.keys.next()), safe="")
        op = self.shardlite_op(kind)
        base = f"/v1/actors/{key}"
        if isinstance(op, Sql):
            method, path, body = "POST", base + "/sql", {"sql": op.sql, "params": op.params}
        elif isinstance(op, Batch):
            stmts = [{"sql": s.sql, "params": s.params} for s in op.statements]
            method, path, body = "POST", base + "/batch", {"statements": stmts}
        elif isinstance(op, KvGet):
            method, path, body = "GET", f"{base}/kv/{op.name}", None
        elif isinstance(op, KvPut):
            method, path, body = "PUT", f"{base}/kv/{op.name}", op.value
        else:
            call: CallMethod = op
            method, path, body = "POST", f"{base}/call/{call.method}", {"args": call.args}
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{self.auth_header}"
        if data:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        return head.encode() + b"\r\n" + data

    def pg_transaction(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The next PostgreSQL request: statements run as one transaction."""
        kind = self.kind()
        tenant = self.keys.name(self.keys.next())
        rng = self.rng
        if kind == "insert":
            return [(PG_INSERT, (tenant, next(self._ids), self.value))]
        if kind == "read":
            return [(PG_READ, (tenant, rng.randint(1, self.spec.rows)))]
        if kind == "kv_get":
            return [(PG_KV_GET, (tenant, f"k{rng.randrange(KV_NAMES)}"))]
        if kind == "kv_put":
            return [(PG_KV_PUT, (tenant, f"k{rng.randrange(KV_NAMES)}", self.value))]
        if kind == "batch":
            return [
                (PG_INSERT, (tenant, next(self._ids), self.value))
                for _ in range(self.spec.batch_size)
            ]
        raise ValueError(f"scenario {kind!r} has no PostgreSQL form")


Builder = Callable[[], Any]

__all__ = ["KV_NAMES", "Scenario"]
