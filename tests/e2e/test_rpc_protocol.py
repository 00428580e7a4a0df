"""The RPC protocol over raw sockets, as docs/rpc.md describes it: framing, pipelining,
ids, and what happens to malformed, oversize, truncated and abandoned frames."""

from __future__ import annotations

import itertools
import random
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.e2e.conftest import (
    IO_TIMEOUT_S,
    RpcSocket,
    assert_rpc_error,
    assert_rpc_ok,
    files_under,
)

MAX_FRAME = 256 * 1024
SERVER_ARGS = ("--max-request-bytes", "256KiB", "--durability", "os")
DEEP = 100_000
enc = msgspec.msgpack.encode
_keys = itertools.count()


@pytest.fixture
def key(rpc: RpcSocket) -> str:
    """A fresh actor key with a table ``t(v)``."""
    k = f"rpc-{next(_keys)}"
    assert_rpc_ok(rpc.request(1, k, ["sql", "CREATE TABLE t(v)", None]), 1)
    return k


def count_rows(conn: RpcSocket, key: str) -> int:
    reply = conn.request(999_999, key, ["sql", "SELECT count(*) FROM t", None])
    n: int = assert_rpc_ok(reply, 999_999)[1][0][0]
    return n


def wait_for_rows(conn: RpcSocket, key: str, expected: int) -> int:
    """Poll until ``t`` holds ``expected`` rows or IO_TIMEOUT_S passes; the last count."""
    deadline = time.monotonic() + IO_TIMEOUT_S
    n = count_rows(conn, key)
    while n != expected and time.monotonic() < deadline:
        n = count_rows(conn, key)
    return n


# ------------------------------------------------------------------ framing


def test_the_documented_example_frame_gets_the_documented_reply(rpc: RpcSocket) -> None:
    example = bytes.fromhex(
        "00 00 00 1b 93 07 a8 74 65 6e 61 6e 74 2d 31 93 a3 73 71 6c a8 53 45 4c 45 43 54 20 3f"
        " 91 2a"
    )
    assert example[4:] == enc([7, "tenant-1", ["sql", "SELECT ?", [42]]])
    rpc.sock.sendall(example)
    header = rpc.sock.recv(4, socket.MSG_WAITALL)
    size = int.from_bytes(header, "big")
    payload = rpc.sock.recv(size, socket.MSG_WAITALL)
    assert len(payload) == size
    assert msgspec.msgpack.decode(payload) == [7, 0, [["?"], [[42]], 0, 0]]


def test_every_operation_works_over_raw_frames(rpc: RpcSocket, key: str) -> None:
    rpc.send([2, key, ["sql", "INSERT INTO t VALUES (?)", [b"\x00bin"]]])
    assert assert_rpc_ok(rpc.receive(1)[0], 2) == [[], [], 1, 1]
    batch = ["batch", [["INSERT INTO t VALUES (:v)", {"v": 2}], ["SELECT count(*) FROM t", None]]]
    assert assert_rpc_ok(rpc.request(3, key, batch), 3) == [
        [[[], [], 1, 2], [["count(*)"], [[2]], 0, 2]]
    ]
    assert assert_rpc_ok(rpc.request(4, key, ["kv_put", "n", {"a": [1, b"\x01"]}]), 4) == [True]
    assert assert_rpc_ok(rpc.request(5, key, ["kv_get", "n"]), 5) == [{"a": [1, b"\x01"]}]
    assert assert_rpc_ok(rpc.request(6, key, ["kv_list", "", 10, None]), 6) == [
        [["n", {"a": [1, b"\x01"]}]]
    ]
    assert assert_rpc_ok(rpc.request(7, key, ["kv_delete", "n"]), 7) == [True]
    assert_rpc_error(rpc.request(8, key, ["kv_get", "n"]), 8, "not_found")
    exported = assert_rpc_ok(rpc.request(9, key, ["export"]), 9)
    assert exported[0].startswith(b"SQLite format 3\x00")
    assert assert_rpc_ok(rpc.request(10, key, ["ping"]), 10) == ["shardlite"]
    assert assert_rpc_ok(rpc.request(11, key, ["delete"]), 11) == [True]
    assert assert_rpc_ok(rpc.request(12, key, ["delete"]), 12) == [False]


def test_omitted_trailing_fields_take_their_documented_defaults(rpc: RpcSocket, key: str) -> None:
    assert assert_rpc_ok(rpc.request(2, key, ["sql", "SELECT 1"]), 2)[1] == [[1]]
    rpc.request(3, key, ["kv_put", "x", 1])
    assert assert_rpc_ok(rpc.request(4, key, ["kv_list"]), 4) == [[["x", 1]]]


