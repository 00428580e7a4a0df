"""`shardlite serve` as a real process: the README's commands, HTTP and the client."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx

import shardlite


def test_readme_quickstart_over_http_and_rpc(server: Any) -> None:
    base = f"{server.http_url}/v1/actors/tenant-1/sql"
    create = {"sql": "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT) STRICT"}
    assert httpx.post(base, json=create).status_code == 200
    r = httpx.post(base, json={"sql": "INSERT INTO t(v) VALUES (?)", "params": ["hi"]})
    assert r.json() == {"columns": [], "rows": [], "changes": 1, "last_insert_rowid": 1}
    r = httpx.post(base, json={"sql": "SELECT * FROM t"})
    assert r.json()["rows"] == [[1, "hi"]]
    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("tenant-1").sql("SELECT count(*) FROM t").rows == [(1,)]


def test_sigterm_shuts_down_cleanly_and_keeps_data(start_server: Any) -> None:
    server = start_server()
    with shardlite.connect(server.rpc_url) as client:
        client.actor("k").sql("CREATE TABLE t(v)")
        client.actor("k").sql("INSERT INTO t VALUES (42)")
    assert server.terminate() == 0
    assert "all actors closed" in server.log
    again = start_server(data=server.data)
    with shardlite.connect(again.rpc_url) as client:
        assert client.actor("k").sql("SELECT v FROM t").rows == [(42,)]


def test_cli_sql_prints_a_table(server: Any) -> None:
    with shardlite.connect(server.rpc_url) as client:
        client.actor("cli").sql("CREATE TABLE t(a, b)")
    out = subprocess.run(
        [
            "shardlite",
            "sql",
            "--url",
            server.rpc_url,
            "cli",
            "INSERT INTO t VALUES (?, ?)",
            "1",
            '"x"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 row(s) changed" in out.stdout
    out = subprocess.run(
        ["shardlite", "sql", "--url", server.rpc_url, "--json", "cli", "SELECT a, b FROM t"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"rows": [' in out.stdout and '"x"' in out.stdout


def test_a_second_server_on_the_same_data_directory_refuses_to_start(server: Any) -> None:
    out = subprocess.run(
        [
            "shardlite",
            "serve",
            "--data",
            str(server.data),
            "--http",
            "127.0.0.1:0",
            "--rpc",
            "127.0.0.1:0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "in use by another shardlite process" in out.stderr
    with shardlite.connect(server.rpc_url) as client:  # the first one still serves
        assert client.actor("k").sql("SELECT 1").rows == [(1,)]
