"""ops backup / restore / verify against a real server (embedded directory, one host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import shardlite
from shardlite.actor._shardlog import RECORD_HEADER, SEGMENT_HEADER


def ops(data: Path, *args: str, check: bool = True) -> Any:
    cmd = [sys.executable, "-m", "shardlite", "ops", *args, "--data", str(data)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


KEYS = [f"bk-{i}" for i in range(12)]


@pytest.fixture
def filled(start_server: Any, tmp_path: Path) -> Any:
    server = start_server("--procs", "1", "--shards", "1")
    with shardlite.connect(server.rpc_url) as client:
        for key in KEYS:
            actor = client.actor(key)
            actor.sql("CREATE TABLE t (v TEXT) STRICT")
            actor.sql("INSERT INTO t VALUES (?)", [key])
            actor.kv.put("big", "x" * 200_000)  # a few files span several chunks
    return server


def rows(url: str, key: str) -> list[Any]:
    with shardlite.connect(url) as client:
        return [list(r) for r in client.actor(key).sql("SELECT v FROM t").rows]


def test_backup_and_restore_round_trip(filled: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = json.loads(ops(data, "backup", "shard-00", "--to", str(tmp_path / "bk"), "--json").stdout)
    assert out["actors"] == len(KEYS)
    backup = Path(out["path"])
    manifest = json.loads((backup / "manifest.json").read_text())
    assert sorted(a["key"] for a in manifest["actors"]) == sorted(KEYS)
    with shardlite.connect(filled.rpc_url) as client:  # damage the live data
        client.actor(KEYS[0]).sql("DELETE FROM t")
        client.actor(KEYS[1]).delete()
        client.actor(KEYS[2]).sql("INSERT INTO t VALUES ('after')")
    refused = ops(data, "restore", "shard-00", "--from", str(backup), check=False)
    assert refused.returncode == 1 and "--replace" in refused.stderr  # not an empty shard
    ops(data, "restore", "shard-00", "--from", str(backup), "--replace")
    assert not list(backup.rglob("*-wal")) + list(backup.rglob("*-shm"))  # checked, untouched
    for key in KEYS:
        assert rows(filled.rpc_url, key) == [[key]]
    with shardlite.connect(filled.rpc_url) as client:  # restored actors take writes
        client.actor(KEYS[0]).sql("INSERT INTO t VALUES ('new')")
        assert client.actor(KEYS[0]).kv.get("big") == "x" * 200_000
    assert rows(filled.rpc_url, KEYS[0]) == [[KEYS[0]], ["new"]]


def test_restoring_one_key_leaves_the_others_alone(filled: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = json.loads(ops(data, "backup", KEYS[3], "--to", str(tmp_path / "bk"), "--json").stdout)
    assert out["actors"] == 1
    with shardlite.connect(filled.rpc_url) as client:
        client.actor(KEYS[3]).sql("UPDATE t SET v = 'changed'")
        client.actor(KEYS[4]).sql("UPDATE t SET v = 'changed'")
    ops(data, "restore", KEYS[3], "--from", out["path"])
    assert rows(filled.rpc_url, KEYS[3]) == [[KEYS[3]]]
    assert rows(filled.rpc_url, KEYS[4]) == [["changed"]]


def test_a_damaged_backup_is_refused_and_live_data_untouched(filled: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = json.loads(ops(data, "backup", "shard-00", "--to", str(tmp_path / "bk"), "--json").stdout)
    backup = Path(out["path"])
    with shardlite.connect(filled.rpc_url) as client:
        client.actor(KEYS[5]).sql("UPDATE t SET v = 'live'")
    wrong_key = ops(data, "restore", "nobody", "--from", str(backup), check=False)
    assert wrong_key.returncode == 1 and "no actor 'nobody'" in wrong_key.stderr
    victim = backup / json.loads((backup / "manifest.json").read_text())["actors"][0]["file"]
    raw = bytearray(victim.read_bytes())
    raw[5000] ^= 0xFF
    victim.write_bytes(bytes(raw))
    refused = ops(data, "restore", "shard-00", "--from", str(backup), "--replace", check=False)
    assert refused.returncode == 1 and "sha256" in refused.stderr
    assert rows(filled.rpc_url, KEYS[5]) == [["live"]]
    not_a_backup = ops(data, "restore", "shard-00", "--from", str(tmp_path), check=False)
    assert not_a_backup.returncode == 1 and "manifest.json" in not_a_backup.stderr


def test_verify_reports_a_corrupted_file_without_crashing(
    start_server: Any, filled: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    out = json.loads(ops(data, "verify", "--json").stdout)
    assert out[0]["checked"] == len(KEYS) and out[0]["problems"] == {}
    assert out[0]["log_problems"] == {}
    filled.terminate()
    victim = next(p for p in (data / "shards" / "shard-00").rglob("bk-7.db"))
    raw = bytearray(victim.read_bytes())
    for page in (1, 2, 3):  # b-tree page headers (or overflow chain pointers) broken
        raw[page * 4096 : page * 4096 + 8] = b"\xff" * 8
    victim.write_bytes(bytes(raw))
    server = start_server("--procs", "1", "--shards", "1")
    bad = ops(data, "verify", "shard-00", check=False)
    assert bad.returncode == 1 and "bk-7" in bad.stdout, bad.stdout
    report = json.loads(ops(data, "verify", "--json", check=False).stdout)
    assert list(report[0]["problems"]) == ["bk-7"]
    assert rows(server.rpc_url, KEYS[8]) == [[KEYS[8]]]  # the others still serve


def test_verify_reads_the_completed_log_segments_of_a_running_shard(
    start_server: Any, tmp_path: Path
) -> None:
    """Damage in a log segment the shard completed would stop the next start (recovery
    does not replay past a hole): verify finds it while the shard still serves."""
    server = start_server(
        *("--procs", "1", "--shards", "1", "--log-segment-bytes", "16KiB"),
        *("--log-checkpoint-interval", "1h", "--log-trim-bytes", "1GiB"),  # nothing trimmed
    )
    with shardlite.connect(server.rpc_url) as client:
        client.actor("logged").sql("CREATE TABLE t (v TEXT)")
        for _ in range(100):
            client.actor("logged").sql("INSERT INTO t VALUES (?)", ["x" * 500])
    data = tmp_path / "data"
    assert json.loads(ops(data, "verify", "--json").stdout)[0]["log_problems"] == {}
    completed = sorted((data / "shards" / "shard-00" / "log").glob("*.log"))[0]
    raw = bytearray(completed.read_bytes())
    raw[SEGMENT_HEADER.size + RECORD_HEADER.size + 5] ^= 0x01  # inside its first record
    completed.write_bytes(bytes(raw))

    bad = ops(data, "verify", check=False)
    assert bad.returncode == 1, bad.stdout
    assert f"log segment {completed.name}:" in bad.stdout and "damaged" in bad.stdout
    report = json.loads(ops(data, "verify", "--json", check=False).stdout)
    assert list(report[0]["log_problems"]) == [completed.name]
    assert report[0]["problems"] == {}  # the actor file itself is fine
    assert rows(server.rpc_url, "logged")[0] == ["x" * 500]  # and it still serves
