"""Bad input, end to end: each gets the CONTRACT error shape and status, the server keeps
serving (the next request, on the same keep-alive connection, succeeds), and no other data
changes (the victim actor's rows and KV entries, and the file tree around the data
directory, are exactly as before)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest

from tests.e2e.conftest import (
    RpcSocket,
    assert_error,
    assert_rpc_error,
    assert_rpc_ok,
    blob,
    files_under,
    raw_http,
)

MAX_REQUEST_BYTES = 512 * 1024
MAX_DB_BYTES = 256 * 1024
SERVER_ARGS = (
    "--max-request-bytes",
    "512KiB",
    "--statement-timeout",
    "200ms",
    "--max-db-bytes",
    "256KiB",
    "--max-result-bytes",
    "64KiB",
)
MSGPACK = {"Content-Type": "application/msgpack"}
VICTIM = "victim"
SQL_PATH = f"/v1/actors/{VICTIM}/sql"
DEEP = 100_000
UNREAD_BODY = b"x" * (4 * MAX_REQUEST_BYTES)
"""A body no handler reads (404, 405, GET): large enough that the server is still receiving
it when it answers, which is when a reused keep-alive connection used to hang."""
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"


class Victim:
    """An actor with data that no bad request may change."""

    def __init__(self, http: httpx.Client, root: Path) -> None:
        self.http = http
        self.root = root

    def setup(self) -> None:
        for statement in (
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE NOT NULL "
            "CHECK (length(v) < 20)) STRICT",
            "INSERT INTO t(v) VALUES ('one'), ('two'), ('three')",
            "CREATE TABLE other(x)",
            "INSERT INTO other VALUES (1)",
        ):
            r = self.http.post(SQL_PATH, json={"sql": statement})
            assert r.status_code == 200, r.text
        for name, value in (("config", {"a": 1}), ("blob", blob(b"\x00\x01"))):
            assert self.http.put(f"/v1/actors/{VICTIM}/kv/{name}", json=value).status_code == 200

    def snapshot(self) -> tuple[Any, ...]:
        """The victim's data and every path near the data directory (also proves liveness)."""
        rows = self.http.post(SQL_PATH, json={"sql": "SELECT * FROM t ORDER BY id"})
        assert rows.status_code == 200, rows.text
        other = self.http.post(SQL_PATH, json={"sql": "SELECT * FROM other"})
        assert other.status_code == 200, other.text
        schema = self.http.post(
            SQL_PATH, json={"sql": "SELECT type, name, sql FROM sqlite_schema ORDER BY name"}
        )
        assert schema.status_code == 200, schema.text
        kv = self.http.get(f"/v1/actors/{VICTIM}/kv")
        assert kv.status_code == 200, kv.text
        return (
            rows.json()["rows"],
            other.json()["rows"],
            schema.json()["rows"],
            kv.json()["items"],
            files_under(self.root),
        )


@pytest.fixture(scope="module")
def victim(http: httpx.Client, server_root: Path) -> Victim:
    v = Victim(http, server_root)
    v.setup()
    return v


@pytest.fixture
def unchanged(victim: Victim) -> Iterator[Any]:
    """Call ``unchanged()`` after the bad request: the server serves, nothing changed
    (``unchanged(files=False)`` when the test itself creates another actor's file)."""
    before = victim.snapshot()
    assert len(before[0]) == 3 and before[3]

    def check(files: bool = True) -> None:
        after = victim.snapshot()
        if files:
            assert after == before
        else:
            assert after[:-1] == before[:-1]

    yield check


def post_json(http: httpx.Client, body: bytes, path: str = SQL_PATH) -> httpx.Response:
    return http.post(path, content=body, headers={"Content-Type": "application/json"})


def post_msgpack(http: httpx.Client, body: bytes, path: str = SQL_PATH) -> httpx.Response:
    return http.post(path, content=body, headers=MSGPACK)


# ------------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b'{"sql": "DELETE FROM t"', "truncated"),
        (b"\xff\xfe{}", "malformed"),
        (b'{"sql": "DELETE FROM t"} trailing', "trailing"),
        (b'{"sql": "DELETE FROM t", "params": [NaN]}', "malformed"),
        (b"{'sql': 'DELETE FROM t'}", "malformed"),
        (b"", "empty"),
        (b"null", "expected `object`"),
        (b'["DELETE FROM t"]', "expected `object`"),
    ],
    ids=["truncated", "not-utf8", "trailing", "nan", "single-quotes", "empty", "null", "array"],
)
def test_malformed_json_is_400_and_server_keeps_serving(
    http: httpx.Client, unchanged: Any, body: bytes, mentions: str
) -> None:
    assert_error(post_json(http, body), 400, "bad_request", mentions=mentions)
    unchanged()


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"\xc1", "malformed"),
        (msgspec.msgpack.encode({"sql": "DELETE FROM t"})[:-3], "truncated"),
        (msgspec.msgpack.encode({"sql": "DELETE FROM t"}) + b"\x00", "trailing"),
        (msgspec.msgpack.encode(["DELETE FROM t"]), "expected `object`"),
        (msgspec.msgpack.encode(42), "expected `object`"),
        (b"", "empty"),
    ],
    ids=["bad-opcode", "truncated", "trailing", "array", "int", "empty"],
)
def test_malformed_msgpack_is_400_in_msgpack_and_server_keeps_serving(
    http: httpx.Client, unchanged: Any, body: bytes, mentions: str
) -> None:
    r = post_msgpack(http, body)
    assert r.headers["content-type"] == "application/msgpack"
    assert_error(r, 400, "bad_request", mentions=mentions)
    unchanged()


