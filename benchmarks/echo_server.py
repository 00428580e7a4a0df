"""The framing ceiling: a bare trio + msgspec server speaking shardlite's RPC framing.

It does the least any server of this protocol must do per request: split the stream into
4-byte big-endian length-prefixed frames, decode ``[id, key, ["sql", text, params]]``
with msgspec, and answer ``[id, 0, [columns, rows, changes, last_insert_rowid]]`` (the
reply an INSERT gets from shardlite), all replies of one read in one ``send_all``. No
actor, no SQLite. One task per connection, as simple as trio gets.

    taskset -c 0 python -m benchmarks.echo_server   # prints "echo serving rpc://127.0.0.1:PORT"
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import msgspec
import trio

RECEIVE_BYTES = 256 * 1024


class Sql(msgspec.Struct, tag="sql", array_like=True, frozen=True):
    sql: str
    params: list[Any] | dict[str, Any] | None = None


class Request(msgspec.Struct, array_like=True, frozen=True):
    id: int
    key: str
    op: Sql


decode = msgspec.msgpack.Decoder(Request).decode
encode = msgspec.msgpack.Encoder().encode
NO_COLUMNS: list[str] = []
NO_ROWS: list[Any] = []


async def handle(stream: trio.SocketStream) -> None:
    buf = bytearray()
    rowid = 0
    try:
        while data := await stream.receive_some(RECEIVE_BYTES):
            buf += data
            pos, n = 0, len(buf)
            replies = []
            while n - pos >= 4:
                end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
                if end > n:
                    break
                req = decode(buf[pos + 4 : end])
                rowid += 1
                payload = encode((req.id, 0, (NO_COLUMNS, NO_ROWS, 1, rowid)))
                replies.append(len(payload).to_bytes(4, "big") + payload)
                pos = end
            del buf[:pos]
            if replies:
                await stream.send_all(b"".join(replies))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        print(f"echo serving rpc://127.0.0.1:{port}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    trio.run(main)
    sys.exit(0)
