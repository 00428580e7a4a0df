"""The synchronous Python client: ``shardlite.connect("rpc://127.0.0.1:7070")``."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpx
import msgspec

from shardlite.actor import (
    BadRequest,
    Batch,
    CallMethod,
    KvDelete,
    KvGet,
    KvList,
    KvPut,
    KvValue,
    Moved,
    NotFound,
    SqlResult,
    Statement,
    WorkflowGet,
    WorkflowInfo,
    WorkflowList,
    WrongShard,
)

from . import _protocol as proto
from . import _wire as wire


class RpcTransport:
    """One TCP connection, one request at a time (a lock makes it thread-safe)."""

    def __init__(self, target: proto.Target, timeout: float, token: str | None = None) -> None:
        self._target = target
        self._timeout = timeout
        self._token = token
        self._sock: socket.socket | None = None
        self._reader = wire.FrameReader(1 << 31)
        self._frames: list[memoryview] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._target.host, self._target.port), self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = wire.FrameReader(1 << 31)
        self._frames = []
        if self._token is not None:  # first on every connection: who we are
            self._sock = sock
            req_id = next(self._ids)
            op = wire.Authenticate(self._token)
            try:
                sock.sendall(wire.request_frame(req_id, "", op))
                response = self._receive(req_id)
                proto.decode_rpc_result(op, response.status, response.body)
            except BaseException:
                self._drop()
                raise
        return sock

    def request(
        self,
        key: str,
        op: wire.WireOp,
        idempotency_key: str | None = None,
        epoch: int | None = None,
    ) -> Any:
        with self._lock:
            req_id = next(self._ids)
            data = wire.request_frame(req_id, key, op, idempotency_key, epoch)
            if self._sock is None:
                self._sock = self._connect()
            try:
                self._sock.sendall(data)
            except OSError:
                # nothing was read by the server from a dead connection: reconnect, resend once
                self._drop()
                self._sock = self._connect()
                self._sock.sendall(data)
            try:
                response = self._receive(req_id)
            except (OSError, msgspec.DecodeError) as exc:
                self._drop()
                raise proto.ConnectionLost(
                    f"connection to {self._target.base_url} lost while waiting for a reply ({exc}); "
                    "the request may or may not have been applied"
                ) from None
            if response.id == wire.CONNECTION_ERROR_ID:
                # the server refused this request's frame and may close the connection
                self._drop()
        return proto.decode_rpc_result(op, response.status, response.body)

    def _receive(self, req_id: int) -> wire.Response:
        assert self._sock is not None
        while True:
            while self._frames:
                response = wire.response_decoder.decode(self._frames.pop(0))
                if response.id == req_id:
                    return response
                if response.id == wire.CONNECTION_ERROR_ID:
                    return response
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self._frames.extend(self._reader.feed(chunk))

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class RoutingTransport:
    """RPC straight to the process that owns each key (see ``proto.RouteTable``)."""

    def __init__(
        self, target: proto.Target, timeout: float, routing: bool = True, token: str | None = None
    ) -> None:
        self._timeout = timeout
        self._token = token
        self._seed = RpcTransport(target, timeout, token)
        self._peers: dict[str, RpcTransport] = {}
        self._routes = proto.RouteTable(routing)
        self._lock = threading.Lock()
        self._seed_address = f"{target.host}:{target.port}"

    def _refresh(self) -> None:
        try:
            self._routes.update(self._seed.request("", wire.GetPlacement()))
        except BadRequest:
            self._routes.disable()  # a server without placement: talk to it alone

    def _transport(self, address: str | None) -> RpcTransport:
        if address is None or address == self._seed_address:
            return self._seed
        with self._lock:
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = RpcTransport(
                    proto.split_address(address), self._timeout, self._token
                )
            return peer

    def request(self, key: str, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        for attempt in range(proto.MAX_ROUTE_ATTEMPTS):
            last = attempt == proto.MAX_ROUTE_ATTEMPTS - 1
            if self._routes.stale:
                if attempt:
                    time.sleep(proto.route_backoff(attempt))
                self._refresh()
            address, epoch = self._routes.lookup(key, op)
            transport = self._transport(address)
            try:
                return transport.request(key, op, idempotency_key, epoch)
            except (WrongShard, Moved) as exc:
                if last:
                    raise
                if not self._routes.learn(exc):  # else: the error says where, go at once
                    self._routes.stale = True
            except OSError:  # the owner cannot be reached (nothing was sent): re-route
                if last or transport is self._seed:
                    raise
                self._routes.stale = True
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._seed.close()
        for peer in self._peers.values():
            peer.close()


class HttpTransport:
    """HTTP/1.1 with msgpack bodies, through httpx."""

    def __init__(self, target: proto.Target, timeout: float, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = httpx.Client(base_url=target.base_url, timeout=timeout, headers=headers)

    def request(self, key: str, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        method, path, body, query = proto.http_request(op, key)
        headers = {"Accept": "application/msgpack"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        content = None
        if body is not None or method in ("POST", "PUT"):
            content = wire.encode(body)
            headers["Content-Type"] = "application/msgpack"
        response = self._client.request(
            method, path, content=content, params=query, headers=headers
        )
        return proto.decode_http_result(
            op, response.status_code, response.headers.get("content-type", ""), response.content
        )

    def close(self) -> None:
        self._client.close()


class Kv:
    """The actor's key-value API (stored in a hidden table of its own file)."""

    def __init__(self, actor: ActorHandle) -> None:
        self._actor = actor

    def get(self, name: str, default: Any = None) -> Any:
        """The value stored under ``name``, or ``default`` if there is none."""
        try:
            result: KvValue = self._actor._request(KvGet(name))
        except NotFound:
            return default
        return result.value

    def put(self, name: str, value: Any, *, idempotency_key: str | None = None) -> None:
        self._actor._request(KvPut(name, value), idempotency_key)

    def delete(self, name: str, *, idempotency_key: str | None = None) -> bool:
        deleted: bool = self._actor._request(KvDelete(name), idempotency_key).deleted
        return deleted

    def list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Any]]:
        """Entries whose name starts with ``prefix``, in name order, after ``after``."""
        items: list[tuple[str, Any]] = self._actor._request(KvList(prefix, limit, after)).items
        return items


