"""kill -9 under load: every acknowledged write survives, nothing is half-applied."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import shardlite

KEYS = [f"crash-{i}" for i in range(8)]
WRITERS = 32
ACKS_PER_ROUND = 1500
ROUNDS = 3
SCHEMA = "CREATE TABLE IF NOT EXISTS t(id INTEGER, part TEXT, PRIMARY KEY (id, part)) STRICT"


class Load:
    """Writers that each send a two-row batch per request and record the acknowledged ones."""

    def __init__(self, url: str, ids: itertools.count[int]) -> None:
        self.url = url
        self.ids = ids
        self.acked: set[tuple[str, int]] = set()
        self.enough = threading.Event()
        self.errors: list[BaseException] = []

    async def run(self) -> None:
        try:
            async with (
                shardlite.connect_async(self.url, timeout=10) as client,
                trio.open_nursery() as nursery,
            ):
                for w in range(WRITERS):
                    nursery.start_soon(self.writer, client, w)
        except shardlite.ConnectionLost:
            pass
        except BaseExceptionGroup as group:
            _, rest = group.split((shardlite.ConnectionLost, shardlite.Unavailable))
            if rest is not None:
                self.errors.append(rest)

    async def writer(self, client: Any, w: int) -> None:
        for _ in range(100_000):
            key = KEYS[w % len(KEYS)]
            n = next(self.ids)
            await client.actor(key).batch(
                [
                    ("INSERT INTO t(id, part) VALUES (?, 'a')", [n]),
                    ("INSERT INTO t(id, part) VALUES (?, 'b')", [n]),
                ]
            )
            self.acked.add((key, n))  # acknowledged: the server replied
            if len(self.acked) >= ACKS_PER_ROUND:
                self.enough.set()


@pytest.mark.parametrize(
    ("durability", "procs"), [("log", "1"), ("log", "2"), ("fsync", "2"), ("os", "2")]
)
def test_kill9_under_load_loses_no_acknowledged_write(
    start_server: Any, tmp_path: Path, durability: str, procs: str
) -> None:
    data = tmp_path / "data"
    ids = itertools.count(1)
    acked: set[tuple[str, int]] = set()
    for _ in range(ROUNDS):
        server = start_server("--durability", durability, "--procs", procs, data=data)
        with shardlite.connect(server.rpc_url) as client:
            for key in KEYS:
                client.actor(key).sql(SCHEMA)
        load = Load(server.rpc_url, ids)
        thread = threading.Thread(target=trio.run, args=(load.run,))
        thread.start()
        assert load.enough.wait(120), "the load did not get going"
        server.kill()  # SIGKILL mid-load, to every process of the server
        thread.join(60)
        assert not thread.is_alive()
        assert not load.errors, load.errors
        acked |= load.acked

    server = start_server("--durability", durability, "--procs", procs, data=data)
    present: dict[tuple[str, int], set[str]] = {}
    with shardlite.connect(server.rpc_url) as client:
        for key in KEYS:
            for n, part in client.actor(key).sql("SELECT id, part FROM t").rows:
                present.setdefault((key, n), set()).add(part)
            assert client.actor(key).sql("PRAGMA integrity_check").rows == [("ok",)]
    lost = acked - present.keys()
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:5]}"
    half = {k: parts for k, parts in present.items() if parts != {"a", "b"}}
    assert not half, f"half-applied batches: {list(half.items())[:5]}"
    assert len(acked) >= ROUNDS * ACKS_PER_ROUND