def test_msgpack_extension_types_are_400(http: httpx.Client, unchanged: Any) -> None:
    body = msgspec.msgpack.encode(
        {"sql": "DELETE FROM t WHERE id = ?", "params": [msgspec.msgpack.Ext(1, b"\x01")]}
    )
    assert_error(post_msgpack(http, body), 400, "bad_request", mentions="extension")
    put = http.put(
        f"/v1/actors/{VICTIM}/kv/config",
        content=msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"x")),
        headers=MSGPACK,
    )
    assert_error(put, 400, "bad_request", mentions="extension")
    unchanged()


# ------------------------------------------------------------------ unknown fields, wrong types


@pytest.mark.parametrize(
    "case",
    [
        (SQL_PATH, {"sql": "DELETE FROM t", "extra": 1}, "extra"),
        (SQL_PATH, {"sql": "DELETE FROM t", "param": [1]}, "param"),
        (f"/v1/actors/{VICTIM}/batch", {"statements": [], "atomic": False}, "atomic"),
        (
            f"/v1/actors/{VICTIM}/batch",
            {"statements": [{"sql": "DELETE FROM t", "timeout": 5}]},
            "timeout",
        ),
    ],
    ids=["sql-extra", "sql-misspelled-params", "batch-extra", "statement-extra"],
)
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_unknown_field_is_400_naming_the_field(
    http: httpx.Client, unchanged: Any, case: tuple[str, Any, str], encoding: str
) -> None:
    path, body, mentions = case
    if encoding == "json":
        r = post_json(http, msgspec.json.encode(body), path)
    else:
        r = post_msgpack(http, msgspec.msgpack.encode(body), path)
    assert_error(r, 400, "bad_request", mentions=("unknown field", mentions))
    unchanged()


@pytest.mark.parametrize(
    ("path", "body", "mentions"),
    [
        (SQL_PATH, {"sql": 1}, "$.sql"),
        (SQL_PATH, {"sql": None}, "$.sql"),
        (SQL_PATH, {"params": [1]}, "sql"),
        (SQL_PATH, {"sql": "DELETE FROM t WHERE id = ?", "params": "1"}, "$.params"),
        (SQL_PATH, {"sql": "DELETE FROM t WHERE id = ?", "params": 1}, "$.params"),
        (f"/v1/actors/{VICTIM}/batch", {"statements": "DELETE FROM t"}, "$.statements"),
        (f"/v1/actors/{VICTIM}/batch", {"statements": [["DELETE FROM t"]]}, "$.statements[0]"),
        (f"/v1/actors/{VICTIM}/batch", {"statements": [{"sql": 5}]}, "$.statements[0].sql"),
        (f"/v1/actors/{VICTIM}/batch", {}, "statements"),
    ],
    ids=[
        "sql-int",
        "sql-null",
        "sql-missing",
        "params-str",
        "params-int",
        "statements-str",
        "statement-array",
        "statement-sql-int",
        "statements-missing",
    ],
)
def test_wrong_type_is_400_naming_where(
    http: httpx.Client, unchanged: Any, path: str, body: Any, mentions: str
) -> None:
    assert_error(
        post_json(http, msgspec.json.encode(body), path), 400, "bad_request", mentions=mentions
    )
    unchanged()


@pytest.mark.parametrize(
    "query", [{"limit": "ten"}, {"limit": "0"}, {"limit": "-1"}, {"limit": "1000001"}]
)
def test_kv_list_with_a_bad_limit_is_400(
    http: httpx.Client, unchanged: Any, query: dict[str, str]
) -> None:
    r = http.get(f"/v1/actors/{VICTIM}/kv", params=query)
    assert_error(r, 400, "bad_request", mentions="limit")
    unchanged()


def test_kv_name_over_the_limit_is_400(http: httpx.Client, unchanged: Any) -> None:
    r = http.put(f"/v1/actors/{VICTIM}/kv/{'n' * 3000}", json=1)
    assert_error(r, 400, "bad_request", mentions="KV name")
    unchanged()


