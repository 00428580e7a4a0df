"""The router end to end: `serve --procs 2`, forwarding, epochs, client routing, supervision."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import shardlite
from shardlite.router import wire

KEYS = [f"cluster-{i}" for i in range(40)]


def ops_status(data: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "shardlite", "ops", "status", "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def rpc_call(address: str, frame_fields: list[Any]) -> list[Any]:
    """One raw request frame to ``address`` ("host:port"); its decoded reply."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        payload = msgspec.msgpack.encode(frame_fields)
        sock.sendall(len(payload).to_bytes(4, "big") + payload)
        reader = wire.FrameReader()
        while True:
            chunk = sock.recv(1 << 16)
            assert chunk, "the server closed the connection"
            frames = reader.feed(chunk)
            if frames:
                reply: list[Any] = msgspec.msgpack.decode(frames[0])
                return reply


def fill(url: str, keys: list[str], routing: bool = True) -> None:
    with shardlite.connect(url, routing=routing) as client:
        for key in keys:
            client.actor(key).sql("CREATE TABLE IF NOT EXISTS t(v TEXT) STRICT")
            client.actor(key).sql("INSERT INTO t VALUES (?)", [key])


def rows_of(url: str, key: str, routing: bool = True) -> list[Any]:
    with shardlite.connect(url, routing=routing) as client:
        return list(client.actor(key).sql("SELECT v FROM t").rows)


@pytest.fixture
def cluster(start_server: Any) -> Any:
    return start_server("--procs", "2")


def test_every_key_has_exactly_one_file_in_exactly_one_shard(cluster: Any) -> None:
    fill(cluster.rpc_url, KEYS, routing=False)  # every request through the shared port
    for key in KEYS:
        files = list(cluster.data.glob(f"shards/*/*/{key}.db"))
        assert len(files) == 1, (key, files)
    status = ops_status(cluster.data)
    assert [n["status"] for n in status["nodes"]] == ["ok", "ok"]
    owners = {s["owner"] for s in status["shards"]}
    assert owners == {n["id"] for n in status["nodes"]}, "both processes own shards"
    assert sum(s["actor_files"] for s in status["shards"]) == len(KEYS)
    slots = sorted(tuple(r) for s in status["shards"] for r in s["slots"])
    assert slots[0][0] == 0 and slots[-1][1] == status["cluster"]["slots"]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slots))


def test_http_on_the_shared_port_answers_every_key(cluster: Any) -> None:
    with httpx.Client(base_url=cluster.http_url, timeout=30) as http:
        for key in KEYS:
            r = http.post(f"/v1/actors/{key}/sql", json={"sql": "CREATE TABLE t(v)"})
            assert r.status_code == 200, r.text
            r = http.put(f"/v1/actors/{key}/kv/name", json=key)
            assert r.status_code == 200, r.text
        for key in KEYS:  # each read may land on either process: all must agree
            assert http.get(f"/v1/actors/{key}/kv/name").json() == key
            exported = http.get(f"/v1/actors/{key}/export")
            assert exported.status_code == 200 and exported.content.startswith(b"SQLite format 3")
        nodes = {http.get("/readyz").json()["node"] for _ in range(40)}
    assert nodes <= {n["id"] for n in ops_status(cluster.data)["nodes"]}


def test_routing_client_talks_to_owners_directly(cluster: Any) -> None:
    fill(cluster.rpc_url, KEYS)
    with shardlite.connect(cluster.rpc_url) as client:
        for key in KEYS:
            assert client.actor(key).sql("SELECT v FROM t").rows == [(key,)]
        peers = set(client._transport._peers)  # type: ignore[union-attr]
    assert peers == {n["rpc"] for n in ops_status(cluster.data)["nodes"]}


async def test_async_routing_client_under_trio(cluster: Any) -> None:
    async with shardlite.connect_async(cluster.rpc_url) as client:
        for key in KEYS[:10]:
            await client.actor(key).sql("CREATE TABLE IF NOT EXISTS t(v)")
            await client.actor(key).kv.put("k", key)
        for key in KEYS[:10]:
            assert await client.actor(key).kv.get("k") == key


def test_a_stale_epoch_gets_wrong_shard_with_the_location(cluster: Any) -> None:
    status = ops_status(cluster.data)
    with shardlite.connect(cluster.rpc_url) as client:
        placement = client._transport._seed.request("", wire.GetPlacement())  # type: ignore[union-attr]
    from shardlite.router import Placement

    p = Placement.from_map(placement)
    key = KEYS[0]
    shard = p.shard_for(key)
    owner = p.nodes[shard.owner]
    other = next(n for n in status["nodes"] if n["id"] != owner.id)
    op = ["sql", "SELECT 1", None]
    # the owner at an older epoch, and a process that does not own the key at all
    for address, epoch in ((owner.rpc, shard.epoch - 1), (other["rpc"], shard.epoch)):
        req_id, code, body = rpc_call(address, [7, key, op, None, epoch])
        assert (req_id, code) == (7, wire.STATUS_ERROR)
        assert body["code"] == "wrong_shard" and body["retryable"] is True
        assert body["shard"] == shard.id and body["epoch"] == shard.epoch
        assert body["location"] == owner.rpc
    assert rpc_call(owner.rpc, [8, key, op, None, shard.epoch])[1] == wire.STATUS_OK


