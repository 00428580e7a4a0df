"""Every HTTP path of CONTRACT.md, end to end against one `shardlite serve` process."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import apsw
import httpx
import msgspec
import pytest

from shardlite.actor import key_to_relpath
from tests.e2e.conftest import assert_error, blob, raw_http

MSGPACK = {"Content-Type": "application/msgpack"}
_keys = itertools.count()


@pytest.fixture
def key() -> str:
    """A fresh actor key per test."""
    return f"http-api-{next(_keys)}"


def sql(http: httpx.Client, key: str, statement: str, params: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"sql": statement}
    if params is not None:
        body["params"] = params
    r = http.post(f"/v1/actors/{key}/sql", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    out: dict[str, Any] = r.json()
    return out


def mp_post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    return http.post(path, content=msgspec.msgpack.encode(body), headers=MSGPACK)


def actor_file(server: Any, key: str) -> Path:
    """Where the key's file lives: its shard's directory (one shard owns each key)."""
    found = list(server.data.glob(f"shards/*/{key_to_relpath(key)}"))
    assert len(found) <= 1, found
    if found:
        return found[0]
    path: Path = server.data / "shards" / "(none)" / key_to_relpath(key)
    return path


# ------------------------------------------------------------------ sql


def test_sql_with_positional_params_returns_columns_rows_changes_and_rowid(
    http: httpx.Client, key: str
) -> None:
    created = sql(http, key, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT) STRICT")
    assert created == {"columns": [], "rows": [], "changes": 0, "last_insert_rowid": 0}
    first = sql(http, key, "INSERT INTO t(v) VALUES (?), (?)", ["a", "b"])
    assert first == {"columns": [], "rows": [], "changes": 2, "last_insert_rowid": 2}
    selected = sql(http, key, "SELECT id, v FROM t WHERE id >= ? ORDER BY id", [1])
    assert selected["columns"] == ["id", "v"]
    assert selected["rows"] == [[1, "a"], [2, "b"]]
    assert selected["changes"] == 0


def test_sql_with_named_params(http: httpx.Client, key: str) -> None:
    sql(http, key, "CREATE TABLE t(a INTEGER, b TEXT)")
    sql(http, key, "INSERT INTO t VALUES (:a, :b)", {"a": 7, "b": "seven"})
    sql(http, key, "INSERT INTO t VALUES (@a, $b)", {"a": 8, "b": "eight"})
    rows = sql(http, key, "SELECT b FROM t WHERE a = :a", {"a": 8})["rows"]
    assert rows == [["eight"]]
    assert sql(http, key, "SELECT count(*) FROM t")["rows"] == [[2]]


def test_sql_accepts_explicit_null_params(http: httpx.Client, key: str) -> None:
    r = http.post(f"/v1/actors/{key}/sql", json={"sql": "SELECT 40 + 2", "params": None})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [[42]]


def test_every_value_type_round_trips_as_a_parameter_in_json(http: httpx.Client, key: str) -> None:
    values = [None, 0, -(2**63), 2**63 - 1, 1.5, -0.25, "", "héllo ✓ 😀", "a\x00b"]
    placeholders = ", ".join("?" for _ in values)
    rows = sql(http, key, f"SELECT {placeholders}", values)["rows"]
    assert rows == [values]
    # booleans bind as integers
    assert sql(http, key, "SELECT ?, ?", [True, False])["rows"] == [[1, 0]]


def test_writes_are_visible_to_the_next_request(http: httpx.Client, key: str) -> None:
    sql(http, key, "CREATE TABLE t(v)")
    for i in range(5):
        sql(http, key, "INSERT INTO t VALUES (?)", [i])
        assert sql(http, key, "SELECT count(*) FROM t")["rows"] == [[i + 1]]


def test_actors_do_not_see_each_others_tables(http: httpx.Client, key: str) -> None:
    sql(http, key, "CREATE TABLE mine(v)")
    r = http.post(f"/v1/actors/{key}-other/sql", json={"sql": "SELECT * FROM mine"})
    assert_error(r, 400, "sql_error", mentions="no such table")


def test_unicode_key_is_a_distinct_actor(http: httpx.Client) -> None:
    key = "Acme Corp ü ✓"
    sql(http, key, "CREATE TABLE u(v)")
    sql(http, key, "INSERT INTO u VALUES ('x')")
    assert sql(http, key, "SELECT v FROM u")["rows"] == [["x"]]


# ------------------------------------------------------------------ batch


def test_batch_returns_one_result_per_statement(http: httpx.Client, key: str) -> None:
    r = http.post(
        f"/v1/actors/{key}/batch",
        json={
            "statements": [
                {"sql": "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"},
                {"sql": "INSERT INTO t(v) VALUES (?)", "params": ["a"]},
                {"sql": "INSERT INTO t(v) VALUES (:v)", "params": {"v": "b"}},
                {"sql": "SELECT v FROM t ORDER BY id"},
            ]
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4
    assert results[1] == {"columns": [], "rows": [], "changes": 1, "last_insert_rowid": 1}
    assert results[2]["last_insert_rowid"] == 2
    assert results[3]["columns"] == ["v"] and results[3]["rows"] == [["a"], ["b"]]


def test_batch_is_all_or_nothing(http: httpx.Client, key: str) -> None:
    sql(http, key, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
    sql(http, key, "INSERT INTO t(v) VALUES ('taken')")
    r = http.post(
        f"/v1/actors/{key}/batch",
        json={
            "statements": [
                {"sql": "INSERT INTO t(v) VALUES ('new-1')"},
                {"sql": "UPDATE t SET v = 'renamed' WHERE v = 'taken'"},
                {"sql": "INSERT INTO t(v) VALUES ('renamed')"},  # UNIQUE violation
                {"sql": "INSERT INTO t(v) VALUES ('never')"},
            ]
        },
    )
    error = assert_error(r, 409, "constraint", mentions="unique")
    assert error.get("index") == 2, error
    assert "statement 2" in error["message"]
    assert sql(http, key, "SELECT v FROM t ORDER BY id")["rows"] == [["taken"]]


def test_batch_failure_does_not_undo_earlier_requests(http: httpx.Client, key: str) -> None:
    sql(http, key, "CREATE TABLE t(v)")
    sql(http, key, "INSERT INTO t VALUES (1)")
    r = http.post(
        f"/v1/actors/{key}/batch",
        json={"statements": [{"sql": "INSERT INTO t VALUES (2)"}, {"sql": "SELECT * FROM nope"}]},
    )
    assert_error(r, 400, "sql_error", mentions="no such table")
    assert sql(http, key, "SELECT v FROM t")["rows"] == [[1]]


# ------------------------------------------------------------------ kv


def test_kv_put_then_get_returns_the_same_json_value(http: httpx.Client, key: str) -> None:
    values: list[Any] = [
        None,
        True,
        0,
        -(2**63),
        2**63 - 1,
        3.25,
        "text ✓",
        [1, "two", None, [3.5]],
        {"nested": {"list": [1, {"x": False}]}, "": "empty name"},
    ]
    for i, value in enumerate(values):
        put = http.put(f"/v1/actors/{key}/kv/v{i}", content=msgspec.json.encode(value))
        assert put.status_code == 200, put.text
        assert put.json() == {"ok": True}
    for i, value in enumerate(values):
        got = http.get(f"/v1/actors/{key}/kv/v{i}")
        assert got.status_code == 200, got.text
        assert got.json() == value


def test_kv_get_of_an_absent_name_is_404(http: httpx.Client, key: str) -> None:
    http.put(f"/v1/actors/{key}/kv/present", json=1)
    assert_error(http.get(f"/v1/actors/{key}/kv/absent"), 404, "not_found", mentions="absent")


def test_kv_put_overwrites(http: httpx.Client, key: str) -> None:
    http.put(f"/v1/actors/{key}/kv/name", json="first")
    http.put(f"/v1/actors/{key}/kv/name", json={"second": 2})
    assert http.get(f"/v1/actors/{key}/kv/name").json() == {"second": 2}


def test_kv_delete_reports_whether_the_name_existed(http: httpx.Client, key: str) -> None:
    http.put(f"/v1/actors/{key}/kv/gone", json=1)
    assert http.delete(f"/v1/actors/{key}/kv/gone").json() == {"deleted": True}
    assert http.delete(f"/v1/actors/{key}/kv/gone").json() == {"deleted": False}
    assert_error(http.get(f"/v1/actors/{key}/kv/gone"), 404, "not_found")


def test_kv_names_may_hold_slashes_dots_and_unicode(http: httpx.Client, key: str) -> None:
    names = ["a/b/c", "..", ".", "../x", "ü ✓", "q?x=1#f", "%2e"]
    for i, name in enumerate(names):
        path = f"/v1/actors/{key}/kv/{_quote(name)}"
        put = raw_http(str(http.base_url), "PUT", path, b'{"n": %d}' % i)
        assert put.status == 200, (name, put.body)
        got = raw_http(str(http.base_url), "GET", path)
        assert got.status == 200, (name, got.body)
        assert got.json() == {"n": i}, name
    listed = http.get(f"/v1/actors/{key}/kv", params={"limit": 100}).json()["items"]
    assert sorted(name for name, _ in listed) == sorted(names)


def _quote(name: str) -> str:
    """Percent-encode every character that could be read as path structure, dots included."""
    return quote(name, safe="").replace(".", "%2E")


def test_kv_list_filters_by_prefix_and_pages_with_limit_and_after(
    http: httpx.Client, key: str
) -> None:
    for name in ["a1", "a2", "a3", "ab", "b1", "b2", "c"]:
        assert http.put(f"/v1/actors/{key}/kv/{name}", json=name.upper()).status_code == 200
    everything = http.get(f"/v1/actors/{key}/kv").json()
    assert everything == {
        "items": [[n, n.upper()] for n in ["a1", "a2", "a3", "ab", "b1", "b2", "c"]]
    }
    prefixed = http.get(f"/v1/actors/{key}/kv", params={"prefix": "a"}).json()["items"]
    assert [n for n, _ in prefixed] == ["a1", "a2", "a3", "ab"]
    page1 = http.get(f"/v1/actors/{key}/kv", params={"prefix": "a", "limit": 2}).json()["items"]
    assert [n for n, _ in page1] == ["a1", "a2"]
    page2 = http.get(
        f"/v1/actors/{key}/kv", params={"prefix": "a", "limit": 2, "after": page1[-1][0]}
    ).json()["items"]
    assert [n for n, _ in page2] == ["a3", "ab"]
    page3 = http.get(
        f"/v1/actors/{key}/kv", params={"prefix": "a", "limit": 2, "after": "ab"}
    ).json()["items"]
    assert page3 == []
    assert http.get(f"/v1/actors/{key}/kv", params={"prefix": "zz"}).json() == {"items": []}


def test_kv_entries_belong_to_one_actor(http: httpx.Client, key: str) -> None:
    http.put(f"/v1/actors/{key}/kv/shared-name", json="mine")
    assert_error(http.get(f"/v1/actors/{key}-other/kv/shared-name"), 404, "not_found")
    assert http.get(f"/v1/actors/{key}-other/kv").json() == {"items": []}


# ------------------------------------------------------------------ export / delete


def test_export_returns_a_valid_sqlite_file_holding_the_data(
    http: httpx.Client, key: str, tmp_path: Path
) -> None:
    sql(http, key, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB) STRICT")
    sql(http, key, "INSERT INTO t(v, b) VALUES (?, ?)", ["exported", blob(b"\x00\xff")])
    http.put(f"/v1/actors/{key}/kv/setting", json={"on": True})
    r = http.get(f"/v1/actors/{key}/export")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/vnd.sqlite3"
    assert int(r.headers["content-length"]) == len(r.content)
    assert re.search(r'filename="[^"/\\]+\.db"', r.headers["content-disposition"])
    assert r.content.startswith(b"SQLite format 3\x00")
    path = tmp_path / "export.db"
    path.write_bytes(r.content)
    with apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT id, v, b FROM t").fetchall() == [(1, "exported", b"\x00\xff")]
        kv_rows = conn.execute("SELECT name FROM _shardlite_kv").fetchall()
        assert kv_rows == [("setting",)]


def test_export_of_an_unknown_actor_is_404_and_creates_nothing(
    http: httpx.Client, module_server: Any
) -> None:
    key = "http-api-never-created"
    assert_error(http.get(f"/v1/actors/{key}/export"), 404, "not_found", mentions=key)
    assert not actor_file(module_server, key).exists()


def test_delete_actor_removes_its_file_and_data(
    http: httpx.Client, key: str, module_server: Any
) -> None:
    sql(http, key, "CREATE TABLE t(v)")
    sql(http, key, "INSERT INTO t VALUES (1)")
    http.put(f"/v1/actors/{key}/kv/k", json=1)
    path = actor_file(module_server, key)
    assert path.exists()
    assert http.delete(f"/v1/actors/{key}").json() == {"deleted": True}
    assert not path.exists()
    assert not Path(f"{path}-wal").exists()
    assert http.delete(f"/v1/actors/{key}").json() == {"deleted": False}
    r = http.post(f"/v1/actors/{key}/sql", json={"sql": "SELECT * FROM t"})
    assert_error(r, 400, "sql_error", mentions="no such table")
    assert_error(http.get(f"/v1/actors/{key}/kv/k"), 404, "not_found")


def test_delete_actor_leaves_other_actors_alone(http: httpx.Client, key: str) -> None:
    sql(http, f"{key}-keep", "CREATE TABLE t(v)")
    sql(http, f"{key}-keep", "INSERT INTO t VALUES ('kept')")
    sql(http, key, "CREATE TABLE t(v)")
    assert http.delete(f"/v1/actors/{key}").json() == {"deleted": True}
    assert sql(http, f"{key}-keep", "SELECT v FROM t")["rows"] == [["kept"]]


def test_call_without_an_actor_class_is_404(http: httpx.Client, key: str) -> None:
    r = http.post(f"/v1/actors/{key}/call/increment", json={"args": [], "kwargs": {}})
    assert_error(r, 404, "not_found", mentions="increment")


# ------------------------------------------------------------------ health and metrics


def test_livez_is_ok(http: httpx.Client) -> None:
    r = http.get("/livez")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_is_ok_with_its_checks(http: httpx.Client) -> None:
    r = http.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["checks"] and all(v is True for v in body["checks"].values())


def test_metrics_is_prometheus_text_counting_requests_without_per_key_labels(
    http: httpx.Client,
) -> None:
    def sql_200_count() -> float:
        text = http.get("/metrics").text
        pattern = (
            r'shardlite_http_requests_total\{code="200",method="POST",'
            r'route="/v1/actors/<key>/sql"\} ([0-9.e+]+)'
        )
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0

    key = "metrics-secret-tenant-name"
    before = sql_200_count()
    for _ in range(3):
        sql(http, key, "SELECT 1")
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE shardlite_http_requests_total counter" in r.text
    assert sql_200_count() == before + 3
    assert key not in r.text
    # the cyclic collector's passes per generation (full ones stop the event loop)
    assert re.search(r'^python_gc_collections_total\{generation="2"\} [0-9.e+]+$', r.text, re.M)


def test_metrics_has_the_log_flush_and_event_loop_lag_histograms(start_server: Any) -> None:
    # one process: with several, /metrics on the shared port may come from a process
    # other than the one whose shard holds the key (and whose log flushes)
    server = start_server("--procs", "1", "--durability", "log")
    with httpx.Client(base_url=server.http_url, timeout=10) as http:

        def counts() -> tuple[float, float]:
            text = http.get("/metrics").text
            found = []
            for name in (
                "shardlite_log_flush_duration_seconds",
                "shardlite_event_loop_lag_seconds",
            ):
                assert f"# TYPE {name} histogram" in text
                m = re.search(rf"^{name}_count ([0-9.e+]+)$", text, re.MULTILINE)
                assert m, name
                found.append(float(m.group(1)))
            return found[0], found[1]

        flushes, lags = counts()
        sql(http, "flushed", "CREATE TABLE IF NOT EXISTS flushed(v)")
        for i in range(3):  # each reply waits for a flush of the shard log (durability=log)
            sql(http, "flushed", "INSERT INTO flushed VALUES (?)", [i])
        deadline = time.monotonic() + 10
        while counts()[1] <= lags:  # the loop is sampled every 10 ms
            assert time.monotonic() < deadline, "no event-loop lag sample in 10 s"
            time.sleep(0.02)
        assert counts()[0] >= flushes + 3


# ------------------------------------------------------------------ msgpack bodies


def test_msgpack_request_gets_a_msgpack_response(http: httpx.Client, key: str) -> None:
    r = mp_post(http, f"/v1/actors/{key}/sql", {"sql": "SELECT ? + 1 AS n", "params": [41]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/msgpack"
    assert msgspec.msgpack.decode(r.content) == {
        "columns": ["n"],
        "rows": [[42]],
        "changes": 0,
        "last_insert_rowid": 0,
    }


def test_msgpack_batch_and_kv(http: httpx.Client, key: str) -> None:
    r = mp_post(
        http,
        f"/v1/actors/{key}/batch",
        {"statements": [{"sql": "CREATE TABLE t(v)"}, {"sql": "INSERT INTO t VALUES (1)"}]},
    )
    assert r.status_code == 200
    assert [res["changes"] for res in msgspec.msgpack.decode(r.content)["results"]] == [0, 1]
    value = {"list": [1, 2.5, None, "s"], "flag": True}
    put = http.put(f"/v1/actors/{key}/kv/m", content=msgspec.msgpack.encode(value), headers=MSGPACK)
    assert put.status_code == 200 and msgspec.msgpack.decode(put.content) == {"ok": True}
    got = http.get(f"/v1/actors/{key}/kv/m", headers={"Accept": "application/msgpack"})
    assert got.headers["content-type"] == "application/msgpack"
    assert msgspec.msgpack.decode(got.content) == value
    listed = http.get(f"/v1/actors/{key}/kv", headers={"Accept": "application/msgpack"})
    assert msgspec.msgpack.decode(listed.content) == {"items": [["m", value]]}


def test_accept_msgpack_with_a_json_body_answers_in_msgpack(http: httpx.Client, key: str) -> None:
    r = http.post(
        f"/v1/actors/{key}/sql",
        json={"sql": "SELECT 'x'"},
        headers={"Accept": "application/msgpack"},
    )
    assert r.status_code == 200
    assert msgspec.msgpack.decode(r.content)["rows"] == [["x"]]


def test_msgpack_errors_are_msgpack_with_the_same_shape(http: httpx.Client, key: str) -> None:
    r = mp_post(http, f"/v1/actors/{key}/sql", {"sql": "SELECT * FROM missing"})
    assert r.headers["content-type"] == "application/msgpack"
    assert_error(r, 400, "sql_error", mentions="missing")


# ------------------------------------------------------------------ blobs


def test_blobs_in_json_are_base64_objects_both_ways(http: httpx.Client, key: str) -> None:
    data = bytes(range(256))
    sql(http, key, "CREATE TABLE b(v BLOB)")
    sql(http, key, "INSERT INTO b VALUES (?)", [blob(data)])
    sql(http, key, "INSERT INTO b VALUES (:v)", {"v": blob(b"")})
    rows = sql(http, key, "SELECT v, typeof(v), length(v) FROM b ORDER BY rowid")["rows"]
    assert rows == [[blob(data), "blob", 256], [blob(b""), "blob", 0]]
    put = http.put(f"/v1/actors/{key}/kv/bin", json={"inner": blob(data), "list": [blob(b"x")]})
    assert put.status_code == 200
    got = http.get(f"/v1/actors/{key}/kv/bin").json()
    assert got == {"inner": blob(data), "list": [blob(b"x")]}


def test_blobs_in_msgpack_are_bin_both_ways(http: httpx.Client, key: str) -> None:
    data = b"\x00\x01\xfe\xff" * 100
    mp_post(http, f"/v1/actors/{key}/sql", {"sql": "CREATE TABLE b(v BLOB)"})
    r = mp_post(
        http, f"/v1/actors/{key}/sql", {"sql": "INSERT INTO b VALUES (?)", "params": [data]}
    )
    assert r.status_code == 200, r.content
    r = mp_post(http, f"/v1/actors/{key}/sql", {"sql": "SELECT v, typeof(v) FROM b"})
    assert msgspec.msgpack.decode(r.content)["rows"] == [[data, "blob"]]
    put = http.put(
        f"/v1/actors/{key}/kv/bin", content=msgspec.msgpack.encode([data]), headers=MSGPACK
    )
    assert put.status_code == 200
    got = http.get(f"/v1/actors/{key}/kv/bin", headers={"Accept": "application/msgpack"})
    assert msgspec.msgpack.decode(got.content) == [data]


def test_a_blob_written_as_json_reads_back_as_msgpack_bin_and_vice_versa(
    http: httpx.Client, key: str
) -> None:
    sql(http, key, "CREATE TABLE b(v BLOB)")
    sql(http, key, "INSERT INTO b VALUES (?)", [blob(b"from-json")])
    mp_post(http, f"/v1/actors/{key}/sql", {"sql": "INSERT INTO b VALUES (?)", "params": [b"mp"]})
    r = mp_post(http, f"/v1/actors/{key}/sql", {"sql": "SELECT v FROM b ORDER BY rowid"})
    assert msgspec.msgpack.decode(r.content)["rows"] == [[b"from-json"], [b"mp"]]
    assert sql(http, key, "SELECT v FROM b ORDER BY rowid")["rows"] == [
        [blob(b"from-json")],
        [blob(b"mp")],
    ]


def test_a_text_value_that_looks_like_base64_stays_text(http: httpx.Client, key: str) -> None:
    rows = sql(http, key, "SELECT ?, typeof(?)", ["AAEC", "AAEC"])["rows"]
    assert rows == [["AAEC", "text"]]
