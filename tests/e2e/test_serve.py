"""`shardlite serve` as a real process: the README's commands, HTTP and the client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
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


def test_a_shard_process_that_cannot_start_stops_serve_in_one_line_and_its_siblings_too(
    start_server: Any, tmp_path: Path
) -> None:
    """One shard process refuses to start (here, its shard's log directory is a file):
    `serve` exits 1 with that reason in one line, and stops the shard processes that did
    start, which would otherwise keep the data directory's lock (and wait for ever for
    the peer that failed)."""
    data = tmp_path / "data"
    assert start_server("--procs", "2", data=data).terminate() == 0
    log_dir = data / "shards" / "shard-01" / "log"
    log_dir.rename(tmp_path / "log-aside")
    log_dir.write_bytes(b"not a directory")
    cmd = [sys.executable, "-m", "shardlite", "serve", "--data", str(data), "--procs", "2"]
    cmd += ["--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert f"File exists: '{log_dir}'" in out.stderr and "Traceback" not in out.stderr
    assert "failed to start" in out.stderr

    log_dir.unlink()
    (tmp_path / "log-aside").rename(log_dir)
    server = start_server("--procs", "2", data=data)  # the lock is free: nothing outlived it
    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("k").sql("SELECT 1").rows == [(1,)]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped by a signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_c_while_starting_stops_serve_quietly_and_frees_the_data_directory(
    start_server: Any, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the whole process group) before `serve` is ready: it says it
    stopped, exits 0, and no shard process reports a failure or a traceback. One shard
    process is held (SIGSTOP) so that `serve` cannot be ready when the signal lands."""
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "shardlite", "serve", "--data", str(data), "--procs", "2"]
    cmd += ["--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(children := _children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no shard processes"
            time.sleep(0.01)
        os.kill(children[1], signal.SIGSTOP)  # starting still: it cannot be ready
        # (the supervisor catches SIGINT before it starts any child)
        while _state(children[1]) != "T":
            assert time.monotonic() < deadline, "the shard process did not stop"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        os.kill(children[1], signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "shardlite stopped before it was ready" in out and "serving" not in out
    assert "failed to start" not in err and "Traceback" not in err, err
    server = start_server("--procs", "2", data=data)  # nothing outlived it holding the lock
    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("k").sql("SELECT 1").rows == [(1,)]