# ------------------------------------------------------------------ deep nesting


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        # the body must be an object: rejected before any nesting is decoded
        (b"[" * DEEP + b"]" * DEEP, "expected `object`"),
        (
            b'{"sql": "DELETE FROM t WHERE id = ?", "params": ['
            + b"[" * DEEP
            + b"]" * DEEP
            + b"]}",
            "nested too deeply",
        ),
        (
            b'{"sql": "DELETE FROM t", "params": {"a": '
            + b'{"a": ' * (DEEP // 2)
            + b"1"
            + b"}" * (DEEP // 2)
            + b"}}",
            "nested too deeply",
        ),
    ],
    ids=["whole-body", "in-params", "objects-in-named-params"],
)
def test_deeply_nested_json_is_400_not_a_crash(
    http: httpx.Client, unchanged: Any, body: bytes, mentions: str
) -> None:
    assert len(body) < MAX_REQUEST_BYTES
    assert_error(post_json(http, body), 400, "bad_request", mentions=mentions)
    unchanged()


def test_deeply_nested_msgpack_is_400_not_a_crash(http: httpx.Client, unchanged: Any) -> None:
    head = msgspec.msgpack.encode({"sql": "DELETE FROM t WHERE id = ?", "params": [0]})[:-1]
    body = head + b"\x91" * DEEP + b"\x90"  # params: [[[[...]]]]
    assert_error(post_msgpack(http, body), 400, "bad_request", mentions="nested too deeply")
    unchanged()


def test_deeply_nested_kv_value_is_400_in_json_and_msgpack(
    http: httpx.Client, unchanged: Any
) -> None:
    path = f"/v1/actors/{VICTIM}/kv/config"
    r = http.put(path, content=b"[" * DEEP + b"]" * DEEP)
    assert_error(r, 400, "bad_request", mentions="nested too deeply")
    r = http.put(path, content=b"\x91" * DEEP + b"\x90", headers=MSGPACK)
    assert_error(r, 400, "bad_request", mentions="nested too deeply")
    unchanged()


@pytest.mark.parametrize("depth", [100, 500])
def test_moderately_nested_kv_values_round_trip_and_never_break_the_listing(
    http: httpx.Client, depth: int
) -> None:
    key = f"nested-{depth}"
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    r = http.put(f"/v1/actors/{key}/kv/json", content=b"[" * depth + b"]" * depth)
    assert r.status_code == 200, r.text
    r = http.put(
        f"/v1/actors/{key}/kv/msgpack", content=msgspec.msgpack.encode(value), headers=MSGPACK
    )
    assert r.status_code == 200, r.text
    for name in ("json", "msgpack"):
        got = http.get(f"/v1/actors/{key}/kv/{name}")
        assert got.status_code == 200, got.text
        assert got.json() == value
        got = http.get(f"/v1/actors/{key}/kv/{name}", headers={"Accept": "application/msgpack"})
        assert msgspec.msgpack.decode(got.content) == value
    listed = http.get(f"/v1/actors/{key}/kv")
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"items": [["json", value], ["msgpack", value]]}


# ------------------------------------------------------------------ oversize bodies


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", SQL_PATH, {"Content-Type": "application/json"}),
        ("POST", SQL_PATH, MSGPACK),
        ("POST", f"/v1/actors/{VICTIM}/batch", {"Content-Type": "application/json"}),
        ("PUT", f"/v1/actors/{VICTIM}/kv/config", {"Content-Type": "application/json"}),
    ],
    ids=["sql-json", "sql-msgpack", "batch", "kv-put"],
)
def test_oversize_body_is_413_and_the_connection_stays_usable(
    http: httpx.Client, unchanged: Any, method: str, path: str, headers: dict[str, str]
) -> None:
    body = b'{"sql": "DELETE FROM t", "pad": "' + b"x" * (4 * MAX_REQUEST_BYTES) + b'"}'
    r = http.request(method, path, content=body, headers=headers)
    assert_error(r, 413, "too_large", mentions=str(MAX_REQUEST_BYTES))
    unchanged()  # the same client: a reused connection must not hang