def test_a_frame_split_into_single_bytes_is_reassembled(rpc: RpcSocket, key: str) -> None:
    data = b"".join(
        RpcSocket.frame(enc([i, key, ["sql", "INSERT INTO t VALUES (?)", [i]]])) for i in (21, 22)
    )
    for i in range(len(data)):
        rpc.sock.sendall(data[i : i + 1])
    replies = rpc.receive_by_id(2)
    assert assert_rpc_ok(replies[21], 21)[2] == 1
    assert assert_rpc_ok(replies[22], 22)[2] == 1
    assert count_rows(rpc, key) == 2


def test_ping_ignores_the_key_and_touches_no_actor(rpc: RpcSocket, server_root: Path) -> None:
    before = files_under(server_root)
    for i, key in enumerate(["", "../x", "never-created"]):
        assert assert_rpc_ok(rpc.request(30 + i, key, ["ping"]), 30 + i) == ["shardlite"]
    assert files_under(server_root) == before


# ------------------------------------------------------------------ pipelining


def test_many_frames_in_one_send_are_all_answered_and_matched_by_id(
    rpc: RpcSocket, rpc_connect: Any
) -> None:
    keys = [f"pipe-{next(_keys)}" for _ in range(8)]
    for k in keys:
        assert_rpc_ok(rpc.request(1, k, ["sql", "CREATE TABLE t(v)", None]), 1)
    rng = random.Random(7)
    ids = list(dict.fromkeys(rng.randrange(1, 2**64) for _ in range(600)))
    requests = []
    expected = {}
    for n, req_id in enumerate(ids):
        k = keys[n % len(keys)]
        if n % 3 == 0:
            requests.append([req_id, k, ["sql", "INSERT INTO t VALUES (?)", [n]]])
            expected[req_id] = ("write", None)
        else:
            tag = req_id % 2**62  # SQLite integers are signed 64-bit
            requests.append([req_id, k, ["sql", "SELECT ?, ?", [tag, k]]])
            expected[req_id] = ("read", [[tag, k]])
    rpc.send(*requests)
    replies = rpc.receive_by_id(len(ids))
    assert set(replies) == set(ids)
    for req_id, (kind, rows) in expected.items():
        body = assert_rpc_ok(replies[req_id], req_id)
        if kind == "read":
            assert body[1] == rows
        else:
            assert body[2] == 1
    other = rpc_connect()
    assert sum(count_rows(other, k) for k in keys) == len(ids[::3])


def test_replies_follow_completion_not_request_order(rpc: RpcSocket, key: str) -> None:
    # ids are the client's choice and need not increase; each reply names its request
    rpc.send(
        [900, key, ["sql", "INSERT INTO t VALUES (1)", None]],
        [5, f"{key}-other", ["sql", "SELECT 5", None]],
        [2**64 - 1, key, ["sql", "SELECT count(*) FROM t", None]],
    )
    replies = rpc.receive_by_id(3)
    assert assert_rpc_ok(replies[900], 900)[2] == 1
    assert assert_rpc_ok(replies[5], 5)[1] == [[5]]
    # calls for one key run in order: the count sees the insert sent before it
    assert assert_rpc_ok(replies[2**64 - 1], 2**64 - 1)[1] == [[1]]


def test_a_failing_request_in_a_pipeline_does_not_affect_the_others(
    rpc: RpcSocket, key: str
) -> None:
    rpc.request(2, key, ["sql", "CREATE UNIQUE INDEX u ON t(v)", None])
    rpc.send(
        *[
            [100 + i, key, ["sql", "INSERT INTO t VALUES (?)", [1 if i == 5 else 100 + i]]]
            for i in range(10)
        ],
        [110, key, ["sql", "INSERT INTO t VALUES (1)", None]],  # duplicate of i=5's value
    )
    replies = rpc.receive_by_id(11)
    for i in range(10):
        assert_rpc_ok(replies[100 + i], 100 + i)
    assert_rpc_error(replies[110], 110, "constraint", mentions="UNIQUE")
    assert count_rows(rpc, key) == 10