def test_the_client_recovers_from_a_stale_placement(cluster: Any) -> None:
    fill(cluster.rpc_url, KEYS[:8])
    with shardlite.connect(cluster.rpc_url) as client:
        client.actor(KEYS[0]).sql("SELECT 1")  # learn the placement
        routes = client._transport._routes  # type: ignore[union-attr]
        good = routes.placement
        assert good is not None
        # make every shard look owned by the other process, at an older epoch
        ids = sorted(good.nodes)
        swap = {ids[0]: ids[1], ids[1]: ids[0]}
        from shardlite.router import Placement, ShardRecord

        routes.placement = Placement(
            good.revision,
            good.cluster,
            {
                s.id: ShardRecord(s.id, s.ranges, swap[s.owner], s.epoch - 1)
                for s in good.shards.values()
            },
            good.nodes,
        )
        for key in KEYS[:8]:
            assert client.actor(key).sql("SELECT v FROM t").rows == [(key,)]
        assert routes.placement is not None and routes.placement.revision >= good.revision


def test_placement_is_stable_across_restarts(start_server: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server("--procs", "2", data=data)
    fill(server.rpc_url, KEYS)
    before = ops_status(data)
    assert server.terminate() == 0
    server = start_server("--procs", "2", data=data)
    after = ops_status(data)
    assert after["cluster"] == before["cluster"]
    assert [(s["id"], s["slots"], s["owner"], s["epoch"]) for s in after["shards"]] == [
        (s["id"], s["slots"], s["owner"], s["epoch"]) for s in before["shards"]
    ]
    for key in KEYS:
        assert rows_of(server.rpc_url, key) == [(key,)]


def test_fewer_processes_take_over_every_shard_at_a_new_epoch(
    start_server: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server("--procs", "2", data=data)
    fill(server.rpc_url, KEYS)
    before = {s["id"]: s for s in ops_status(data)["shards"]}
    assert server.terminate() == 0
    server = start_server("--procs", "1", data=data)
    after = ops_status(data)
    (node,) = after["nodes"]
    for shard in after["shards"]:
        assert shard["owner"] == node["id"]
        moved = before[shard["id"]]["owner"] != node["id"]
        assert shard["epoch"] == before[shard["id"]]["epoch"] + (1 if moved else 0)
    for key in KEYS:
        assert rows_of(server.rpc_url, key) == [(key,)]


def test_the_supervisor_restarts_a_killed_shard_process(cluster: Any) -> None:
    fill(cluster.rpc_url, KEYS)
    victim = ops_status(cluster.data)["nodes"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the shard process was not restarted"
        nodes = {n["id"]: n for n in ops_status(cluster.data)["nodes"]}
        node = nodes.get(victim["id"])
        if node is not None and node["pid"] != victim["pid"] and node["status"] == "ok":
            break
        time.sleep(0.2)
    for key in KEYS:  # acknowledged before the kill: still there, served again
        assert rows_of(cluster.rpc_url, key) == [(key,)]
    assert "starting it again" in cluster.log


def test_sigterm_stops_every_shard_process(cluster: Any) -> None:
    pids = [n["pid"] for n in ops_status(cluster.data)["nodes"]]
    assert cluster.terminate() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_an_unknown_directory_url_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardlite", "serve", "--data", str(tmp_path / "d"),
         "--directory", "zookeeper://127.0.0.1:2181", "--procs", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "zookeeper://127.0.0.1:2181" in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_etcd_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"etcd://127.0.0.1:{port}"
    out = subprocess.run(
        [sys.executable, "-m", "shardlite", "serve", "--data", str(tmp_path / "d"),
         "--directory", url, "--procs", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert url in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ etcd as the directory


def test_serving_with_etcd_as_the_directory(start_server: Any, etcd: Any) -> None:
    server = start_server("--procs", "2", "--directory", etcd.url)
    fill(server.rpc_url, KEYS)
    for key in KEYS:
        assert rows_of(server.rpc_url, key, routing=False) == [(key,)]
    out = subprocess.run(
        [sys.executable, "-m", "shardlite", "ops", "status", "--directory", etcd.url, "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["directory"].startswith("etcd://")
    assert sum(s["actor_files"] for s in status["shards"]) == len(KEYS)


def test_losing_etcd_stops_serving_after_the_lease_and_its_return_resumes(
    start_server: Any, etcd: Any
) -> None:
    server = start_server("--procs", "1", "--directory", etcd.url, "--lease-ttl", "5s")
    fill(server.rpc_url, KEYS[:4])
    etcd.stop()
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        # while the lease holds, the owned shards keep serving
        r = http.post(f"/v1/actors/{KEYS[0]}/sql", json={"sql": "SELECT v FROM t"})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while (ready := http.get("/readyz")).json()["checks"]["lease"]:
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.2)
        assert ready.status_code == 503
        assert "directory" in ready.json()["reason"]
        r = http.post(f"/v1/actors/{KEYS[0]}/sql", json={"sql": "SELECT v FROM t"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert "lease" in r.json()["error"]["message"]
        etcd.start()
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "did not serve again once etcd was back"
            time.sleep(0.2)
    for key in KEYS[:4]:
        assert rows_of(server.rpc_url, key) == [(key,)]


def test_each_process_has_an_http_port_of_its_own_for_metrics(cluster: Any) -> None:
    fill(cluster.rpc_url, KEYS[:8])
    nodes = ops_status(cluster.data)["nodes"]
    assert len({n["http"] for n in nodes}) == len(nodes) == 2
    for node in nodes:
        with httpx.Client(base_url=node["http"], timeout=30) as http:
            assert http.get("/readyz").json()["node"] == node["id"]
            metrics = http.get("/metrics")
            assert metrics.status_code == 200
            assert "shardlite_rpc_requests_total" in metrics.text
