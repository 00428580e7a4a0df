"""kill -9 under load: every acknowledged write survives, nothing is half-applied."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
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


def test_a_damaged_log_segment_stops_serve_in_one_line_and_leaves_no_process(
    start_server: Any, tmp_path: Path
) -> None:
    """A record of a completed log segment that no longer reads (a flipped bit) means
    acknowledged writes are missing from the log: `serve` refuses, in one line naming the
    segment, and stops its other shard process too (it holds the data directory's lock).
    The remedy the message gives, moving the segments aside, keeps what the files hold."""
    args = ("--procs", "2", "--log-segment-bytes", "16KiB")
    args += ("--log-checkpoint-interval", "1h", "--log-trim-bytes", "1GiB")  # nothing trimmed
    server = start_server(*args)
    keys = [f"damaged-{i}" for i in range(8)]
    with shardlite.connect(server.rpc_url) as client:
        for key in keys:
            client.actor(key).sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        for n in range(200):
            client.actor(keys[n % len(keys)]).sql("INSERT INTO t(v) VALUES (?)", ["x" * 500])
    server.kill()
    segments = [sorted(log.glob("*.log")) for log in sorted(server.data.glob("shards/*/log"))]
    damaged = next(s for s in segments if len(s) >= 2)  # its first one was completed
    with open(damaged[0], "r+b") as f:
        f.seek(32 + 20 + 5)  # inside the first record
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))

    cmd = [sys.executable, "-m", "shardlite", "serve", "--data", str(server.data)]
    cmd += ["--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert f"{damaged[0]} is damaged at byte" in out.stderr
    assert "acknowledged and are lost" in out.stderr and "Traceback" not in out.stderr

    aside = tmp_path / "aside"
    aside.mkdir()
    for segment in damaged:
        shutil.move(segment, aside)
    # starts only if no shard process of the refused run still holds the lock
    again = start_server(*args, data=server.data)
    with shardlite.connect(again.rpc_url) as client:
        rows = sum(client.actor(key).sql("SELECT count(*) FROM t").rows[0][0] for key in keys)
    assert rows == 200  # a kill -9 leaves every write in the files


def test_a_restart_after_a_kill_reports_what_recovery_read_in_metrics(start_server: Any) -> None:
    server = start_server("--procs", "1", "--shards", "1")
    with shardlite.connect(server.rpc_url) as client:
        client.actor("counted").sql("CREATE TABLE t(v)")
        for i in range(50):
            client.actor("counted").sql("INSERT INTO t VALUES (?)", [i])
    server.kill()
    again = start_server("--procs", "1", "--shards", "1", data=server.data)
    text = httpx.get(f"{again.http_url}/metrics").text

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("shardlite_log_recovered_records_total") >= 50  # the log's active segment
    assert value("shardlite_log_recovered_actors_total") == 0  # a kill -9 loses no file write
    assert value("shardlite_log_size_bytes") > 0
    assert re.search(r"^shardlite_log_syncfs_total [0-9]", text, re.M)
    with shardlite.connect(again.rpc_url) as client:
        assert client.actor("counted").sql("SELECT count(*) FROM t").rows == [(50,)]