# ------------------------------------------------------------------ malformed frames


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        b"",
        enc([41, "k", ["ping"]])[:-2],
        enc([42, "k", ["ping"]]) + b"\x00",
        b"\x93\x2b\xa2\xff\xfe\x91\xa4ping",  # the key is not UTF-8
    ],
    ids=["bad-opcode", "empty", "truncated", "trailing-bytes", "invalid-utf8"],
)
def test_undecodable_frame_gets_an_error_and_the_connection_keeps_working(
    rpc: RpcSocket, payload: bytes
) -> None:
    rpc.send_payloads(payload)
    (reply,) = rpc.receive(1)
    assert reply[1] == 1 and reply[0] in (0, 41, 42, 43), reply
    assert_rpc_error(reply, reply[0], "bad_request", mentions="malformed")
    assert assert_rpc_ok(rpc.request(44, "k", ["ping"]), 44) == ["shardlite"]


def test_a_malformed_frame_whose_id_is_readable_gets_that_id(rpc: RpcSocket) -> None:
    rpc.send([51, "k", ["sql", 5, None]], [52, "k", "not-an-op"], [53, 7, ["ping"]])
    replies = rpc.receive_by_id(3)
    assert_rpc_error(replies[51], 51, "bad_request", mentions="$[2][1]")
    assert_rpc_error(replies[52], 52, "bad_request")
    assert_rpc_error(replies[53], 53, "bad_request", mentions="$[1]")
    assert assert_rpc_ok(rpc.request(54, "k", ["ping"]), 54) == ["shardlite"]


@pytest.mark.parametrize(
    "request_",
    [
        {"id": 1, "key": "k", "op": ["ping"]},
        "ping",
        [61],
        [61, "k"],
        ["61", "k", ["ping"]],
        [None, "k", ["ping"]],
        [1.5, "k", ["ping"]],
    ],
    ids=["map", "string", "id-only", "no-op", "string-id", "nil-id", "float-id"],
)
def test_a_request_of_the_wrong_shape_gets_an_error_with_id_0(
    rpc: RpcSocket, request_: Any
) -> None:
    rpc.send(request_)
    (reply,) = rpc.receive(1)
    assert_rpc_error(reply, reply[0], "bad_request")
    assert reply[0] in (0, 61)
    assert assert_rpc_ok(rpc.request(62, "k", ["ping"]), 62) == ["shardlite"]


@pytest.mark.parametrize("req_id", [0, -1, -(2**63)])
def test_request_ids_outside_1_to_2_64_are_refused(rpc: RpcSocket, req_id: int) -> None:
    rpc.send([req_id, "k", ["ping"]])
    (reply,) = rpc.receive(1)
    assert_rpc_error(reply, 0, "bad_request")
    assert assert_rpc_ok(rpc.request(63, "k", ["ping"]), 63) == ["shardlite"]


@pytest.mark.parametrize(
    ("op", "mentions"),
    [
        (["frobnicate"], "frobnicate"),
        (["SQL", "SELECT 1"], "SQL"),
        ([], ""),
        ([7, "SELECT 1"], ""),
    ],
    ids=["unknown", "wrong-case", "empty", "int-tag"],
)
def test_unknown_op_tag_is_bad_request_with_its_id(
    rpc: RpcSocket, op: list[Any], mentions: str
) -> None:
    reply = rpc.request(71, "k", op)
    assert_rpc_error(reply, 71, "bad_request", mentions=mentions)
    assert assert_rpc_ok(rpc.request(72, "k", ["ping"]), 72) == ["shardlite"]


@pytest.mark.parametrize(
    "op",
    [
        ["sql", 5, None],
        ["sql", "SELECT ?", "not-params"],
        ["sql", "SELECT ?", 5],
        ["batch", "SELECT 1"],
        ["batch", [[5, None]]],
        ["kv_get", 5],
        ["kv_put", None, 1],
        ["kv_list", 5, 10, None],
        ["kv_list", "", "ten", None],
        ["kv_list", "", 10, 5],
    ],
)
def test_wrong_field_types_are_bad_request_with_the_id(
    rpc: RpcSocket, key: str, op: list[Any]
) -> None:
    reply = rpc.request(81, key, op)
    assert_rpc_error(reply, 81, "bad_request")
    assert count_rows(rpc, key) == 0


