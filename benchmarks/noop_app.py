"""The HTTP baseline: a bare quart-trio no-op POST endpoint served by hypercorn's trio worker.

Same route shape and body as shardlite's ``POST /v1/actors/{key}/sql``: it reads the JSON
body, decodes it with msgspec and answers the JSON an INSERT gets from shardlite, without
any actor or SQLite. Served in-process by ``hypercorn.trio.serve`` with the same settings
shardlite's server uses (no access log, keep-alive 5 s).

    taskset -c 0 python -m benchmarks.noop_app   # prints "noop serving http://127.0.0.1:PORT"
"""

from __future__ import annotations

import functools
import logging
import signal
from typing import Any

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio


class SqlBody(msgspec.Struct, forbid_unknown_fields=True):
    sql: str
    params: list[Any] | dict[str, Any] | None = None


decode = msgspec.json.Decoder(SqlBody).decode
encode = msgspec.json.Encoder().encode
app = QuartTrio("noop")
_rowid = 0


@app.route("/v1/actors/<key>/sql", methods=["POST"])
async def sql(key: str) -> Response:
    global _rowid
    decode(await request.get_data(cache=False))
    _rowid += 1
    body = {"columns": [], "rows": [], "changes": 1, "last_insert_rowid": _rowid}
    return Response(encode(body), 200, content_type="application/json")


def _config() -> Config:
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("noop.http")
    cfg.keep_alive_timeout = 5.0
    cfg.read_timeout = 30
    return cfg


async def main() -> None:
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, _config(), shutdown_trigger=stopping.wait)
        )
        print(f"noop serving {urls[0]}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stopping.set()
                break


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    trio.run(main)