def test_oversize_chunked_body_is_413(http: httpx.Client, unchanged: Any) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"sql": "DELETE FROM t", "pad": "'
        for _ in range(16):
            yield b"x" * (MAX_REQUEST_BYTES // 4)
        yield b'"}'

    r = http.post(SQL_PATH, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too_large")
    unchanged()


def test_body_just_under_the_limit_is_accepted(http: httpx.Client, unchanged: Any) -> None:
    padding = "x" * (MAX_REQUEST_BYTES - 100)
    r = http.post(SQL_PATH, json={"sql": "SELECT length(?)", "params": [padding]})
    assert MAX_REQUEST_BYTES - 100 < len(r.request.content) <= MAX_REQUEST_BYTES
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[len(padding)]]
    unchanged()


def test_unknown_path_with_a_large_body_is_404_and_the_connection_stays_usable(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.post("/v1/nope", content=UNREAD_BODY)
    assert_error(r, 404, "not_found", mentions="/v1/nope")
    unchanged()


def test_wrong_method_with_a_large_body_is_405_and_the_connection_stays_usable(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.put(f"/v1/actors/{VICTIM}", content=UNREAD_BODY)
    assert_error(r, 405, "method_not_allowed", mentions="PUT")
    unchanged()


@pytest.mark.parametrize("path", ["/livez", f"/v1/actors/{VICTIM}/kv/config", "/metrics"])
def test_a_body_on_a_get_is_ignored_and_the_connection_stays_usable(
    http: httpx.Client, unchanged: Any, path: str
) -> None:
    r = http.request("GET", path, content=UNREAD_BODY)
    assert r.status_code == 200, r.text
    unchanged()


# ------------------------------------------------------------------ invalid keys

INVALID_KEY_PATHS = {
    # the key as it appears, percent-encoded, in the request path
    "empty": "",
    "too-long": "k" * 257,
    "too-long-utf8": "%C3%BC" * 129,  # 258 bytes
    "control-char": "a%01b",
    "newline": "a%0Ab",
    "nul": "a%00b",
    "del": "a%7Fb",
    "dot": ".",
    "dotdot": "..",
    "encoded-dotdot": "%2e%2e",
    "encoded-dot": "%2E",
    "dotdot-slash-x": "..%2Fx",
    "dotdot-slash-x-lower": "..%2fx",
    "traversal": "..%2F..%2F..%2F..%2Fescaped",
    "slash": "a%2Fb",
    "leading-slash": "%2Fetc",
    "backslash": "a%5Cb",
    "backslash-traversal": "..%5C..%5Cescaped",
}


@pytest.mark.parametrize("encoded", INVALID_KEY_PATHS.values(), ids=INVALID_KEY_PATHS.keys())
@pytest.mark.parametrize(
    "operation",
    [
        ("POST", "/sql", b'{"sql": "CREATE TABLE pwned(x)"}'),
        ("PUT", "/kv/pwned", b"1"),
        ("GET", "/export", None),
    ],
    ids=["sql", "kv-put", "export"],
)
def test_invalid_key_is_400_naming_the_key_and_creates_no_file(
    module_server: Any,
    unchanged: Any,
    server_root: Path,
    encoded: str,
    operation: tuple[str, str, bytes | None],
) -> None:
    method, suffix, body = operation
    before = files_under(server_root)
    r = raw_http(
        module_server.http_url,
        method,
        f"/v1/actors/{encoded}{suffix}",
        body,
        {"Content-Type": "application/json"},
    )
    assert_error(r, 400, "bad_request", mentions="key")
    assert files_under(server_root) == before
    assert not list(server_root.parent.glob("escaped*"))
    unchanged()


def test_invalid_key_delete_is_400_and_deletes_nothing(module_server: Any, unchanged: Any) -> None:
    for encoded in ("", "..", "%2e%2e", "..%2F" + VICTIM, "%2F" + VICTIM):
        r = raw_http(module_server.http_url, "DELETE", f"/v1/actors/{encoded}")
        assert_error(r, 400, "bad_request", mentions="key")
    unchanged()


def test_empty_key_is_never_redirected_to_another_actor(module_server: Any, unchanged: Any) -> None:
    # "/v1/actors//kv/x" must not turn into "/v1/actors/kv/x" (actor "kv")
    r = raw_http(module_server.http_url, "DELETE", f"/v1/actors//{VICTIM}")
    assert r.status != 308 and "location" not in r.headers
    assert_error(r, 400, "bad_request", mentions="empty")
    r = raw_http(module_server.http_url, "PUT", "/v1/actors//kv/kv/x", b"1")
    assert_error(r, 400, "bad_request", mentions="empty")
    unchanged()


INVALID_KEYS = {
    "empty": "",
    "too-long": "k" * 257,
    "control-char": "a\x01b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "dot": ".",
    "dotdot": "..",
    "dotdot-slash-x": "../x",
    "traversal": "../../../../escaped",
    "slash": "a/b",
    "backslash": "a\\b",
    "backslash-traversal": "..\\..\\escaped",
    "bidi-control": "a\u202eb",
    "line-separator": "a\u2028b",
}


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
def test_invalid_key_over_rpc_is_400_with_its_id_and_creates_no_file(
    rpc: RpcSocket, unchanged: Any, server_root: Path, key: str
) -> None:
    before = files_under(server_root)
    rpc.send(
        [11, key, ["sql", "CREATE TABLE pwned(x)", None]],
        [12, key, ["kv_put", "pwned", 1]],
        [13, key, ["export"]],
        [14, key, ["delete"]],
    )
    replies = rpc.receive_by_id(4)
    for req_id in (11, 12, 13, 14):
        assert_rpc_error(replies[req_id], req_id, "bad_request", mentions="key")
    assert_rpc_ok(rpc.request(15, VICTIM, ["ping"]), 15)
    assert files_under(server_root) == before
    unchanged()


def test_key_that_is_not_utf8_over_rpc_is_rejected(rpc: RpcSocket, unchanged: Any) -> None:
    # [16, <str with invalid UTF-8>, ["ping"]]
    payload = b"\x93\x10\xa2\xff\xfe\x91\xa4ping"
    rpc.send_payloads(payload)
    (reply,) = rpc.receive(1)
    assert reply[1] == 1 and reply[0] in (0, 16), reply
    assert reply[2]["code"] == "bad_request"
    assert_rpc_ok(rpc.request(17, VICTIM, ["ping"]), 17)
    unchanged()


def test_longest_valid_key_works(http: httpx.Client) -> None:
    key = "é" * 128  # 256 bytes
    r = http.post(f"/v1/actors/{quote(key)}/sql", json={"sql": "SELECT 1"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ unknown paths, methods


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1",
        "/v1/nope",
        "/v2/actors/victim/sql",
        f"/v1/actors/{VICTIM}/nope",
        f"/v1/actors/{VICTIM}/sql/extra",
        f"/v1/actors/{VICTIM}/kv/",
        "/livez/extra",
    ],
)
def test_unknown_path_is_404_naming_the_path(module_server: Any, unchanged: Any, path: str) -> None:
    r = raw_http(module_server.http_url, "GET", path)
    assert_error(r, 404, "not_found", mentions=path)
    unchanged()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", SQL_PATH),
        ("PUT", SQL_PATH),
        ("GET", f"/v1/actors/{VICTIM}/batch"),
        ("POST", f"/v1/actors/{VICTIM}/kv/config"),
        ("PATCH", f"/v1/actors/{VICTIM}/kv/config"),
        ("POST", f"/v1/actors/{VICTIM}/kv"),
        ("DELETE", f"/v1/actors/{VICTIM}/kv"),
        ("POST", f"/v1/actors/{VICTIM}"),
        ("GET", f"/v1/actors/{VICTIM}"),
        ("DELETE", f"/v1/actors/{VICTIM}/export"),
        ("POST", "/livez"),
        ("DELETE", "/metrics"),
        ("OPTIONS", SQL_PATH),
        ("BREW", SQL_PATH),
    ],
)
def test_wrong_method_is_405_naming_the_method(
    module_server: Any, unchanged: Any, method: str, path: str
) -> None:
    r = raw_http(module_server.http_url, method, path, b"{}")
    assert_error(r, 405, "method_not_allowed", mentions=method)
    unchanged()


# ------------------------------------------------------------------ SQL errors


@pytest.mark.parametrize(
    ("statement", "mentions"),
    [
        ("DELET FROM t", "syntax error"),
        ("DELETE FROM nope", "no such table: nope"),
        ("UPDATE t SET nope = 1", "no such column: nope"),
        ("SELECT nope(1)", "no such function: nope"),
        ("INSERT INTO t(v) VALUES ('a', 'b')", "values"),
        ("CREATE TABLE t(x)", "already exists"),
        ("DROP TABLE nope", "no such table"),
    ],
)
def test_sql_error_is_400_sql_error(
    http: httpx.Client, unchanged: Any, statement: str, mentions: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement})
    assert_error(r, 400, "sql_error", mentions=mentions)
    unchanged()


