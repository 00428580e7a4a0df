"""The request loop of one generator process: closed or open loop, RPC, HTTP or PostgreSQL.

RPC and HTTP use plain non-blocking sockets and epoll (about 5× an asyncio client on
this box), requests built just in time. RPC connections are pipelined: each keeps up to
``window`` requests outstanding. HTTP/1.1 connections carry one request at a time (no
pipelining), so the concurrency is the number of connections. PostgreSQL runs one
thread per connection with psycopg (the server, not the client, is the bottleneck).

Closed loop: every reply is replaced by a new request at once. Open loop: request ``k``
is *intended* at ``start + k / rate``; it leaves when that time has come and a
connection has room, and its latency is counted from the intended time, so a stalled
server shows up as latency instead of as fewer requests (no coordinated omission).
"""

from __future__ import annotations

import math
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from hdrh.histogram import HdrHistogram

from ._requests import Scenario
from ._spec import LoadSpec, Target

LOWEST_US, HIGHEST_US, DIGITS = 1, 60_000_000, 3
"""Histograms count microseconds from 1 µs to 60 s, at 3 significant digits."""
PROGRESS_EVERY_S = 0.25
STALL_TIMEOUT_S = 30.0
AUTH_ID = (1 << 63) + 1
"""Request id of the authentication frame (above every id the run uses)."""
MAX_RPC_CONNECTIONS = 16


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


class Recorder:
    """Latencies and errors of one generator process: overall and per second."""

    def __init__(self, start: float, progress: Callable[[dict[str, Any]], None]) -> None:
        self.start = start
        self.hist = new_histogram()
        self.seconds: list[HdrHistogram] = []
        self.second_errors: list[int] = []
        self.errors: dict[str, int] = {}
        self.first_errors: dict[str, str] = {}
        self.count = 0
        self.error_count = 0
        self._progress = progress
        self._next_progress = start + PROGRESS_EVERY_S
        self._window = new_histogram()

    def record(self, now: float, latency_s: float, error: tuple[str, str] | None = None) -> None:
        us = min(max(int(latency_s * 1e6), LOWEST_US), HIGHEST_US)
        self.hist.record_value(us)
        self._window.record_value(us)
        sec = int(now - self.start)
        while len(self.seconds) <= sec:
            self.seconds.append(new_histogram())
            self.second_errors.append(0)
        self.seconds[sec].record_value(us)
        self.count += 1
        if error is not None:
            code, message = error
            self.error_count += 1
            self.second_errors[sec] += 1
            self.errors[code] = self.errors.get(code, 0) + 1
            self.first_errors.setdefault(code, message)
        if now >= self._next_progress:
            self.flush_progress(now)

    def flush_progress(self, now: float) -> None:
        window = self._window
        self._progress(
            {
                "count": self.count,
                "errors": self.error_count,
                "p50_us": window.get_value_at_percentile(50) if window.total_count else 0,
                "p99_us": window.get_value_at_percentile(99) if window.total_count else 0,
            }
        )
        self._window = new_histogram()
        self._next_progress = now + PROGRESS_EVERY_S

    def result(self, wall: float, cpu: float) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors": self.errors,
            "first_errors": self.first_errors,
            "wall_s": wall,
            "cpu_s": cpu,
            "hist": self.hist.encode().decode(),
            "seconds": [
                [i, h.total_count, self.second_errors[i], h.encode().decode()]
                for i, h in enumerate(self.seconds)
            ],
        }


class Pacer:
    """When requests may leave: at once (closed loop) or on the open loop's schedule."""

    def __init__(self, spec: LoadSpec, procs: int, start: float) -> None:
        self.rate = spec.rate / procs if spec.rate else 0.0
        self.start = start
        self.deadline = start + spec.duration_s
        self.budget = math.ceil(spec.max_requests / procs) if spec.max_requests else math.inf
        self.issued = 0

    def finished(self, now: float) -> bool:
        """No more requests will be sent: the duration or the request budget is spent."""
        return now >= self.deadline or self.issued >= self.budget

    def due(self, now: float) -> int:
        """How many requests may be sent now (open loop: whose intended time has come)."""
        if self.finished(now):
            return 0
        if not self.rate:
            return int(min(1 << 30, self.budget - self.issued))
        intended = math.floor((now - self.start) * self.rate) + 1
        return int(min(intended, self.budget) - self.issued)

    def intended(self) -> float:
        """The intended send time of the next request (open loop), else 0: now."""
        return self.start + self.issued / self.rate if self.rate else 0.0

    def wait(self, now: float) -> float:
        """How long until the next request is due (open loop), capped."""
        if not self.rate:
            return 1.0
        return max(0.0, min(1.0, self.start + self.issued / self.rate - now))


