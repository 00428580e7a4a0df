"""The async Python client, for trio and asyncio (through anyio).

``async with shardlite.connect_async("rpc://127.0.0.1:7070") as client: ...``
Over RPC one connection carries any number of concurrent requests (pipelined, matched
by id), so many tasks can share one client.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import anyio
import anyio.abc
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
    error_from_dict,
)

from . import _protocol as proto
from . import _wire as wire


class _Pending:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: wire.Response | None = None


class _Connection:
    """One TCP connection of an :class:`AsyncRpcTransport` and the requests it carries."""

    __slots__ = ("broken", "pending", "stream")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.pending: dict[int, _Pending] = {}
        self.broken: BaseException | None = None

    def fail_all(self, exc: BaseException) -> None:
        self.broken = exc
        pending, self.pending = self.pending, {}
        for p in pending.values():
            p.event.set()


class AsyncRpcTransport:
    """Pipelined requests over one connection; a new one is opened once it breaks."""

    def __init__(self, target: proto.Target, timeout: float, token: str | None = None) -> None:
        self._target = target
        self._timeout = timeout
        self._token = token
        self._conn: _Connection | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._ids = itertools.count(1)
        self._send_lock = anyio.Lock()
        self._connect_lock = anyio.Lock()
        self._closed = False

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        await self._connect()

    async def _connect(self) -> _Connection:
        assert self._tg is not None
        with anyio.fail_after(self._timeout):
            stream = await anyio.connect_tcp(self._target.host, self._target.port)
        conn = _Connection(stream)
        self._tg.start_soon(self._read_loop, conn)
        if self._token is not None:
            try:
                await self._authenticate(conn, self._token)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        self._conn = conn  # only now: the token goes first on the connection
        return conn

    async def _authenticate(self, conn: _Connection, token: str) -> None:
        req_id = next(self._ids)
        pending = _Pending()
        conn.pending[req_id] = pending
        op = wire.Authenticate(token)
        async with self._send_lock:
            await conn.stream.send(wire.request_frame(req_id, "", op))
        with anyio.fail_after(self._timeout):
            await pending.event.wait()
        response = pending.response
        if response is None:
            raise proto.ConnectionLost(
                f"connection to {self._target.base_url} lost ({conn.broken})"
            )
        proto.decode_rpc_result(op, response.status, response.body)

    async def _connection(self) -> _Connection:
        """The current connection, or a new one if it broke (requests in flight on a broken
        connection are not resent: they may or may not have been applied)."""
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        if self._closed:
            raise proto.ConnectionLost(f"the client of {self._target.base_url} is closed")
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.broken is None:
                return conn
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.stream.aclose()
            try:
                return await self._connect()
            except (OSError, TimeoutError) as exc:
                raise proto.ConnectionLost(
                    f"cannot connect to {self._target.base_url} ({exc})"
                ) from None

    async def _read_loop(self, conn: _Connection) -> None:
        reader = wire.FrameReader(1 << 31)
        try:
            while True:
                chunk = await conn.stream.receive(1 << 20)
                for payload in reader.feed(chunk):
                    response = wire.response_decoder.decode(payload)
                    if response.id == wire.CONNECTION_ERROR_ID:
                        error = error_from_dict(msgspec.msgpack.decode(response.body))
                        if len(conn.pending) == 1:
                            # the only request without a reply is the one the server refused
                            (refused,) = conn.pending.values()
                            refused.response = response
                        conn.fail_all(error)
                        return
                    pending = conn.pending.pop(response.id, None)
                    if pending is not None:
                        pending.response = response
                        pending.event.set()
        except (
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ) as exc:
            conn.fail_all(exc)

    async def request(
        self,
        key: str,
        op: wire.WireOp,
        idempotency_key: str | None = None,
        epoch: int | None = None,
    ) -> Any:
        conn = await self._connection()
        req_id = next(self._ids)
        pending = _Pending()
        conn.pending[req_id] = pending
        frame = wire.request_frame(req_id, key, op, idempotency_key, epoch)
        try:
            sending = sent = False
            try:
                async with self._send_lock:
                    sending = True
                    await conn.stream.send(frame)
                    sent = True
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                conn.fail_all(exc)  # a frame may be half sent: the connection is unusable
                raise proto.ConnectionLost(
                    f"connection to {self._target.base_url} lost ({exc}); "
                    "the request may or may not have been applied"
                ) from None
            finally:
                if sending and not sent:  # cancelled mid-frame: the stream is out of step
                    conn.fail_all(proto.ConnectionLost("a request was cancelled while sent"))
            with anyio.fail_after(self._timeout):
                await pending.event.wait()
        finally:
            conn.pending.pop(req_id, None)
        response = pending.response
        if response is None:
            raise proto.ConnectionLost(
                f"connection to {self._target.base_url} lost ({conn.broken}); "
                "the request may or may not have been applied"
            )
        return proto.decode_rpc_result(op, response.status, response.body)

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            await self._conn.stream.aclose()


class AsyncRoutingTransport:
    """RPC straight to the process that owns each key (see ``proto.RouteTable``)."""

    def __init__(
        self, target: proto.Target, timeout: float, routing: bool = True, token: str | None = None
    ) -> None:
        self._token = token
        self._timeout = timeout
        self._seed = AsyncRpcTransport(target, timeout, token)
        self._peers: dict[str, AsyncRpcTransport] = {}
        self._routes = proto.RouteTable(routing)
        self._refresh_lock = anyio.Lock()
        self._peer_lock = anyio.Lock()
        self._seed_address = f"{target.host}:{target.port}"
        self._tg: anyio.abc.TaskGroup | None = None

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        await self._seed.start(tg)

    async def _refresh(self) -> None:
        async with self._refresh_lock:
            if not self._routes.stale:
                return  # another task refreshed it meanwhile
            try:
                self._routes.update(await self._seed.request("", wire.GetPlacement()))
            except BadRequest:
                self._routes.disable()

    async def _transport(self, address: str | None) -> AsyncRpcTransport:
        if address is None or address == self._seed_address:
            return self._seed
        peer = self._peers.get(address)
        if peer is None:
            async with self._peer_lock:  # one connection per owner, however many tasks ask
                peer = self._peers.get(address)
                if peer is None:
                    peer = AsyncRpcTransport(
                        proto.split_address(address), self._timeout, self._token
                    )
                    assert self._tg is not None
                    await peer.start(self._tg)  # connects: raises if the owner is unreachable
                    self._peers[address] = peer
        return peer

    async def request(self, key: str, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        for attempt in range(proto.MAX_ROUTE_ATTEMPTS):
            last = attempt == proto.MAX_ROUTE_ATTEMPTS - 1
            if self._routes.stale:
                if attempt:
                    await anyio.sleep(proto.route_backoff(attempt))
                await self._refresh()
            address, epoch = self._routes.lookup(key, op)
            try:
                transport = await self._transport(address)
            except (OSError, TimeoutError):
                if last:
                    raise
                self._routes.stale = True
                continue
            try:
                return await transport.request(key, op, idempotency_key, epoch)
            except (WrongShard, Moved) as exc:
                if last:
                    raise
                if not self._routes.learn(exc):  # else: the error says where, go at once
                    self._routes.stale = True
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._seed.aclose()
        for peer in self._peers.values():
            await peer.aclose()


class AsyncHttpTransport:
    def __init__(self, target: proto.Target, timeout: float, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._client = httpx.AsyncClient(base_url=target.base_url, timeout=timeout, headers=headers)

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        return None

    async def request(self, key: str, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        method, path, body, query = proto.http_request(op, key)
        headers = {"Accept": "application/msgpack"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        content = None
        if body is not None or method in ("POST", "PUT"):
            content = wire.encode(body)
            headers["Content-Type"] = "application/msgpack"
        response = await self._client.request(
            method, path, content=content, params=query, headers=headers
        )
        return proto.decode_http_result(
            op, response.status_code, response.headers.get("content-type", ""), response.content
        )

    async def aclose(self) -> None:
        await self._client.aclose()


class AsyncKv:
    def __init__(self, actor: AsyncActorHandle) -> None:
        self._actor = actor

    async def get(self, name: str, default: Any = None) -> Any:
        try:
            result: KvValue = await self._actor._request(KvGet(name))
        except NotFound:
            return default
        return result.value

    async def put(self, name: str, value: Any, *, idempotency_key: str | None = None) -> None:
        await self._actor._request(KvPut(name, value), idempotency_key)

    async def delete(self, name: str, *, idempotency_key: str | None = None) -> bool:
        deleted: bool = (await self._actor._request(KvDelete(name), idempotency_key)).deleted
        return deleted

    async def list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = (
            await self._actor._request(KvList(prefix, limit, after))
        ).items
        return items


class AsyncActorHandle:
    def __init__(self, client: AsyncClient, key: str) -> None:
        self.key = key
        self._client = client
        self.kv = AsyncKv(self)

    async def _request(self, op: wire.WireOp, idempotency_key: str | None = None) -> Any:
        return await self._client._transport.request(self.key, op, idempotency_key)

    async def sql(
        self, sql: str, params: Any = None, *, idempotency_key: str | None = None
    ) -> SqlResult:
        result: SqlResult = await self._request(proto.sql_op(sql, params), idempotency_key)
        return result

    async def batch(
        self,
        statements: Iterable[str | tuple[str, Any] | Statement],
        *,
        idempotency_key: str | None = None,
    ) -> list[SqlResult]:
        op = Batch(proto.statements_of(statements))
        results: list[SqlResult] = (await self._request(op, idempotency_key)).results
        return results

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method of the key's actor class; returns what it returned."""
        return (await self._request(CallMethod(method, list(args), kwargs))).value

    async def start_workflow(
        self, method: str, *args: Any, workflow_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Start a ``@shardlite.workflow`` method (idempotent by ``workflow_id``)."""
        result = await self._request(CallMethod(method, list(args), kwargs, workflow_id))
        value: dict[str, Any] = result.value
        return value

    async def workflows(self, status: str | None = None, limit: int = 100) -> list[WorkflowInfo]:
        items: list[WorkflowInfo] = (await self._request(WorkflowList(status, limit))).items
        return items

    async def workflow(self, workflow_id: str) -> WorkflowInfo:
        info: WorkflowInfo = await self._request(WorkflowGet(workflow_id))
        return info

    async def export(self) -> bytes:
        data: bytes = (await self._request(wire.Export())).data
        return data

    async def delete(self) -> bool:
        deleted: bool = (await self._request(wire.Delete())).deleted
        return deleted


class AsyncClient:
    """Use as ``async with connect_async(url) as client``."""

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
        self._transport: AsyncRoutingTransport | AsyncHttpTransport
        if self.target.scheme == "rpc":
            self._transport = AsyncRoutingTransport(self.target, timeout, routing, token)
        else:
            self._transport = AsyncHttpTransport(self.target, timeout, token)
        self._tg: anyio.abc.TaskGroup | None = None

    def actor(self, key: str) -> AsyncActorHandle:
        return AsyncActorHandle(self, key)

    async def __aenter__(self) -> AsyncClient:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._transport.start(self._tg)
        except BaseException as exc:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._transport.aclose()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(*exc)


def connect_async(
    url: str = "rpc://127.0.0.1:7070",
    *,
    timeout: float = proto.DEFAULT_TIMEOUT_S,
    routing: bool = True,
    token: str | None = None,
) -> AsyncClient:
    """An async client for trio or asyncio; enter it with ``async with``. Over RPC it
    sends each request straight to the key's owner (``routing=False``: all to ``url``).
    ``token``: an access token, default ``$SHARDLITE_TOKEN``."""
    return AsyncClient(url, timeout, routing=routing, token=token)
