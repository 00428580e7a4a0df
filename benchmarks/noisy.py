"""A noisy tenant, for the auth section: runaway queries and a flood on one key.

    python -m benchmarks.noisy --url rpc://127.0.0.1:PORT --seconds 30

Four tasks send a query that only the statement time budget stops; eight more send
``SELECT 1`` as fast as replies come back; all on the key ``noisy``. Bounded by time.
"""

from __future__ import annotations

import argparse

import trio

import shardlite

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


async def main(url: str, seconds: float) -> None:
    async with shardlite.connect_async(url) as client:
        actor = client.actor("noisy")

        async def runaway() -> None:
            while True:
                try:
                    await actor.sql(RUNAWAY)
                except (shardlite.Timeout, shardlite.Overloaded):
                    pass

        async def flood() -> None:
            while True:
                try:
                    await actor.sql("SELECT 1")
                except shardlite.Overloaded:
                    await trio.sleep(0.01)

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(runaway)
                for _ in range(8):
                    nursery.start_soon(flood)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    trio.run(main, args.url, args.seconds)
