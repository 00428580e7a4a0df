"""Tokens on real servers: the authorization matrix over HTTP and RPC, read-only enforced
inside SQLite, forwarding between processes, revocation, rate limits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import shardlite
from shardlite.shards._auth import KEYS_FILE, create_token


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardlite", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Tokens:
    """Tokens signed with the server's own key (DATA/auth-keys.json)."""

    def __init__(self, data: Path) -> None:
        keys = json.loads((data / KEYS_FILE).read_text())
        self.kid = keys[0]["kid"]
        self.secret = bytes.fromhex(keys[0]["secret"])

    def make(self, pattern: str, perm: str, ttl: float = 600, now: float | None = None) -> str:
        return create_token(self.kid, self.secret, pattern=pattern, perm=perm, ttl_s=ttl, now=now)[
            0
        ]


@pytest.fixture
def secured(start_server: Any, tmp_path: Path) -> Any:
    server = start_server("--procs", "1", "--auth", "required")
    assert "auth: required" in server.log
    return server, Tokens(tmp_path / "data")


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """(PyJWT warns that a 32-byte key is short for HS512: that token is meant to fail.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def http_call(base: str, token: str | None, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, base + path, headers=headers, timeout=10, **kw)


OPERATIONS: list[tuple[str, str, str, dict[str, Any], str]] = [
    # name, HTTP method, path (under the key), body, permission it needs
    ("select", "POST", "/sql", {"json": {"sql": "SELECT count(*) FROM t"}}, "read"),
    ("insert", "POST", "/sql", {"json": {"sql": "INSERT INTO t VALUES (1)"}}, "write"),
    (
        "batch-write",
        "POST",
        "/batch",
        {"json": {"statements": [{"sql": "INSERT INTO t VALUES (2)"}]}},
        "write",
    ),
    ("kv-get", "GET", "/kv/a", {}, "read"),
    ("kv-list", "GET", "/kv", {}, "read"),
    ("kv-put", "PUT", "/kv/a", {"json": 1}, "write"),
    ("kv-delete", "DELETE", "/kv/a", {}, "write"),
    ("export", "GET", "/export", {}, "read"),
    ("delete", "DELETE", "", {}, "write"),
]
RANK = {"read": 1, "write": 2, "admin": 3}


def test_authorization_matrix_over_http(secured: Any) -> None:
    server, tokens = secured
    base = server.http_url
    admin = tokens.make("*", "admin")
    http_call(
        base, admin, "POST", "/v1/actors/tenant-1/sql", json={"sql": "CREATE TABLE t (a INTEGER)"}
    )
    for perm in ("read", "write", "admin"):
        good = tokens.make("tenant-*", perm)
        wrong_key = tokens.make("other-*", perm)
        for name, method, path, kw, need in OPERATIONS:
            if name == "delete":
                continue  # run last, below
            r = http_call(base, good, method, f"/v1/actors/tenant-1{path}", **kw)
            if RANK[perm] >= RANK[need]:
                assert r.status_code in (200, 404), (perm, name, r.text)  # 404: kv-get of nothing
            else:
                assert r.status_code == 403, (perm, name, r.text)
                assert r.json()["error"]["code"] == "forbidden"
            r = http_call(base, wrong_key, method, f"/v1/actors/tenant-1{path}", **kw)
            assert r.status_code == 403 and "does not cover" in r.json()["error"]["message"], name
    r = http_call(base, tokens.make("tenant-*", "read"), "DELETE", "/v1/actors/tenant-1")
    assert r.status_code == 403
    r = http_call(base, tokens.make("tenant-*", "write"), "DELETE", "/v1/actors/tenant-1")
    assert r.status_code == 200 and r.json() == {"deleted": True}


def test_bad_tokens_are_401(secured: Any) -> None:
    server, tokens = secured
    base = server.http_url
    good = tokens.make("*", "write")
    header, payload, signature = good.split(".")
    tampered_claims = jwt.utils.base64url_encode(
        json.dumps(
            {**jwt.decode(good, options={"verify_signature": False}), "perm": "admin"}
        ).encode()
    ).decode()
    bad = {
        "missing": None,
        "expired": tokens.make("*", "write", ttl=10, now=time.time() - 60),
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "tampered claims": f"{header}.{tampered_claims}.{signature}",
        "wrong algorithm": _quietly(
            jwt.encode,
            jwt.decode(good, options={"verify_signature": False}),
            tokens.secret,
            algorithm="HS512",
            headers={"kid": tokens.kid},
        ),
        "alg none": jwt.encode(
            jwt.decode(good, options={"verify_signature": False}), None, algorithm="none"
        ),
        "unknown key": create_token("nope", b"x" * 32, pattern="*", perm="admin", ttl_s=60)[0],
        "garbage": "not-a-token",
    }
    for why, token in bad.items():
        r = http_call(base, token, "POST", "/v1/actors/k/sql", json={"sql": "SELECT 1"})
        assert r.status_code == 401, (why, r.text)
        body = r.json()["error"]
        assert body["code"] == "unauthorized" and r.headers["WWW-Authenticate"].startswith("Bearer")
        if token:
            assert token not in r.text  # never echoed
    r = httpx.post(
        f"{base}/v1/actors/k/sql", json={"sql": "SELECT 1"}, headers={"Authorization": "Basic x"}
    )
    assert r.status_code == 401
    assert (
        http_call(base, good, "POST", "/v1/actors/k/sql", json={"sql": "SELECT 1"}).status_code
        == 200
    )
    for token in bad.values():  # and the server never logs them
        if token:
            assert token not in server.log
    assert httpx.get(f"{base}/livez").status_code == 200  # health stays open


def test_rpc_and_clients_carry_the_token(secured: Any) -> None:
    server, tokens = secured
    with pytest.raises(shardlite.Unauthorized), shardlite.connect(server.rpc_url, token="") as c:
        c.actor("tenant-2").sql("SELECT 1")
    writer = tokens.make("tenant-*", "write")
    reader = tokens.make("tenant-*", "read")
    for url in (server.rpc_url, server.http_url):
        with shardlite.connect(url, token=writer) as client:
            client.actor("tenant-2").sql("CREATE TABLE IF NOT EXISTS t (a INTEGER)")
            client.actor("tenant-2").sql("INSERT INTO t VALUES (1)")
            with pytest.raises(shardlite.Forbidden):
                client.actor("other").sql("SELECT 1")
        with shardlite.connect(url, token=reader) as client:
            assert client.actor("tenant-2").sql("SELECT count(*) FROM t").rows[0][0] >= 1
            # the very INSERT text the writer ran is cached by SQLite: still refused
            with pytest.raises(shardlite.Forbidden, match="read-only"):
                client.actor("tenant-2").sql("INSERT INTO t VALUES (1)")
            for sneaky in (
                "WITH x(a) AS (SELECT 5) INSERT INTO t SELECT a FROM x",
                "CREATE TABLE u (a)",
                "DELETE FROM t",
                "REPLACE INTO t VALUES (9)",
            ):
                with pytest.raises(shardlite.Forbidden):
                    client.actor("tenant-2").sql(sneaky)
            with pytest.raises(shardlite.Forbidden):
                client.actor("tenant-2").batch(["SELECT 1", "INSERT INTO t VALUES (3)"])
            with pytest.raises(shardlite.Forbidden):
                client.actor("tenant-2").kv.put("x", 1)
    with shardlite.connect(server.rpc_url, token=writer) as client:
        assert client.actor("tenant-2").sql("SELECT count(*) FROM t").rows == [(2,)]
    out = cli(
        "sql", "tenant-2", "SELECT count(*) FROM t", "--url", server.rpc_url, "--token", reader
    )
    assert out.returncode == 0 and "2" in out.stdout
    out = cli("sql", "tenant-2", "SELECT 1", "--url", server.rpc_url)
    assert out.returncode != 0 and "unauthorized" in out.stderr


def test_revoked_tokens_stop_working_everywhere(secured: Any, tmp_path: Path) -> None:
    server, tokens = secured
    token = tokens.make("*", "write")
    with shardlite.connect(server.rpc_url, token=token) as client:
        client.actor("r").sql("SELECT 1")
        out = cli("ops", "token", "revoke", token, "--data", str(tmp_path / "data"))
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 15
        while True:  # the open connection too, once the server has read the list
            try:
                client.actor("r").sql("SELECT 1")
            except shardlite.Unauthorized as exc:
                assert "revoked" in exc.message
                break
            assert time.monotonic() < deadline, "the revocation did not take effect"
            time.sleep(0.2)
    r = http_call(server.http_url, token, "POST", "/v1/actors/r/sql", json={"sql": "SELECT 1"})
    assert r.status_code == 401


def test_tokens_from_the_cli_and_ops_status(secured: Any, tmp_path: Path) -> None:
    server, _ = secured
    data = str(tmp_path / "data")
    out = cli(
        "ops",
        "token",
        "create",
        "--key",
        "tenant-42",
        "--perm",
        "write",
        "--ttl",
        "1h",
        "--data",
        data,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["perm"] == "write" and made["exp"] - made["iat"] == 3600
    r = http_call(server.http_url, made["token"], "PUT", "/v1/actors/tenant-42/kv/x", json=5)
    assert r.status_code == 200
    for bad in (["--perm", "root"], ["--ttl", "forever"], ["--ttl", "900d"]):
        args = ["ops", "token", "create", "--key", "k", "--perm", "read", "--data", data]
        out = cli(
            *args[:-4], *(bad if bad[0] == "--perm" else ["--perm", "read", *bad]), "--data", data
        )
        assert out.returncode != 0
    status = cli("ops", "status", "--data", data, "--json")  # mints its own admin token
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["nodes"][0]["status"] == "ok"


def test_forwarded_requests_keep_the_callers_rights(start_server: Any, tmp_path: Path) -> None:
    server = start_server("--procs", "2", "--auth", "required")
    tokens = Tokens(tmp_path / "data")
    writer, reader = tokens.make("*", "write"), tokens.make("*", "read")
    keys = [f"fwd-{i}" for i in range(16)]  # some on each process
    with shardlite.connect(server.http_url, token=writer) as client:  # HTTP: any process answers
        for key in keys:
            client.actor(key).sql("CREATE TABLE t (a INTEGER)")
    with shardlite.connect(server.rpc_url, token=reader, routing=False) as client:
        for key in keys:  # all through one process: half of them forwarded
            assert client.actor(key).sql("SELECT count(*) FROM t").rows == [(0,)]
            with pytest.raises(shardlite.Forbidden):
                client.actor(key).sql("INSERT INTO t VALUES (1)")


def test_rate_limit_per_key(start_server: Any) -> None:
    # 1 a second (bursts of 2): the bucket refills so slowly that 30 requests see 429s
    # however slow the machine is (at 5 a second, a slow CI box refilled it as it went)
    server = start_server("--procs", "1", "--rate-limit", "1")
    statuses = []
    for _ in range(30):
        r = httpx.post(f"{server.http_url}/v1/actors/busy/sql", json={"sql": "SELECT 1"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert (
                r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
            )
    assert statuses[:2] == [200, 200] and statuses.count(429) >= 10  # a burst of 2, then 1/s
    r = httpx.post(f"{server.http_url}/v1/actors/calm/sql", json={"sql": "SELECT 1"})
    assert r.status_code == 200  # other keys are not affected
    with shardlite.connect(server.rpc_url) as client, pytest.raises(shardlite.RateLimited):
        for _ in range(30):
            client.actor("busy-rpc").sql("SELECT 1")