def test_ext_types_are_refused_wherever_they_appear(rpc: RpcSocket, key: str) -> None:
    ext = msgspec.msgpack.Ext(4, b"\x01\x02")
    rpc.send(
        [91, key, ["sql", "INSERT INTO t VALUES (?)", [ext]]],
        [92, key, ["kv_put", "x", {"nested": [ext]}]],
        [93, key, ["sql", "INSERT INTO t VALUES (:v)", {"v": ext}]],
    )
    replies = rpc.receive_by_id(3)
    for req_id in (91, 92, 93):
        assert_rpc_error(replies[req_id], req_id, "bad_request", mentions="extension")
    rpc.send(ext)
    assert_rpc_error(rpc.receive(1)[0], 0, "bad_request")
    assert count_rows(rpc, key) == 0
    assert_rpc_error(rpc.request(94, key, ["kv_get", "x"]), 94, "not_found")


@pytest.mark.parametrize("where", ["params", "kv-value", "whole-frame"])
def test_deep_nesting_is_bad_request_not_a_crash(rpc: RpcSocket, key: str, where: str) -> None:
    deep = b"\x91" * DEEP + b"\x90"
    if where == "params":
        payload = enc([95, key, ["sql", "INSERT INTO t VALUES (?)", [0]]])[:-1] + deep
    elif where == "kv-value":
        payload = enc([95, key, ["kv_put", "x", 0]])[:-1] + deep
    else:
        payload = deep
    assert len(payload) < MAX_FRAME
    rpc.send_payloads(payload)
    (reply,) = rpc.receive(1)
    assert_rpc_error(reply, reply[0], "bad_request")
    assert reply[0] in (0, 95)
    assert count_rows(rpc, key) == 0
    assert_rpc_error(rpc.request(96, key, ["kv_get", "x"]), 96, "not_found")


def test_mixed_good_and_bad_frames_in_one_send_are_each_answered(rpc: RpcSocket, key: str) -> None:
    rpc.send_payloads(
        enc([101, key, ["sql", "INSERT INTO t VALUES (1)", None]]),
        b"\xc1",
        enc([102, key, ["nope"]]),
        enc([103, key, ["sql", "INSERT INTO t VALUES (2)", None]]),
    )
    replies = rpc.receive(4)
    by_id: dict[int, list[Any]] = {}
    for r in replies:
        by_id.setdefault(r[0], r)
    assert_rpc_ok(by_id[101], 101)
    assert_rpc_error(by_id[0], 0, "bad_request")
    assert_rpc_error(by_id[102], 102, "bad_request")
    assert_rpc_ok(by_id[103], 103)
    assert count_rows(rpc, key) == 2


# ------------------------------------------------------------------ size limit


def test_frame_over_the_size_limit_gets_error_id_0_and_the_connection_is_closed(
    rpc: RpcSocket, rpc_connect: Any, key: str
) -> None:
    rpc.sock.sendall((MAX_FRAME + 1).to_bytes(4, "big") + b"\x00" * 1000)
    (reply,) = rpc.receive(1)
    assert_rpc_error(reply, 0, "too_large", mentions=str(MAX_FRAME))
    assert rpc.closed_by_server()
    other = rpc_connect()
    assert count_rows(other, key) == 0


def test_a_frame_of_exactly_the_limit_is_accepted(rpc: RpcSocket, key: str) -> None:
    def payload_with(n: int) -> bytes:
        return enc([111, key, ["sql", "INSERT INTO t VALUES (length(?))", ["x" * n]]])

    n = MAX_FRAME - 100
    payload = payload_with(n + MAX_FRAME - len(payload_with(n)))
    assert len(payload) == MAX_FRAME
    rpc.send_payloads(payload)
    assert_rpc_ok(rpc.receive(1)[0], 111)
    assert count_rows(rpc, key) == 1


def test_requests_before_an_oversize_frame_in_the_same_send_still_run(
    rpc: RpcSocket, rpc_connect: Any, key: str
) -> None:
    good = RpcSocket.frame(enc([121, key, ["sql", "INSERT INTO t VALUES (1)", None]]))
    rpc.sock.sendall(good + (MAX_FRAME + 1).to_bytes(4, "big"))
    replies = rpc.receive_until_closed()
    assert any(r[0] == 0 and r[2]["code"] == "too_large" for r in replies), replies
    other = rpc_connect()
    assert wait_for_rows(other, key, 1) == 1


# ------------------------------------------------------------------ disconnects