def test_sql_error_inside_a_batch_rolls_back_the_whole_batch(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.post(
        f"/v1/actors/{VICTIM}/batch",
        json={
            "statements": [
                {"sql": "DELETE FROM t"},
                {"sql": "INSERT INTO other VALUES (2)"},
                {"sql": "SELEC 1"},
            ]
        },
    )
    error = assert_error(r, 400, "sql_error", mentions="statement 2")
    assert error.get("index") == 2
    unchanged()


@pytest.mark.parametrize(
    ("statement", "params", "mentions"),
    [
        ("INSERT INTO t(v) VALUES (?)", ["one"], "UNIQUE"),
        ("UPDATE t SET v = 'two' WHERE v = 'one'", None, "UNIQUE"),
        ("INSERT INTO t(v) VALUES (NULL)", None, "NOT NULL"),
        ("INSERT INTO t(v) VALUES (?)", ["x" * 30], "CHECK"),
        ("INSERT INTO t(id, v) VALUES ('not-an-int', 'new')", None, "datatype mismatch"),
        ("INSERT INTO t(id, v) VALUES (1, 'dup-id')", None, "UNIQUE"),
    ],
    ids=["unique", "unique-update", "not-null", "check", "strict-type", "primary-key"],
)
def test_constraint_violation_is_409_and_writes_nothing(
    http: httpx.Client, unchanged: Any, statement: str, params: Any, mentions: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement, "params": params})
    assert_error(r, 409, "constraint", mentions=mentions)
    unchanged()


