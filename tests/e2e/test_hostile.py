"""Hostile input at a real server: fuzzed HTTP bodies and RPC frames never get a 5xx or a
crash, and a tenant running away cannot stop another tenant's requests."""

from __future__ import annotations

import socket
import struct
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardlite

PATHS = [
    ("POST", "/v1/actors/fuzz/sql"),
    ("POST", "/v1/actors/fuzz/batch"),
    ("PUT", "/v1/actors/fuzz/kv/x"),
    ("POST", "/v1/actors/fuzz/call/m"),
]
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", "--procs", "1").start()
    with shardlite.connect(server.rpc_url) as client:
        client.actor("fuzz").sql("CREATE TABLE IF NOT EXISTS t (a)")
    yield server
    server.terminate()


def _fine(server: Any) -> None:
    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("fuzz").sql("SELECT count(*) FROM t").rows[0][0] >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(PATHS),
    body=st.binary(max_size=300) | JSONISH.map(lambda v: msgspec.json.encode(v, enc_hook=repr)),
    msgpack=st.booleans(),
)
def test_fuzzed_http_bodies_never_5xx(
    fuzz_server: Any, path: tuple[str, str], body: bytes, msgpack: bool
) -> None:
    method, url = path
    headers = {"Content-Type": "application/msgpack" if msgpack else "application/json"}
    r = httpx.request(method, fuzz_server.http_url + url, content=body, headers=headers, timeout=10)
    assert r.status_code < 500, (body, r.content)
    if r.status_code >= 400:
        decode = msgspec.msgpack.decode if msgpack else msgspec.json.decode
        assert set(decode(r.content)["error"]) >= {"code", "message", "retryable"}


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    payload=st.binary(max_size=200)
    | st.lists(JSONISH, max_size=6).map(msgspec.msgpack.encode)
    | st.tuples(st.integers(1, 2**63), st.text(max_size=10), JSONISH).map(msgspec.msgpack.encode)
)
def test_fuzzed_rpc_frames_get_errors_not_crashes(fuzz_server: Any, payload: bytes) -> None:
    port = int(fuzz_server.rpc_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            _frame(payload) + _frame(msgspec.msgpack.encode([7, "fuzz", ["sql", "SELECT 1", None]]))
        )
        data = b""
        replies = []
        while len(replies) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server may close a connection whose framing it cannot trust
            data += chunk
            while len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
                n = int.from_bytes(data[:4], "big")
                replies.append(msgspec.msgpack.decode(data[4 : 4 + n]))
                data = data[4 + n :]
        for reply in replies:
            _rid, status, body = reply
            if status == 1:
                assert body["code"] != "internal", body
    _fine(fuzz_server)


async def test_noisy_neighbour_does_not_stop_a_victim(start_server: Any) -> None:
    server = start_server("--procs", "1", "--statement-timeout", "200ms")
    victim_ok = 0
    stop = trio.Event()
    raging = trio.Event()  # set once a runaway query has burnt its budget

    async def noisy(client: Any) -> None:
        while not stop.is_set():
            try:  # runaway queries: each burns its whole time budget
                await client.actor("noisy").sql(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
                )
            except shardlite.Timeout:
                raging.set()
            except shardlite.Overloaded:
                await trio.sleep(0.01)

    async def flood(client: Any) -> None:
        while not stop.is_set():
            try:
                await client.actor("noisy").sql("SELECT 1")
            except shardlite.Overloaded:
                await trio.sleep(0.01)

    async with shardlite.connect_async(server.rpc_url) as client:
        await client.actor("victim").sql("CREATE TABLE t (a INTEGER)")
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(noisy, client)
            for _ in range(8):
                nursery.start_soon(flood, client)
            with trio.fail_after(30):
                await raging.wait()
            for i in range(40):  # every victim request succeeds, with the neighbour raging
                await client.actor("victim").sql("INSERT INTO t VALUES (?)", [i])
                victim_ok += 1
            stop.set()
        rows = await client.actor("victim").sql("SELECT count(*) FROM t")
    assert victim_ok == 40 and rows.rows == [(40,)]


def test_a_huge_sort_is_stopped_at_the_temp_bound_and_nothing_else_changes(
    start_server: Any,
) -> None:
    # a statement budget far past the long read's ~0.3 s (a slow box took over the 0.5 s default)
    server = start_server(
        "--procs",
        "1",
        *("--max-temp-bytes", "8MiB", "--inline-slice", "5ms", "--statement-timeout", "30s"),
    )
    sort = (
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 50000) "
        "SELECT count(*) FROM (SELECT randomblob(1000) AS b FROM r ORDER BY b)"
    )
    with shardlite.connect(server.rpc_url) as client:
        client.actor("other").sql("CREATE TABLE t (a)")
        client.actor("other").sql("INSERT INTO t VALUES (1)")
    r = httpx.post(f"{server.http_url}/v1/actors/greedy/sql", json={"sql": sort}, timeout=30)
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "quota_exceeded" and "temporary storage" in error["message"]
    small = sort.replace("50000", "1000")
    r = httpx.post(f"{server.http_url}/v1/actors/greedy/sql", json={"sql": small}, timeout=30)
    assert r.status_code == 200 and r.json()["rows"] == [[1000]]
    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("other").sql("SELECT a FROM t").rows == [(1,)]
        long_read = (  # about 0.3 s: past the 5 ms slice, into the slow lane
            "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r LIMIT 1500000) "
            "SELECT count(*) FROM r"
        )
        assert client.actor("greedy").sql(long_read).rows == [(1500000,)]
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    slow = [line for line in metrics.splitlines() if line.startswith("shardlite_actor_slow_calls")]
    assert slow and float(slow[0].split()[-1]) >= 1, slow
