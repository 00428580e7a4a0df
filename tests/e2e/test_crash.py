"""kill -9 under load: every acknowledged write survives, nothing is half-applied."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import shardlite
from shardlite.actor import key_to_relpath
from shardlite.actor._shardlog import RECORD_HEADER, SEGMENT_HEADER
from tests.e2e.conftest import wait_until

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
    ("durability", "procs"),
    [("log", "1"), ("log", "2"), ("log-deferred", "1"), ("fsync", "2"), ("os", "2")],
)
def test_kill9_under_load_loses_no_acknowledged_write(
    start_server: Any, tmp_path: Path, durability: str, procs: str
) -> None:
    """``log-deferred``: actor files commit every 64 batches (and at checkpoints), so a
    kill leaves most acknowledged writes in the shard log alone."""
    data = tmp_path / "data"
    ids = itertools.count(1)
    acked: set[tuple[str, int]] = set()
    args: tuple[str, ...] = ("--durability", durability, "--procs", procs)
    if durability == "log-deferred":
        args = ("--durability", "log", "--log-batches-per-commit", "64", "--procs", procs)
    for _ in range(ROUNDS):
        server = start_server(*args, data=data)
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

    server = start_server(*args, data=data)
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


def test_a_damaged_log_segment_takes_its_shard_out_of_service_and_only_it(
    start_server: Any, tmp_path: Path
) -> None:
    """A record of a completed log segment that no longer reads (a flipped bit) means
    acknowledged writes are missing from the log: that shard is not served (its keys
    get 503 naming the segment, /readyz and /metrics list it), while the host's other
    shards serve. The remedy the message gives, moving the segments aside, then keeps
    what the files hold."""
    args = ("--procs", "1", "--shards", "2", "--log-segment-bytes", "16KiB")
    args += ("--log-checkpoint-interval", "1h", "--log-trim-bytes", "1GiB")  # nothing trimmed
    args += ("--log-batches-per-commit", "1")  # a kill leaves every write in the files
    server = start_server(*args)
    keys = [f"damaged-{i}" for i in range(32)]  # in both shards
    rows_of = {key: len(range(i, 200, len(keys))) for i, key in enumerate(keys)}
    with shardlite.connect(server.rpc_url) as client:
        for key in keys:
            client.actor(key).sql("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        for n in range(200):
            client.actor(keys[n % len(keys)]).sql("INSERT INTO t(v) VALUES (?)", ["x" * 500])
    server.kill()
    shard_of = {  # each key's file is in its shard's directory
        key: path.parent.name
        for key in keys
        for path in server.data.glob("shards/*/log")
        if (path.parent / key_to_relpath(key)).exists()
    }
    assert len(shard_of) == len(keys)
    logs = sorted(server.data.glob("shards/*/log"))
    segments = {log.parent.name: sorted(log.glob("*.log")) for log in logs}
    bad_shard = shard_of[keys[0]]
    damaged = segments[bad_shard]  # its first segment was completed: 16 KiB of records
    assert len(damaged) >= 2
    with open(damaged[0], "r+b") as f:
        f.seek(SEGMENT_HEADER.size + RECORD_HEADER.size + 5)  # inside the first record
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))

    again = start_server(*args, data=server.data)
    assert f"not serving {bad_shard}: {damaged[0]} is damaged at byte" in again.log
    bad = [k for k in keys if shard_of[k] == bad_shard]
    good = [k for k in keys if shard_of[k] != bad_shard]
    assert bad and good
    with shardlite.connect(again.rpc_url) as client:
        for key in good:
            assert client.actor(key).sql("SELECT count(*) FROM t").rows == [(rows_of[key],)]
    for key in bad:
        r = httpx.post(f"{again.http_url}/v1/actors/{key}/sql", json={"sql": "SELECT 1"})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "unavailable"
        assert f"{bad_shard} is not served" in error["message"]
        assert "acknowledged and are lost" in error["message"]
    ready = httpx.get(f"{again.http_url}/readyz")
    assert ready.status_code == 200 and bad_shard in ready.json()["unservable"]
    metrics = httpx.get(f"{again.http_url}/metrics").text
    assert "\nshardlite_shards_unservable 1.0" in metrics
    from tests.e2e.test_backup import ops

    verify = ops(server.data, "verify", bad_shard, check=False)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"{bad_shard}: {bad_shard} is not served by" in verify.stdout, verify.stdout
    assert re.search(r"it cannot open: .* is damaged at byte", verify.stdout), verify.stdout
    assert again.terminate() == 0

    aside = tmp_path / "aside"
    aside.mkdir()
    for segment in damaged:
        shutil.move(segment, aside)
    third = start_server(*args, data=server.data)
    with shardlite.connect(third.rpc_url) as client:
        rows = sum(client.actor(key).sql("SELECT count(*) FROM t").rows[0][0] for key in keys)
    assert rows == 200  # a kill -9 leaves every write in the files (one commit a batch)


def test_a_restart_after_a_kill_reports_what_recovery_read_in_metrics(start_server: Any) -> None:
    args = ("--procs", "1", "--shards", "1", "--log-batches-per-commit", "1")
    server = start_server(*args)
    with shardlite.connect(server.rpc_url) as client:
        client.actor("counted").sql("CREATE TABLE t(v)")
        for i in range(50):
            client.actor("counted").sql("INSERT INTO t VALUES (?)", [i])
    server.kill()
    again = start_server(*args, data=server.data)
    text = httpx.get(f"{again.http_url}/metrics").text

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("shardlite_log_recovered_records_total") >= 50  # the log's active segment
    assert value("shardlite_log_read_seconds_total") > 0
    # a kill -9 loses no file write (each batch commits its file)
    assert value("shardlite_log_recovered_actors_total") == 0
    assert value("shardlite_log_size_bytes") > 0
    assert re.search(r"^shardlite_log_syncfs_total [0-9]", text, re.M)
    with shardlite.connect(again.rpc_url) as client:
        assert client.actor("counted").sql("SELECT count(*) FROM t").rows == [(50,)]


def test_evicted_files_closed_without_a_sync_lose_nothing_to_a_kill(start_server: Any) -> None:
    """With two actors open at most, every call to the next of six keys evicts another:
    a quick close (no checkpoint, no sync, the WAL left beside the file). A kill -9 then
    a restart must still hold every acknowledged write, and /metrics counts the closes."""
    keys = [f"evicted-{i}" for i in range(6)]
    server = start_server("--procs", "1", "--max-open-actors", "2")  # one /metrics
    with shardlite.connect(server.rpc_url) as client:
        for key in keys:
            client.actor(key).sql("CREATE TABLE t(v INTEGER)")
        for i in range(120):
            client.actor(keys[i % len(keys)]).sql("INSERT INTO t VALUES (?)", [i])
    text = httpx.get(f"{server.http_url}/metrics").text
    evictions = re.search(r"^shardlite_actor_evictions_total ([0-9.e+]+)$", text, re.M)
    quick = re.search(r"^shardlite_actor_quick_closes_total ([0-9.e+]+)$", text, re.M)
    assert evictions and quick
    assert float(quick.group(1)) >= 100 and float(evictions.group(1)) >= float(quick.group(1))
    server.kill()
    again = start_server("--procs", "1", data=server.data)
    with shardlite.connect(again.rpc_url) as client:
        for n, key in enumerate(keys):
            rows = client.actor(key).sql("SELECT v FROM t ORDER BY v").rows
            assert [v for (v,) in rows] == list(range(n, 120, len(keys)))
            assert client.actor(key).sql("PRAGMA integrity_check").rows == [("ok",)]


def test_a_restart_serves_while_recovery_runs_and_keeps_its_lease(start_server: Any) -> None:
    """After a kill -9, every key's batches are in the log alone (the files never
    committed them with the default --log-batches-per-commit). The restart serves at
    once: a key called before the background recovery reaches it is brought up first;
    meanwhile the 300 ms lease is renewed (the recovery thread does not starve the loop),
    and the recovery ends with every file brought up."""
    args = ("--procs", "1", "--shards", "1")
    args += ("--log-checkpoint-interval", "1h", "--log-trim-bytes", "1GiB")  # no commits
    # the short lease is for the restart: under the load below, on a busy CI machine, the
    # first server's loop could stall past 300 ms and refuse writes (503, lease lapsed)
    server = start_server(*args)
    keys = [f"lease-{i}" for i in range(1500)]

    async def write() -> None:
        async with shardlite.connect_async(server.rpc_url, timeout=30) as client:

            async def writer(part: list[str]) -> None:
                for key in part:
                    for n in range(3):
                        await client.actor(key).kv.put(f"k{n}", n)

            async with trio.open_nursery() as nursery:
                for w in range(32):
                    nursery.start_soon(writer, keys[w::32])

    trio.run(write)
    server.kill()
    again = start_server(*args, "--lease-ttl", "300ms", data=server.data)
    with shardlite.connect(again.rpc_url) as client:  # the last keys: before their turn
        assert [client.actor(key).kv.get("k2") for key in keys[::-100]] == [2] * 15

    def metric(name: str) -> float:
        text = httpx.get(f"{again.http_url}/metrics").text
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    wait_until(lambda: metric("shardlite_log_recovering_actors") == 0, timeout=120)
    assert metric("shardlite_log_recovered_actors_total") == len(keys)  # each lacked batches
    with shardlite.connect(again.rpc_url) as client:
        assert [client.actor(key).kv.get("k2") for key in keys[::100]] == [2] * 15
