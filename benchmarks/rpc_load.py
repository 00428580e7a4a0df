"""Pipelined RPC load generator: plain blocking sockets, epoll, pre-encoded frames.

Every connection keeps ``window`` requests outstanding: each reply that comes back is
replaced by a new request at once (a sliding window), so the server never waits for the
generator. A request frame is built from bytes encoded ahead of time (the length header,
``[id, key, op]`` with the id as a fixed-width uint32), replies are decoded with msgspec
(``[id, status, body]``, body left raw) and timed from the moment their request was sent.

As a program (pin it to the load CPU with taskset), it prints one JSON line::

    python -m benchmarks.rpc_load --port P --keys 64 --conns 4 --window 64 --seconds 5 \
        [--draw uniform] [--method NAME | --sql TEXT]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import select
import socket
import sys
import time
from typing import Any

import msgspec

from shardlite.actor import CallMethod, Sql

from .common import INSERT_SQL, percentile

STALL_TIMEOUT_S = 60.0
"""Give up when no reply arrived for this long."""
UNIFORM_DRAWS = 1 << 17
"""``draw="uniform"``: each connection's key sequence, drawn ahead (then repeated)."""


class Reply(msgspec.Struct, array_like=True):
    id: int
    status: int
    body: msgspec.Raw


_decode = msgspec.msgpack.Decoder(Reply).decode
_encode = msgspec.msgpack.Encoder().encode


def key_name(i: int) -> str:
    return f"bench-{i:05d}"


def templates(keys: list[str], op_for: Any) -> list[tuple[bytes, bytes]]:
    """Per key: (length header + array/uint32 markers, key + op), around a 4-byte id."""
    out = []
    for i, key in enumerate(keys):
        tail = _encode(key) + _encode(op_for(i))
        size = 2 + 4 + len(tail)  # 0x93 (3-array), 0xce (uint32), id, tail
        out.append((size.to_bytes(4, "big") + b"\x93\xce", tail))
    return out


def insert_op(i: int) -> Sql:
    return Sql(INSERT_SQL, [i, 1])


class Conn:
    __slots__ = ("buf", "first_error", "once", "order", "outstanding", "pos", "sock", "times")

    def __init__(self, port: int, order: list[tuple[bytes, bytes]], once: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.order = order
        self.once = once
        self.pos = 0
        self.times: list[float] = [0.0]  # index = request id; id 0 is never used
        self.outstanding = 0
        self.buf = b""
        self.first_error: Any = None

    def take_replies(self, data: bytes, now: float, lats: list[float]) -> tuple[int, int]:
        """Account the complete replies in ``data`` (after what was left over): their
        latencies go to ``lats``; returns (replies, error replies)."""
        if self.buf:
            data = self.buf + data
        view = memoryview(data)
        n, pos, got, failed, times = len(data), 0, 0, 0, self.times
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(data[pos : pos + 4], "big")
            if end > n:
                break
            reply = _decode(view[pos + 4 : end])
            lats.append(now - times[reply.id])
            if reply.status:
                failed += 1
                self.first_error = self.first_error or msgspec.msgpack.decode(reply.body)
            pos = end
            got += 1
        view.release()
        self.buf = data[pos:]
        self.outstanding -= got
        return got, failed

    def send(self, count: int, now: float) -> int:
        """Send up to ``count`` new requests (fewer when a one-pass order runs out)."""
        order, pos, times = self.order, self.pos, self.times
        if self.once:
            count = min(count, len(order) - pos)
        first = len(times)
        parts = []
        for j in range(count):
            head, tail = order[(pos + j) % len(order)]
            parts.append(head + (first + j).to_bytes(4, "big") + tail)
        if not parts:
            return 0
        self.sock.sendall(b"".join(parts))
        self.pos = pos + count
        times.extend([now] * count)
        self.outstanding += count
        return count


def run(
    port: int,
    frames: list[tuple[bytes, bytes]],
    *,
    conns: int = 4,
    window: int = 64,
    seconds: float = 5.0,
    max_requests: int = 10_000_000,
    once: bool = False,
    seed: int = 1,
    draw: str = "cycle",
) -> dict[str, Any]:
    """Drive load for ``seconds`` (and at most ``max_requests``); ``once``: send every
    frame exactly once instead (split over the connections; no time bound).

    ``draw``: each connection cycles through the keys in its own shuffled order
    (``cycle``: every key equally often), or draws each request's key independently and
    uniformly at random (``uniform``, like pgbench's ``random()``)."""
    clients = []
    for c in range(conns):
        rng = random.Random(seed + c)
        if once:
            order = frames[c::conns]
        elif draw == "uniform":
            order = rng.choices(frames, k=max(UNIFORM_DRAWS, 8 * len(frames)))
        else:
            order = list(frames)
            rng.shuffle(order)
        clients.append(Conn(port, order, once))
    by_fd = {cl.sock.fileno(): cl for cl in clients}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    lats: list[float] = []
    errors = 0
    first_error = None
    sent = 0
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    deadline = math.inf if once else start + seconds
    last_reply = start
    for cl in clients:
        sent += cl.send(min(window, max_requests - sent), start)
    for cl in clients:
        if not cl.outstanding:
            ep.unregister(cl.sock.fileno())
    active = sum(1 for cl in clients if cl.outstanding)
    while active:
        if clock() - last_reply > STALL_TIMEOUT_S:
            raise RuntimeError(f"no reply for {STALL_TIMEOUT_S:.0f} s")
        for fd, _ in ep.poll(1.0):
            cl = by_fd[fd]
            data = cl.sock.recv(1 << 18)
            if not data:
                raise RuntimeError("the server closed the connection")
            now = last_reply = clock()
            got, failed = cl.take_replies(data, now, lats)
            if failed:
                errors += failed
                first_error = first_error or cl.first_error
            more = 0
            if got and now < deadline and sent < max_requests:
                more = cl.send(min(got, max_requests - sent), now)
                sent += more
            if not more and not cl.outstanding:
                ep.unregister(fd)
                active -= 1
    wall = clock() - start
    cpu = time.process_time() - cpu0
    for cl in clients:
        cl.sock.close()
    ep.close()
    return summary(lats, errors, first_error, wall, cpu)


def summary(
    lats: list[float], errors: int, first_error: Any, wall: float, cpu: float
) -> dict[str, Any]:
    """The JSON a load run prints: throughput, latency percentiles, errors, its own CPU."""
    lats.sort()
    return {
        "requests": len(lats),
        "seconds": wall,
        "rps": len(lats) / wall if wall else 0.0,
        "p50_ms": percentile(lats, 50) * 1e3,
        "p99_ms": percentile(lats, 99) * 1e3,
        "errors": errors,
        "first_error": first_error,
        "gen_cpu_s": cpu,
        "gen_cpu_util": cpu / wall if wall else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", type=int, default=1)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--max-requests", type=int, default=10_000_000)
    ap.add_argument("--draw", choices=("cycle", "uniform"), default="cycle")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--method", help="call this actor-class method (no arguments)")
    what.add_argument("--sql", help="run this statement (no parameters)")
    args = ap.parse_args(argv)
    op_for: Any = insert_op
    if args.method:
        op_for = lambda i: CallMethod(args.method)  # noqa: E731
    elif args.sql:
        op_for = lambda i: Sql(args.sql)  # noqa: E731
    frames = templates([key_name(i) for i in range(args.keys)], op_for)
    result = run(
        args.port,
        frames,
        conns=args.conns,
        window=args.window,
        seconds=args.seconds,
        max_requests=args.max_requests,
        draw=args.draw,
    )
    sys.stdout.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