# ---------------------------------------------------------------------- RPC


class _Reply(msgspec.Struct, array_like=True):
    id: int
    status: int
    body: msgspec.Raw


_decode_reply = msgspec.msgpack.Decoder(_Reply).decode


class _RpcConn:
    __slots__ = ("buf", "outstanding", "sent_at", "sock")

    def __init__(self, target: Target, token: str) -> None:
        self.sock = socket.create_connection((target.host, target.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if token:
            _authenticate(self.sock, token)
        self.sock.setblocking(False)
        self.buf = b""
        self.outstanding = 0
        self.sent_at: dict[int, float] = {}


def rpc_exchange(sock: socket.socket, req_id: int, op: Any) -> Any:
    """Send one request on a blocking socket and return its decoded result; an error
    reply raises PermissionError with its message."""
    from shardlite.router import wire

    sock.sendall(wire.request_frame(req_id, "", op))
    reader = wire.FrameReader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        frames = reader.feed(data)
        if frames:
            reply = wire.response_decoder.decode(frames[0])
            body = msgspec.msgpack.decode(reply.body)
            if reply.status != wire.STATUS_OK:
                raise PermissionError(str(body.get("message", body)))
            return body


def _authenticate(sock: socket.socket, token: str) -> None:
    """The token first, on the still-blocking socket; raise if it is refused."""
    from shardlite.router import wire

    try:
        rpc_exchange(sock, AUTH_ID, wire.Authenticate(token))
    except PermissionError as exc:
        raise PermissionError(f"the token was refused: {exc}") from None


def run_rpc(spec: LoadSpec, target: Target, scenario: Scenario, rec: Recorder, procs: int) -> None:
    per_proc = max(1, spec.concurrency // procs)
    nconns = spec.connections or min(per_proc, MAX_RPC_CONNECTIONS)
    window = max(1, math.ceil(per_proc / nconns))
    conns = [_RpcConn(target, spec.token) for _ in range(nconns)]
    pacer = Pacer(spec, procs, rec.start)
    ep = select.epoll()
    by_fd = {c.sock.fileno(): c for c in conns}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    next_id = 1
    clock = time.perf_counter
    last_reply = clock()

    def send(now: float) -> None:
        nonlocal next_id
        due = pacer.due(now)
        for c in conns:
            if due <= 0:
                return
            room = min(window - c.outstanding, due)
            if room <= 0:
                continue
            parts = []
            for _ in range(room):
                tail = scenario.rpc_tail()
                size = 2 + 8 + len(tail)
                parts.append(
                    size.to_bytes(4, "big") + b"\x93\xcf" + next_id.to_bytes(8, "big") + tail
                )
                c.sent_at[next_id] = pacer.intended() or now
                pacer.issued += 1
                next_id += 1
            c.sock.sendall(b"".join(parts))
            c.outstanding += room
            due -= room

    send(clock())
    while True:
        now = clock()
        if pacer.finished(now) and not any(c.outstanding for c in conns):
            break
        if now - last_reply > STALL_TIMEOUT_S and any(c.outstanding for c in conns):
            raise TimeoutError(f"no reply from {target.url} for {STALL_TIMEOUT_S:.0f} s")
        events = ep.poll(pacer.wait(now))
        if not events and not any(c.outstanding for c in conns):
            last_reply = now  # idle between open-loop sends: nothing is overdue
        for fd, _ in events:
            c = by_fd[fd]
            data = c.sock.recv(1 << 18)
            if not data:
                raise ConnectionError(f"{target.url} closed the connection")
            now = last_reply = clock()
            _take_rpc(c, data, now, rec)
        send(clock())
    for c in conns:
        c.sock.close()
    ep.close()


def _take_rpc(c: _RpcConn, data: bytes, now: float, rec: Recorder) -> None:
    if c.buf:
        data = c.buf + data
    n, pos = len(data), 0
    view = memoryview(data)
    while n - pos >= 4:
        end = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
        if end > n:
            break
        reply = _decode_reply(view[pos + 4 : end])
        sent = c.sent_at.pop(reply.id)
        error = None
        if reply.status:
            err = msgspec.msgpack.decode(reply.body)
            error = (str(err.get("code", "?")), str(err.get("message", "")))
        rec.record(now, now - sent, error)
        c.outstanding -= 1
        pos = end
    view.release()
    c.buf = data[pos:]


# ---------------------------------------------------------------------- HTTP


class _HttpConn:
    __slots__ = ("buf", "busy", "sent_at", "sock")

    def __init__(self, target: Target) -> None:
        self.sock = socket.create_connection((target.host, target.port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.busy = False
        self.sent_at = 0.0


def run_http(spec: LoadSpec, target: Target, scenario: Scenario, rec: Recorder, procs: int) -> None:
    nconns = max(1, spec.concurrency // procs)
    conns = [_HttpConn(target) for _ in range(nconns)]
    host = f"{target.host}:{target.port}"
    pacer = Pacer(spec, procs, rec.start)
    ep = select.epoll()
    by_fd = {c.sock.fileno(): c for c in conns}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    clock = time.perf_counter
    last_reply = clock()
    idle = list(conns)

    def send(now: float) -> None:
        due = pacer.due(now)
        while due > 0 and idle:
            c = idle.pop()
            c.sent_at = pacer.intended() or now
            c.sock.sendall(scenario.http_request(host))
            c.busy = True
            pacer.issued += 1
            due -= 1

    send(clock())
    while True:
        now = clock()
        if pacer.finished(now) and len(idle) == len(conns):
            break
        if now - last_reply > STALL_TIMEOUT_S and len(idle) < len(conns):
            raise TimeoutError(f"no reply from {target.url} for {STALL_TIMEOUT_S:.0f} s")
        events = ep.poll(pacer.wait(now))
        if not events and len(idle) == len(conns):
            last_reply = now
        for fd, _ in events:
            c = by_fd[fd]
            data = c.sock.recv(1 << 18)
            if not data:
                raise ConnectionError(f"{target.url} closed the connection")
            now = last_reply = clock()
            c.buf += data
            done = _http_response(c.buf)
            if done is None:
                continue
            status, body, used = done
            c.buf = c.buf[used:]
            error = None
            if status >= 400:
                error = _http_error(status, body)
            rec.record(now, now - c.sent_at, error)
            c.busy = False
            idle.append(c)
        send(clock())
    for c in conns:
        c.sock.close()
    ep.close()


def _http_response(buf: bytes) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the first complete response in ``buf``, or None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    end = head_end + 4 + length
    if len(buf) < end:
        return None
    return status, buf[head_end + 4 : end], end


def _http_error(status: int, body: bytes) -> tuple[str, str]:
    try:
        err = msgspec.json.decode(body)["error"]
        return str(err["code"]), str(err.get("message", ""))
    except (msgspec.DecodeError, KeyError, TypeError):
        return f"http_{status}", body[:200].decode("utf-8", "replace")


# ---------------------------------------------------------------------- PostgreSQL


def run_postgres(
    spec: LoadSpec, target: Target, scenario: Scenario, rec: Recorder, procs: int
) -> None:
    import psycopg

    nconns = max(1, spec.concurrency // procs)
    pacer = Pacer(spec, procs, rec.start)
    lock = threading.Lock()
    clock = time.perf_counter
    failures: list[BaseException] = []
    conns = [psycopg.connect(target.url, autocommit=True) for _ in range(nconns)]

    def take() -> tuple[float, list[Any]] | None:
        while True:
            with lock:
                now = clock()
                if pacer.due(now) > 0:
                    intended = pacer.intended() or now
                    pacer.issued += 1
                    return intended, scenario.pg_transaction()
                if pacer.finished(now):
                    return None
                wait = pacer.wait(now)
            time.sleep(wait)

    def worker(conn: Any) -> None:
        try:
            while (job := take()) is not None:
                sent, statements = job
                error = None
                try:
                    if len(statements) == 1:
                        _execute(conn, *statements[0])
                    else:
                        with conn.transaction():
                            for sql, params in statements:
                                _execute(conn, sql, params)
                except psycopg.Error as exc:
                    error = (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                now = clock()
                with lock:
                    rec.record(now, now - sent, error)
        except BaseException as exc:  # a broken connection: the run reports it
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    if failures:
        raise failures[0]


def _execute(conn: Any, sql: str, params: tuple[Any, ...]) -> None:
    cursor = conn.execute(sql, params)
    if cursor.description is not None:
        cursor.fetchall()


RUNNERS = {"rpc": run_rpc, "http": run_http, "postgres": run_postgres}

__all__ = ["RUNNERS", "Pacer", "Recorder", "new_histogram"]