def test_constraint_violation_in_a_batch_is_409_and_undoes_the_batch(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.post(
        f"/v1/actors/{VICTIM}/batch",
        json={
            "statements": [
                {"sql": "INSERT INTO t(v) VALUES ('four')"},
                {"sql": "DELETE FROM other"},
                {"sql": "INSERT INTO t(v) VALUES ('four')"},
            ]
        },
    )
    assert_error(r, 409, "constraint", mentions="UNIQUE")
    unchanged()


# ------------------------------------------------------------------ quota, time budget, size


def test_quota_exceeded_is_507_and_writes_nothing(http: httpx.Client, unchanged: Any) -> None:
    r = http.post(
        SQL_PATH, json={"sql": f"{FOREVER} INSERT INTO other SELECT randomblob(4000) FROM c"}
    )
    assert_error(r, 507, "quota_exceeded", mentions="quota")
    unchanged()


def test_full_actor_still_reads_and_deletes_and_other_actors_still_write(
    http: httpx.Client, unchanged: Any
) -> None:
    key = "quota-full"
    path = f"/v1/actors/{key}/sql"
    assert http.post(path, json={"sql": "CREATE TABLE big(b BLOB)"}).status_code == 200
    inserted = 0
    for _ in range(MAX_DB_BYTES // 8000 + 10):
        r = http.post(path, json={"sql": "INSERT INTO big VALUES (randomblob(8000))"})
        if r.status_code != 200:
            break
        inserted += 1
    assert_error(r, 507, "quota_exceeded", mentions="quota")
    assert 0 < inserted < MAX_DB_BYTES // 8000
    put = http.put(f"/v1/actors/{key}/kv/big", content=b'"' + b"y" * 100_000 + b'"')
    assert_error(put, 507, "quota_exceeded")
    count = http.post(path, json={"sql": "SELECT count(*) FROM big"})
    assert count.status_code == 200 and count.json()["rows"] == [[inserted]]
    deleted = http.post(path, json={"sql": "DELETE FROM big"})
    assert deleted.status_code == 200 and deleted.json()["changes"] == inserted
    again = http.post(path, json={"sql": "INSERT INTO big VALUES (randomblob(8000))"})
    assert again.status_code == 200, again.text
    unchanged(files=False)


@pytest.mark.parametrize(
    "statement",
    [
        f"{FOREVER} SELECT count(*) FROM c",
        f"{FOREVER} INSERT INTO other SELECT x FROM c WHERE x <= 3",
        f"{FOREVER} DELETE FROM t WHERE id IN (SELECT x FROM c)",
    ],
    ids=["select", "insert-then-spin", "delete"],
)
def test_runaway_query_is_504_and_writes_nothing(
    http: httpx.Client, unchanged: Any, statement: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement})
    assert_error(r, 504, "timeout", mentions="time budget")
    unchanged()


def test_runaway_query_in_a_batch_undoes_the_batch(http: httpx.Client, unchanged: Any) -> None:
    r = http.post(
        f"/v1/actors/{VICTIM}/batch",
        json={
            "statements": [
                {"sql": "DELETE FROM t"},
                {"sql": f"{FOREVER} SELECT count(*) FROM c"},
            ]
        },
    )
    assert_error(r, 504, "timeout")
    unchanged()


def test_result_over_the_limit_is_413(http: httpx.Client, unchanged: Any) -> None:
    # 2000 rows of 200 bytes: 400 kB, over the 64 KiB --max-result-bytes
    r = http.post(SQL_PATH, json={"sql": f"{FOREVER} SELECT randomblob(200) FROM c LIMIT 2000"})
    assert_error(r, 413, "too_large", mentions="result")
    unchanged()


def test_result_of_a_few_large_rows_over_the_limit_is_413(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.post(SQL_PATH, json={"sql": f"{FOREVER} SELECT randomblob(100000) FROM c LIMIT 10"})
    assert_error(r, 413, "too_large", mentions="result")
    unchanged()


def test_write_whose_result_is_over_the_limit_is_413_and_writes_nothing(
    http: httpx.Client, unchanged: Any
) -> None:
    r = http.post(
        SQL_PATH,
        json={
            "sql": f"{FOREVER} INSERT INTO other SELECT x FROM c LIMIT 2000 "
            "RETURNING x, randomblob(200)"
        },
    )
    assert_error(r, 413, "too_large", mentions="result")
    unchanged()


def test_statement_text_over_the_limit_is_rejected(http: httpx.Client, unchanged: Any) -> None:
    r = http.post(SQL_PATH, json={"sql": f"DELETE FROM t WHERE v = '{'x' * 150_000}'"})
    assert_error(r, 413, "too_large")
    unchanged()


# ------------------------------------------------------------------ the sandbox


@pytest.mark.parametrize(
    ("statement", "mentions"),
    [
        ("ATTACH DATABASE 'other.db' AS o", "ATTACH"),
        ("ATTACH DATABASE ':memory:' AS o", "ATTACH"),
        ("DETACH DATABASE main", "DETACH"),
        ("SELECT load_extension('/tmp/evil')", "load_extension"),
        ("PRAGMA synchronous = OFF", "synchronous"),
        ("PRAGMA synchronous", "synchronous"),
        ("PRAGMA journal_mode = DELETE", "journal_mode"),
        ("PRAGMA max_page_count = 1000000000", "max_page_count"),
        ("PRAGMA writable_schema = ON", "writable_schema"),
        ("PRAGMA locking_mode = NORMAL", "locking_mode"),
        ("PRAGMA temp_store = MEMORY", "temp_store"),
        ("PRAGMA foreign_keys = OFF", "foreign_keys"),
        ("PRAGMA wal_checkpoint(TRUNCATE)", "wal_checkpoint"),
        ("BEGIN", "transaction"),
        ("BEGIN IMMEDIATE", "transaction"),
        ("COMMIT", "transaction"),
        ("END", "transaction"),
        ("ROLLBACK", "transaction"),
        ("SAVEPOINT s", "transaction"),
        ("RELEASE s", "transaction"),
        ("SELECT * FROM _shardlite_kv", "_shardlite_"),
        ("SELECT * FROM _SHARDLITE_META", "_shardlite_"),
        ("SELECT * FROM main._shardlite_meta", "_shardlite_"),
        ("SELECT (SELECT count(*) FROM _shardlite_kv)", "_shardlite_"),
        ("DELETE FROM _shardlite_kv", "_shardlite_"),
        ("UPDATE _shardlite_meta SET value = 'other-key'", "_shardlite_"),
        ("INSERT INTO _shardlite_kv VALUES ('x', x'00')", "_shardlite_"),
        ("DROP TABLE _shardlite_meta", "_shardlite_"),
        ("ALTER TABLE _shardlite_kv RENAME TO mine", "_shardlite_"),
        ("CREATE INDEX i ON _shardlite_kv(value)", "_shardlite_"),
        ("CREATE TABLE _shardlite_mine(x)", "_shardlite_"),
        ("CREATE TRIGGER tr AFTER INSERT ON _shardlite_kv BEGIN SELECT 1; END", "_shardlite_"),
        ("CREATE TEMP TABLE tmp(x)", "temp"),
        ("CREATE VIRTUAL TABLE v USING csv(filename='/etc/passwd')", "csv"),
    ],
)
def test_sandbox_denial_is_4xx_naming_the_problem_and_changes_nothing(
    http: httpx.Client, unchanged: Any, statement: str, mentions: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert_error(r, r.status_code, r.json()["error"]["code"], mentions=mentions)
    assert r.json()["error"]["code"] in ("forbidden", "sql_error")
    unchanged()


@pytest.mark.parametrize("target", ["relative", "parent", "absolute"])
def test_vacuum_into_is_denied_and_writes_no_file(
    http: httpx.Client, unchanged: Any, server_root: Path, target: str, tmp_path: Path
) -> None:
    absolute = tmp_path / "escaped-vacuum.db"
    path = {
        "relative": "escaped-vacuum.db",
        "parent": "../escaped-vacuum.db",
        "absolute": str(absolute),
    }[target]
    r = http.post(SQL_PATH, json={"sql": f"VACUUM INTO '{path}'"})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code, r.json()["error"]["code"], mentions="VACUUM")
    assert not absolute.exists()
    assert not list(server_root.parent.glob("escaped-vacuum*"))
    assert not list(Path.cwd().glob("escaped-vacuum*"))
    unchanged()


def test_trigger_cannot_smuggle_writes_into_hidden_tables(http: httpx.Client) -> None:
    path = "/v1/actors/trigger-smuggle/sql"
    assert http.put("/v1/actors/trigger-smuggle/kv/keep", json="me").status_code == 200
    assert http.post(path, json={"sql": "CREATE TABLE t(x)"}).status_code == 200
    created = http.post(
        path,
        json={"sql": "CREATE TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM _shardlite_kv; END"},
    )
    if created.status_code == 200:
        r = http.post(path, json={"sql": "INSERT INTO t VALUES (1)"})
        assert_error(r, 403, "forbidden", mentions="_shardlite_")
    else:
        assert_error(created, 403, "forbidden", mentions="_shardlite_")
    assert http.get("/v1/actors/trigger-smuggle/kv/keep").json() == "me"
    count = http.post(path, json={"sql": "SELECT count(*) FROM t"})
    assert count.json()["rows"] == [[0]]


def test_view_cannot_read_hidden_tables(http: httpx.Client) -> None:
    path = "/v1/actors/view-smuggle/sql"
    assert http.put("/v1/actors/view-smuggle/kv/secret", json="s3cret").status_code == 200
    created = http.post(path, json={"sql": "CREATE VIEW v AS SELECT * FROM _shardlite_kv"})
    if created.status_code == 200:
        r = http.post(path, json={"sql": "SELECT * FROM v"})
        assert_error(r, 403, "forbidden", mentions="_shardlite_")
    else:
        assert_error(created, 403, "forbidden", mentions="_shardlite_")


def test_read_only_pragmas_with_an_argument_are_allowed(http: httpx.Client) -> None:
    """The allow-list grants table_info & co; they take a table name as argument."""
    path = "/v1/actors/pragma-reader/sql"
    assert http.post(path, json={"sql": "CREATE TABLE t(a INTEGER, b TEXT)"}).status_code == 200
    r = http.post(path, json={"sql": "PRAGMA table_info(t)"})
    assert r.status_code == 200, r.text
    assert [row[1] for row in r.json()["rows"]] == ["a", "b"]
    r = http.post(path, json={"sql": "SELECT name FROM pragma_table_info('t')"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ multi-statement, empty


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1; DROP TABLE t",
        "DELETE FROM other; SELECT 1",
        "INSERT INTO other VALUES (2); INSERT INTO other VALUES (3)",
        "UPDATE t SET v = 'x' || v; DELETE FROM t",
    ],
    ids=["select-drop", "delete-select", "insert-insert", "update-delete"],
)
def test_multi_statement_sql_is_400_and_runs_none_of_it(
    http: httpx.Client, unchanged: Any, statement: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement})
    assert_error(r, 400, "bad_request", mentions="more than one statement")
    unchanged()


@pytest.mark.parametrize("statement", ["", "   ", "\n\t", ";", "-- just a comment", "/* c */ ;"])
def test_empty_sql_is_400(http: httpx.Client, unchanged: Any, statement: str) -> None:
    r = http.post(SQL_PATH, json={"sql": statement})
    assert_error(r, 400, "bad_request", mentions="empty")
    unchanged()


def test_empty_batch_is_400(http: httpx.Client, unchanged: Any) -> None:
    r = http.post(f"/v1/actors/{VICTIM}/batch", json={"statements": []})
    assert_error(r, 400, "bad_request", mentions="no statements")
    unchanged()


# ------------------------------------------------------------------ bad params


@pytest.mark.parametrize(
    ("statement", "params", "mentions"),
    [
        ("DELETE FROM t WHERE id = ? OR id = ?", [1], "bindings"),
        ("DELETE FROM t WHERE id = ?", [1, 2], "bindings"),
        ("DELETE FROM t WHERE id = ?", [], "bindings"),
        ("DELETE FROM t WHERE id = :id", {"other": 1}, "id"),
        ("DELETE FROM t WHERE id = :id", {}, "id"),
        ("DELETE FROM t WHERE id = ?", {"id": 1}, "dict"),
        ("DELETE FROM t WHERE id = ?", [[1]], "$.params[0]"),
        ("DELETE FROM t WHERE id = ?", [[]], "$.params[0]"),
        ("DELETE FROM t WHERE id = :id", {"id": [1]}, "$.params.id"),
        ("DELETE FROM t WHERE id = ?", [{"id": 1}], "$.params[0]"),
        ("DELETE FROM t WHERE id = ?", [2**63], "too big"),
        ("DELETE FROM t WHERE id = ?", [2**64 + 1], "too big"),
        ("DELETE FROM t WHERE id = ?", [-(2**63) - 1], "too big"),
        ("DELETE FROM t WHERE id = ?", [10**30], "too big"),
    ],
    ids=[
        "too-few",
        "too-many",
        "none",
        "missing-named",
        "empty-named",
        "dict-for-positional",
        "nested-array",
        "empty-nested-array",
        "nested-in-named",
        "object",
        "2^63",
        "2^64+1",
        "-2^63-1",
        "10^30",
    ],
)
def test_bad_params_are_400_naming_the_problem(
    http: httpx.Client, unchanged: Any, statement: str, params: Any, mentions: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": statement, "params": params})
    assert_error(r, 400, "bad_request", mentions=mentions)
    unchanged()


def test_out_of_range_float_param_is_400(http: httpx.Client, unchanged: Any) -> None:
    r = post_json(http, b'{"sql": "DELETE FROM t WHERE id = ?", "params": [1e999]}')
    assert_error(r, 400, "bad_request", mentions="out of range")
    unchanged()


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        ({"$blob": "!!!!"}, "base64"),
        ({"$blob": "AAE"}, "base64"),
        ({"$blob": "AA==AA=="}, "base64"),
        ({"$blob": 12}, "base64"),
        ({"$blob": None}, "base64"),
        ({"$blob": "AA==", "extra": 1}, "$.params[0]"),
    ],
    ids=["not-base64", "bad-padding", "padding-inside", "int", "null", "extra-key"],
)
def test_bad_blob_param_is_400(
    http: httpx.Client, unchanged: Any, value: Any, mentions: str
) -> None:
    r = http.post(SQL_PATH, json={"sql": "DELETE FROM t WHERE v = ?", "params": [value]})
    assert_error(r, 400, "bad_request", mentions=mentions)
    unchanged()


def test_bad_blob_in_a_kv_value_is_400(http: httpx.Client, unchanged: Any) -> None:
    r = http.put(f"/v1/actors/{VICTIM}/kv/config", json={"nested": [{"$blob": "@@"}]})
    assert_error(r, 400, "bad_request", mentions="base64")
    unchanged()


def test_bad_params_over_rpc_are_400_with_the_request_id(rpc: RpcSocket, unchanged: Any) -> None:
    rpc.send(
        [21, VICTIM, ["sql", "DELETE FROM t WHERE id = ?", [[1]]]],
        [22, VICTIM, ["sql", "DELETE FROM t WHERE id = ?", [2**64 - 1]]],
        [23, VICTIM, ["sql", "DELETE FROM t WHERE id = ?", [{"a": 1}]]],
        [24, VICTIM, ["sql", "DELETE FROM t WHERE id = ? OR id = ?", [1]]],
        [25, VICTIM, ["sql", "DELETE FROM t WHERE id = :id", {"nope": 1}]],
    )
    replies = rpc.receive_by_id(5)
    for req_id in range(21, 26):
        assert_rpc_error(replies[req_id], req_id, "bad_request", mentions="param")
    unchanged()
