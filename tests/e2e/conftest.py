"""Fixtures shared by the e2e suites: one server per module, raw HTTP, RPC frames, checks.

A module that wants a server of its own with particular flags sets ``SERVER_ARGS`` (a
tuple of ``shardlite serve`` arguments) at module level and uses ``module_server``. The
server's data directory sits alone inside a directory of its own (``server_root``), so a
test can check that nothing appeared anywhere near it.
"""

from __future__ import annotations

import base64
import http.client as http_client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from tests.conftest import ServerProcess

IO_TIMEOUT_S = 10.0
"""Every socket read in these suites is bounded by this: a hang fails, it never blocks."""
ERROR_FIELDS = {"code", "message", "retryable"}
NEVER_IDLE = ("--idle-timeout", "1h")
"""Keeps actors open for the whole module, so the file tree only changes when data does."""


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the module server's data directory."""
    return tmp_path_factory.mktemp("server-root")


@pytest.fixture(scope="module")
def module_server(request: pytest.FixtureRequest, server_root: Path) -> Iterator[Any]:
    """One `shardlite serve` process for the whole module, started with ``SERVER_ARGS``."""
    args = tuple(getattr(request.module, "SERVER_ARGS", ())) + NEVER_IDLE
    server = ServerProcess(server_root / "data", *args).start()
    yield server
    import os as _os

    if _os.environ.get("DUMP_SERVER_LOG"):
        print("SERVER LOG\n" + server.log)
    if server.proc is not None and server.proc.poll() is None:
        try:
            server.terminate(30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def http(module_server: Any) -> Iterator[httpx.Client]:
    """An httpx client on the module server (keep-alive: one connection reused)."""
    with httpx.Client(base_url=module_server.http_url, timeout=IO_TIMEOUT_S) as client:
        yield client


# ------------------------------------------------------------------ HTTP helpers


class RawResponse(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def raw_http(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """One request with ``path`` sent exactly as given (httpx would normalize ``..``)."""
    parts = urlsplit(base_url)
    conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=IO_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def decode_body(headers: Any, body: bytes) -> Any:
    if "msgpack" in headers.get("content-type", ""):
        return msgspec.msgpack.decode(body)
    return msgspec.json.decode(body)


def assert_error(
    response: httpx.Response | RawResponse,
    status: int,
    code: str,
    *,
    mentions: str | tuple[str, ...] = (),
    retryable: bool = False,
) -> dict[str, Any]:
    """The CONTRACT error shape, with this status and code; returns the error object."""
    status_code = response.status_code if isinstance(response, httpx.Response) else response.status
    body_bytes = response.content if isinstance(response, httpx.Response) else response.body
    assert status_code == status, (status_code, body_bytes[:500])
    body = decode_body(response.headers, body_bytes)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= ERROR_FIELDS, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["retryable"] is retryable, error
    for word in (mentions,) if isinstance(mentions, str) else mentions:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    return dict(error)


def blob(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode()}


def wait_until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (returned), failing after
    ``timeout`` seconds: a wait on a condition another process reaches."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def files_under(root: Path) -> set[str]:
    """Every path under ``root`` (relative), directories included."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


# ------------------------------------------------------------------ RPC helpers


class RpcSocket:
    """A raw RPC connection: frames out, decoded ``[id, status, body]`` responses in."""

    def __init__(self, rpc_url: str) -> None:
        parts = urlsplit(rpc_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), IO_TIMEOUT_S)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + payload

    def send_payloads(self, *payloads: bytes) -> None:
        """Every payload framed, all in one send."""
        self.sock.sendall(b"".join(self.frame(p) for p in payloads))

    def send(self, *requests: Any) -> None:
        """Every request msgpack-encoded and framed, all in one send."""
        self.send_payloads(*(msgspec.msgpack.encode(r) for r in requests))

    def _next_frame(self) -> bytes | None:
        """The next payload, or None on end of stream."""
        while True:
            if len(self._buf) >= 4:
                size = int.from_bytes(self._buf[:4], "big")
                if len(self._buf) >= 4 + size:
                    payload = bytes(self._buf[4 : 4 + size])
                    del self._buf[: 4 + size]
                    return payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self._buf += chunk

    def receive(self, n: int = 1) -> list[list[Any]]:
        """The next ``n`` responses (fails if the server closes first)."""
        out = []
        for _ in range(n):
            payload = self._next_frame()
            assert payload is not None, f"connection closed after {len(out)} of {n} replies"
            out.append(msgspec.msgpack.decode(payload))
        return out

    def receive_by_id(self, n: int) -> dict[int, list[Any]]:
        replies = self.receive(n)
        by_id = {r[0]: r for r in replies}
        assert len(by_id) == n, f"duplicate ids in {replies}"
        return by_id

    def receive_until_closed(self) -> list[list[Any]]:
        """Every response until the server closes the connection (bounded by the timeout)."""
        out = []
        try:
            while (payload := self._next_frame()) is not None:
                out.append(msgspec.msgpack.decode(payload))
        except (ConnectionResetError, BrokenPipeError):
            pass
        return out

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (reads until EOF, bounded)."""
        try:
            return self._next_frame() is None
        except (ConnectionResetError, BrokenPipeError):
            return True

    def request(self, req_id: int, key: str, op: list[Any]) -> list[Any]:
        self.send([req_id, key, op])
        (reply,) = self.receive(1)
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def rpc(module_server: Any) -> Iterator[RpcSocket]:
    conn = RpcSocket(module_server.rpc_url)
    yield conn
    conn.close()


@pytest.fixture
def rpc_connect(module_server: Any) -> Iterator[Any]:
    """Factory for extra raw RPC connections (closed at the end)."""
    opened: list[RpcSocket] = []

    def connect() -> RpcSocket:
        conn = RpcSocket(module_server.rpc_url)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def assert_rpc_error(
    reply: list[Any], req_id: int, code: str, *, mentions: str | tuple[str, ...] = ()
) -> dict[str, Any]:
    """``reply`` is ``[req_id, 1, {code, message, retryable}]``."""
    assert len(reply) == 3 and reply[0] == req_id and reply[1] == 1, reply
    error = reply[2]
    assert set(error) >= ERROR_FIELDS and error["code"] == code, reply
    assert isinstance(error["message"], str) and error["message"].strip(), reply
    for word in (mentions,) if isinstance(mentions, str) else mentions:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    return dict(error)


def assert_rpc_ok(reply: list[Any], req_id: int) -> Any:
    assert len(reply) == 3 and reply[0] == req_id and reply[1] == 0, reply
    return reply[2]