class ActorHandle:
    """A handle on one actor key; cheap to create, holds no connection of its own."""

    def __init__(self, client: Client, key: str) -> None:
        self.key = key
        self._client = client
        self.kv = Kv(self)

    def _request(self, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        return self._client._transport.request(self.key, op, idempotency_key)

    def sql(self, sql: str, params: Any = None, *, idempotency_key: str | None = None) -> SqlResult:
        """Run one statement; params are a sequence (``?``) or a mapping (``:name``).

        With an ``idempotency_key``, sending the same call again (after a lost reply)
        returns the first result and applies nothing twice.
        """
        result: SqlResult = self._request(proto.sql_op(sql, params), idempotency_key)
        return result

    def batch(
        self,
        statements: Iterable[str | tuple[str, Any] | Statement],
        *,
        idempotency_key: str | None = None,
    ) -> list[SqlResult]:
        """Run several statements atomically; returns one result per statement."""
        op = Batch(proto.statements_of(statements))
        results: list[SqlResult] = self._request(op, idempotency_key).results
        return results

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method of the key's actor class; returns what it returned."""
        return self._request(CallMethod(method, list(args), kwargs)).value

    def start_workflow(
        self, method: str, *args: Any, workflow_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Start a ``@shardlite.workflow`` method; starting the same ``workflow_id`` again
        returns the first run's ``{"workflow_id", "status", ...}`` instead of a new run."""
        value: dict[str, Any] = self._request(
            CallMethod(method, list(args), kwargs, workflow_id)
        ).value
        return value

    def workflows(self, status: str | None = None, limit: int = 100) -> list[WorkflowInfo]:
        """The actor's workflow runs, newest first (without their steps)."""
        items: list[WorkflowInfo] = self._request(WorkflowList(status, limit)).items
        return items

    def workflow(self, workflow_id: str) -> WorkflowInfo:
        """One workflow run with its journal of steps."""
        info: WorkflowInfo = self._request(WorkflowGet(workflow_id))
        return info

    def export(self, path: str | None = None) -> bytes:
        """A consistent copy of the actor's SQLite file (also written to ``path`` if given)."""
        data: bytes = self._request(wire.Export()).data
        if path is not None:
            with open(path, "wb") as f:
                f.write(data)
        return data

    def delete(self) -> bool:
        """Remove the actor and its file; True if it existed."""
        deleted: bool = self._request(wire.Delete()).deleted
        return deleted


class Client:
    """A connection to a shardlite server. Use as a context manager, or call close().

    Over RPC the client learns the cluster's placement and sends each request straight
    to the process that owns the key (``routing=False``: everything to ``url``, which
    forwards).
    """

    def __init__(
        self,
        url: str,
        timeout: float = proto.DEFAULT_TIMEOUT_S,
        *,
        routing: bool = True,
        token: str | None = None,
    ) -> None:
        self.target = proto.parse_url(url)
        token = proto.token_or_env(token)
        self._transport: RoutingTransport | HttpTransport
        if self.target.scheme == "rpc":
            self._transport = RoutingTransport(self.target, timeout, routing, token)
        else:
            self._transport = HttpTransport(self.target, timeout, token)

    def actor(self, key: str) -> ActorHandle:
        return ActorHandle(self, key)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str = "rpc://127.0.0.1:7070",
    *,
    timeout: float = proto.DEFAULT_TIMEOUT_S,
    routing: bool = True,
    token: str | None = None,
) -> Client:
    """Connect to a shardlite server over RPC (``rpc://``) or HTTP (``http://``).

    ``token``: an access token (``shardlite ops token create``), default
    ``$SHARDLITE_TOKEN``; needed when the server requires tokens."""
    return Client(url, timeout, routing=routing, token=token)
