"""Forwarding: requests for keys another shard process owns go there, one hop, over RPC.

One pipelined connection per peer, opened on first use and again after it breaks. A
forwarded request is re-framed with a fresh id and the epoch this process saw; the
reply's body is handed back untouched (``Forwarded``: no decode and re-encode) to
whatever sink asked (an RPC connection, or an HTTP handler waiting for it). Requests in
flight on a connection that breaks fail with ``unavailable``: they may or may not have
run, like any request whose reply was lost (retry with an idempotency key).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import trio

from shardlite.actor import BadRequest, Error, Unavailable, error_from_dict

from . import _wire as wire

log = logging.getLogger("shardlite.forward")

CONNECT_TIMEOUT_S = 5.0
PEER_HELLO_ID = (1 << 64) - 1
"""The id of the hello frame (forwarded requests count up from 1: never this)."""
RECEIVE_BYTES = 256 * 1024


class Sink(Protocol):
    def deliver(self, tag: Any, result: Any) -> None: ...


class Forwarded:
    """A reply from the owner, still encoded: ``status`` and msgpack ``body``."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def decode(self, op: Any) -> Any:
        """The typed result, or raise the owner's error."""
        if self.status != wire.STATUS_OK:
            raise error_from_dict(msgspec.msgpack.decode(self.body))
        return msgspec.msgpack.decode(self.body, type=wire.RESULT_TYPES[type(op)])


class _Peer:
    def __init__(
        self, address: str, nursery: trio.Nursery, credential: Callable[[], str | None]
    ) -> None:
        self.address = address
        self.credential = credential
        self.outbox: list[bytes] = []
        self.pending: dict[int, tuple[Sink, Any]] = {}
        self.wake = trio.Event()
        self.closed = False
        nursery.start_soon(self._run)

    def send(self, frame: bytes, req_id: int, sink: Sink, tag: Any) -> None:
        self.pending[req_id] = (sink, tag)
        self.outbox.append(frame)
        self.wake.set()

    async def _run(self) -> None:
        host, _, port = self.address.rpartition(":")
        while not self.closed:
            await self.wake.wait()
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            except (OSError, trio.TooSlowError) as exc:
                self._fail(f"cannot reach {self.address} ({exc})")
                self.wake = trio.Event()
                continue
            try:
                async with stream, trio.open_nursery() as nursery:
                    greeted = trio.Event()
                    nursery.start_soon(self._read, stream, nursery.cancel_scope, greeted)
                    # first, alone: this connection carries forwarded requests, which may
                    # be a few bytes over the size limit their clients were held to
                    await stream.send_all(
                        wire.request_frame(PEER_HELLO_ID, "", wire.PeerHello(self.credential()))
                    )
                    with trio.fail_after(CONNECT_TIMEOUT_S):
                        await greeted.wait()
                    await self._write(stream)
            except* (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                OSError,
            ) as group:
                self._fail(f"the connection to {self.address} broke ({group.exceptions[0]})")

    async def _write(self, stream: trio.SocketStream) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            if self.outbox:
                data = b"".join(self.outbox)
                self.outbox.clear()
                await stream.send_all(data)

    async def _read(
        self, stream: trio.SocketStream, scope: trio.CancelScope, greeted: trio.Event
    ) -> None:
        reader = wire.FrameReader(1 << 31)
        decode = wire.response_decoder.decode
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                for payload in reader.feed(data):
                    response = decode(payload)
                    if response.id == PEER_HELLO_ID:
                        greeted.set()
                        continue
                    entry = self.pending.pop(response.id, None)
                    if entry is not None:
                        sink, tag = entry
                        sink.deliver(tag, Forwarded(response.status, bytes(response.body)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, msgspec.DecodeError) as exc:
            log.warning("forwarding to %s: %s", self.address, exc)
        self._fail(f"the connection to {self.address} closed")
        scope.cancel()

    def _fail(self, why: str) -> None:
        self.outbox.clear()
        pending, self.pending = self.pending, {}
        error = Unavailable(f"forwarding failed: {why}; the request may or may not have run")
        for sink, tag in pending.values():
            sink.deliver(tag, error)


class Forwarder:
    """The connections of one process to its peers; use inside its nursery."""

    def __init__(
        self,
        nursery: trio.Nursery,
        max_frame_bytes: int,
        credential: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._nursery = nursery
        self._credential = credential  # this process's host token, when auth is required
        self._peers: dict[str, _Peer] = {}
        self._ids = itertools.count(1)
        self.max_frame_bytes = max_frame_bytes

    def forward(
        self,
        address: str,
        key: str,
        op: wire.WireOp,
        sink: Sink,
        tag: Any,
        *,
        idempotency_key: str | None,
        epoch: int,
        readonly: bool = False,
    ) -> None:
        """Send one request to ``address``; its reply goes to ``sink.deliver(tag, ...)``."""
        req_id = next(self._ids)
        try:
            frame = wire.request_frame(req_id, key, op, idempotency_key, epoch, readonly=readonly)
            if len(frame) - wire.HEADER_BYTES > self.max_frame_bytes + wire.PEER_SLACK_BYTES:
                # a request right at the size limit: the epoch would push it over, and
                # the owner checks its ownership anyway
                frame = wire.request_frame(
                    req_id, key, op, idempotency_key, None, readonly=readonly
                )
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            # what the owner's SQLite would refuse, msgpack cannot even carry
            sink.deliver(tag, BadRequest(f"bad parameters: an integer is too big ({exc})"))
            return
        peer = self._peers.get(address)
        if peer is None or peer.closed:
            peer = self._peers[address] = _Peer(address, self._nursery, self._credential)
        peer.send(frame, req_id, sink, tag)


class ForwardWaiter:
    """A sink one task awaits (HTTP handlers)."""

    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Forwarded | Error | None = None

    def deliver(self, tag: Any, result: Any) -> None:
        self.result = result
        self.event.set()

    async def wait(self, op: Any) -> Any:
        await self.event.wait()
        result = self.result
        if isinstance(result, Error):
            raise result
        assert result is not None
        return result.decode(op)


__all__ = ["ForwardWaiter", "Forwarded", "Forwarder"]