def test_a_half_frame_then_disconnect_leaves_the_server_serving(rpc_connect: Any, key: str) -> None:
    conn = rpc_connect()
    payload = enc([131, key, ["sql", "INSERT INTO t VALUES (1)", None]])
    conn.sock.sendall(RpcSocket.frame(payload)[: 4 + len(payload) // 2])
    conn.close()
    header_only = rpc_connect()
    header_only.sock.sendall(b"\x00\x00")
    header_only.close()
    other = rpc_connect()
    assert assert_rpc_ok(other.request(132, key, ["ping"]), 132) == ["shardlite"]
    assert count_rows(other, key) == 0


def test_requests_in_flight_when_the_client_disconnects_still_run(
    rpc_connect: Any, key: str
) -> None:
    bystander = rpc_connect()
    assert assert_rpc_ok(bystander.request(140, key, ["ping"]), 140) == ["shardlite"]
    leaver = rpc_connect()
    n = 300
    leaver.send(*[[150 + i, key, ["sql", "INSERT INTO t VALUES (?)", [i]]] for i in range(n)])
    leaver.sock.shutdown(socket.SHUT_WR)  # gone, without reading a single reply
    assert wait_for_rows(bystander, key, n) == n
    assert assert_rpc_ok(bystander.request(141, key, ["ping"]), 141) == ["shardlite"]


def test_a_client_that_resets_its_connection_mid_pipeline_does_not_hurt_others(
    rpc_connect: Any, key: str
) -> None:
    bystander = rpc_connect()
    bystander.send([142, key, ["sql", "INSERT INTO t VALUES (-1)", None]])
    leaver = rpc_connect()
    n = 300
    leaver.send(*[[150 + i, key, ["sql", "INSERT INTO t VALUES (?)", [i]]] for i in range(n)])
    # an abortive close: RST, whatever the server has not read yet is lost
    leaver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    leaver.close()
    assert_rpc_ok(bystander.receive(1)[0], 142)
    rows = assert_rpc_ok(
        bystander.request(143, key, ["sql", "SELECT count(*), count(DISTINCT v) FROM t", None]), 143
    )[1]
    ((total, distinct),) = rows
    assert total == distinct and 1 <= total <= n + 1
    assert assert_rpc_ok(bystander.request(144, key, ["ping"]), 144) == ["shardlite"]


def test_a_client_that_never_reads_its_replies_does_not_stall_others(
    rpc_connect: Any, key: str
) -> None:
    hog = rpc_connect()
    hog.send(*[[i + 1, key, ["sql", "SELECT randomblob(1000)", None]] for i in range(3000)])
    other = rpc_connect()
    assert assert_rpc_ok(other.request(161, key, ["ping"]), 161) == ["shardlite"]
    # the hog may fill the key's mailbox for a moment (its calls then get `overloaded`,
    # and so may this one: retryable); the key is served again once they have run
    deadline = time.monotonic() + IO_TIMEOUT_S
    while True:
        reply = other.request(162, key, ["sql", "SELECT count(*) FROM t", None])
        if not (reply[1] == 1 and reply[2]["code"] == "overloaded"):
            break
        assert time.monotonic() < deadline, "the key stayed overloaded"
        time.sleep(0.05)
    assert assert_rpc_ok(reply, 162)[1][0][0] == 0
    hog.close()


def test_many_connections_at_once_are_each_served(rpc_connect: Any, key: str) -> None:
    conns = [rpc_connect() for _ in range(50)]
    for i, conn in enumerate(conns):
        conn.send([171 + i, key, ["sql", "INSERT INTO t VALUES (?)", [i]]])
    for i, conn in enumerate(conns):
        assert_rpc_ok(conn.receive(1)[0], 171 + i)
    assert count_rows(conns[0], key) == 50


def test_delete_and_export_run_in_frame_order_with_the_calls_around_them(rpc: Any) -> None:
    """[insert, export, delete, create, insert] in one send: each sees exactly what came
    before it, and the write after the delete lands in the new actor."""
    import apsw

    key = "pipeline-order"
    rpc.request(1, key, ["sql", "CREATE TABLE t(v)"])
    rpc.send(
        [2, key, ["sql", "INSERT INTO t VALUES ('before')"]],
        [3, key, ["export"]],
        [4, key, ["delete"]],
        [5, key, ["sql", "CREATE TABLE IF NOT EXISTS t(v)"]],
        [6, key, ["sql", "INSERT INTO t VALUES ('after')"]],
    )
    replies = rpc.receive_by_id(5)
    assert all(r[1] == 0 for r in replies.values()), replies
    exported = replies[3][2][0]
    with tempfile.NamedTemporaryFile(suffix=".db") as f:
        f.write(exported)
        f.flush()
        with apsw.Connection(f.name) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [("before",)]
    assert replies[4][2] == [True]
    reply = rpc.request(7, key, ["sql", "SELECT v FROM t"])
    assert reply[2][1] == [["after"]]
