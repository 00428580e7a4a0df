"""Moving shards between hosts, online: real shard processes, a real etcd, the ops CLI.

Two "hosts" on loopback (their own --data and --host-id, one etcd as the directory).
The write load runs in a thread through the routing client while the CLI moves the
shard; afterwards every acknowledged write is on the new owner exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardlite
from shardlite.router import slot_of

from .conftest import wait_until
from .test_cluster import rpc_call

SLOTS = 4096
CLI_TIMEOUT_S = 180


class Hosts:
    def __init__(self, start_server: Any, etcd: Any, tmp_path: Path) -> None:
        self.start_server = start_server
        self.etcd = etcd
        self.tmp = tmp_path
        self.servers: dict[str, Any] = {}

    def start(self, host: str, *extra: str, env: dict[str, str] | None = None) -> Any:
        server = self.start_server(
            "--directory", self.etcd.url, "--host-id", host, "--procs", "1",
            "--shards", "2", "--durability", "log", *extra,
            data=self.tmp / host, env=env,
        )  # fmt: skip
        self.servers[host] = server
        return server

    def ops(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
        cmd = [sys.executable, "-m", "shardlite", "ops", *args]
        cmd += ["--directory", self.etcd.url, "--data", str(self.tmp / "host-a")]
        out = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def status(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.ops("status", "--json").stdout)
        return report

    def owner(self, shard: str) -> tuple[str, int]:
        for s in self.status()["shards"]:
            if s["id"] == shard:
                return s["owner"], s["epoch"]
        raise AssertionError(f"no {shard}")


@pytest.fixture
def hosts(start_server: Any, etcd: Any, tmp_path: Path) -> Hosts:
    h = Hosts(start_server, etcd, tmp_path)
    h.start("host-a")
    h.start("host-b")
    return h


def keys_of(shard_index: int, n: int) -> list[str]:
    """``n`` keys whose slots fall in shard ``shard_index`` of 2 (slots split in halves)."""
    out = []
    i = 0
    while len(out) < n:
        key = f"tenant-{i}"
        if slot_of(key, SLOTS) // (SLOTS // 2) == shard_index:
            out.append(key)
        i += 1
    return out


def fill(url: str, keys: list[str], rows: int = 3) -> None:
    with shardlite.connect(url) as client:
        for key in keys:
            actor = client.actor(key)
            actor.sql("CREATE TABLE IF NOT EXISTS t (v INTEGER) STRICT")
            for i in range(rows):
                actor.sql("INSERT INTO t VALUES (?)", [-1 - i])


def values(url: str, key: str) -> list[int]:
    with shardlite.connect(url) as client:
        return [r[0] for r in client.actor(key).sql("SELECT v FROM t ORDER BY rowid").rows]


class Writer:
    """Inserts increasing values into keys round robin until stopped; remembers which
    were acknowledged, which failed cleanly and which are unknown (connection lost)."""

    def __init__(self, url: str, keys: list[str]) -> None:
        self.url = url
        self.keys = keys
        self.acked: dict[str, list[int]] = {k: [] for k in keys}
        self.unknown: set[int] = set()
        self.errors: list[str] = []
        self.gaps: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        last = self.start_time = time.monotonic()
        deadline = last + 120
        with shardlite.connect(self.url) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                key = self.keys[n % len(self.keys)]
                n += 1
                try:
                    client.actor(key).sql("INSERT INTO t VALUES (?)", [n])
                except shardlite.ConnectionLost:
                    self.unknown.add(n)
                    continue
                except shardlite.Error as exc:
                    self.errors.append(f"{exc.code}: {exc.message}")
                    continue
                now = time.monotonic()
                self.gaps.append(now - last)
                last = now
                self.acked[key].append(n)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while sum(map(len, self.acked.values())) < count:
            assert time.monotonic() < deadline, f"writes stalled: {self.errors[-3:]}"
            time.sleep(0.01)

    def check(self, url: str) -> None:
        """Every acknowledged write present once, nothing else but unknown outcomes."""
        for key, acked in self.acked.items():
            found = [v for v in values(url, key) if v > 0]
            assert len(found) == len(set(found)), f"{key}: duplicates {found}"
            missing = set(acked) - set(found)
            assert not missing, f"{key}: acknowledged writes lost: {sorted(missing)[:10]}"
            extra = set(found) - set(acked) - self.unknown
            assert not extra, f"{key}: writes that were refused are present: {sorted(extra)}"


def test_a_move_under_write_load_loses_nothing(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving, staying = keys_of(0, 30), keys_of(1, 5)
    fill(a.rpc_url, moving + staying)
    assert hosts.owner("shard-00") == ("host-a/0", 1)
    with Writer(a.rpc_url, moving[:10] + staying[:2]) as writer:
        writer.wait_for(200)
        out = hosts.ops("move", "shard-00", "--to", "host-b", "--json")
        report = json.loads(out.stdout)
        writer.wait_for(sum(map(len, writer.acked.values())) + 200)  # and it goes on
    assert report["actors"] == 30 and report["epoch"] == 2
    assert hosts.owner("shard-00") == ("host-b/0", 2)
    assert hosts.owner("shard-01") == ("host-a/0", 1)
    writer.check(hosts.servers["host-b"].rpc_url)
    for key in moving[10:]:  # the untouched ones came along too
        assert values(hosts.servers["host-b"].rpc_url, key) == [-1, -2, -3]
    # the files live on host-b now; host-a keeps its old copy aside (retired)
    assert list((hosts.tmp / "host-b" / "shards" / "shard-00").rglob("*.db"))
    assert not list((hosts.tmp / "host-b" / "shards").rglob("*.pull*"))  # no leftovers
    assert not (hosts.tmp / "host-a" / "shards" / "shard-00").exists()
    assert list((hosts.tmp / "host-a" / "retired").iterdir())
    print(
        f"\nmove under load: cutover {report['cutover_ms']} ms {report['cutover_steps_ms']}, "
        f"longest pause between acks {max(writer.gaps) * 1000:.0f} ms"
    )


def test_a_stale_epoch_at_the_old_owner_is_refused_with_the_new_location(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    key = keys_of(0, 1)[0]
    fill(a.rpc_url, [key])
    status = hosts.status()
    old_rpc = next(n["rpc"] for n in status["nodes"] if n["id"] == "host-a/0")
    hosts.ops("move", "shard-00", "--to", "host-b")
    write = ["sql", "INSERT INTO t VALUES (?)", [99]]
    reply = rpc_call(old_rpc, [1, key, write, None, 1])  # it thinks host-a owns it at 1
    assert reply[1] == 1 and reply[2]["code"] == "wrong_shard", reply
    assert reply[2]["owner"] == "host-b/0" and reply[2]["epoch"] == 2
    assert 99 not in values(hosts.servers["host-b"].rpc_url, key)
    # without an epoch the old owner forwards it: it lands on the new owner
    reply = rpc_call(old_rpc, [2, key, write])
    assert reply[1] == 0, reply
    assert values(hosts.servers["host-b"].rpc_url, key)[-1] == 99


@pytest.mark.parametrize("phase", ["copy", "fenced", "flipped"])
def test_a_move_whose_cli_dies_is_finished_by_resume(hosts: Hosts, phase: str) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 8)
    fill(a.rpc_url, moving)
    crashed = hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": phase}, check=False
    )
    assert crashed.returncode == 70, crashed.stderr
    (move,) = hosts.status()["moves"]  # `ops status` shows it, with its phase
    assert (move["shard"], move["phase"], move["target"]) == ("shard-00", phase, "host-b/0")
    owner = "host-b/0" if phase == "flipped" else "host-a/0"
    assert hosts.owner("shard-00")[0] == owner
    if phase != "fenced":  # exactly one owner serves meanwhile (a fence holds writes)
        fill(a.rpc_url, moving[:2], rows=1)
    again = hosts.ops("move", "shard-00", "--to", "host-b", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr
    hosts.ops("move", "shard-00", "--resume")
    assert hosts.owner("shard-00") == ("host-b/0", 2)
    assert hosts.status()["moves"] == []
    b = hosts.servers["host-b"].rpc_url
    written = 0 if phase == "fenced" else 2
    for key in moving[:written]:
        assert values(b, key) == [-1, -2, -3, -1]
    for key in moving[written:]:
        assert values(b, key) == [-1, -2, -3]
    assert hosts.ops("move", "shard-00", "--resume", check=False).returncode == 1


def test_abort_before_the_flip_leaves_the_source_serving_and_drops_the_copy(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 5)
    fill(a.rpc_url, moving)
    hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "fenced"}, check=False
    )
    hosts.ops("move", "shard-00", "--abort")
    assert hosts.owner("shard-00") == ("host-a/0", 1)
    assert not list((hosts.tmp / "host-b" / "shards" / "shard-00").rglob("*.db"))
    fill(a.rpc_url, moving[:1], rows=1)  # the source serves writes again at once
    assert values(a.rpc_url, moving[0]) == [-1, -2, -3, -1]
    out = hosts.ops("move", "shard-00", "--abort", check=False)
    assert out.returncode == 1 and "no move" in out.stderr


def test_a_source_killed_while_fenced_serves_again_after_restart(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 5)
    fill(a.rpc_url, moving)
    hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "fenced"}, check=False
    )
    a.kill()
    a = hosts.start("host-a")  # gives the fence up in the directory before serving
    fill(a.rpc_url, moving[:1], rows=1)
    assert hosts.owner("shard-00") == ("host-a/0", 1)
    hosts.ops("move", "shard-00", "--resume")
    assert hosts.owner("shard-00") == ("host-b/0", 2)
    assert values(hosts.servers["host-b"].rpc_url, moving[0]) == [-1, -2, -3, -1]


def test_bad_moves_are_refused_with_a_reason(hosts: Hosts) -> None:
    for args, words in [
        (("move", "shard-99", "--to", "host-b"), "unknown shard"),
        (("move", "shard-00", "--to", "host-z"), "host-z"),
        (("move", "shard-00", "--to", "host-a"), "already"),
        (("move", "shard-00"), "--to"),
        (("drain", "host-z"), "host-z"),
    ]:
        out = hosts.ops(*args, check=False)
        assert out.returncode != 0 and words in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert hosts.owner("shard-00") == ("host-a/0", 1)


def test_drain_moves_every_shard_off_a_host(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    keys = keys_of(0, 4) + keys_of(1, 4)
    fill(a.rpc_url, keys)
    hosts.ops("drain", "host-a")
    assert {hosts.owner(s)[0] for s in ("shard-00", "shard-01")} == {"host-b/0"}
    for key in keys:
        assert values(a.rpc_url, key) == [-1, -2, -3]  # host-a forwards; host-b serves


def test_a_fenced_shard_holds_requests_and_releases_them_in_order(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    key = keys_of(0, 1)[0]
    fill(a.rpc_url, [key], rows=0)
    status = hosts.status()
    source = next(n["rpc"] for n in status["nodes"] if n["id"] == "host-a/0")
    hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "fenced"}, check=False
    )
    done: list[Any] = []

    def write(n: int) -> None:
        done.append(rpc_call(source, [n, key, ["sql", "INSERT INTO t VALUES (?)", [n]]]))

    threads = [threading.Thread(target=write, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while "shardlite_requests_held 3.0" not in httpx.get(a.http_url + "/metrics").text:
        assert time.monotonic() < deadline, "the fenced shard did not hold the requests"
        time.sleep(0.02)
    assert not done  # held while fenced (as /metrics says)
    rpc_call(source, [9, "", ["unfence", "shard-00"]])  # what --abort does first
    for t in threads:
        t.join(10)
    assert sorted(r[0] for r in done) == [1, 2, 3] and all(r[1] == 0 for r in done)
    assert sorted(values(a.rpc_url, key)) == [1, 2, 3]


def test_a_target_killed_during_the_copy_is_restarted_and_the_move_resumed(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 6)
    fill(a.rpc_url, moving)
    hosts.ops("move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "copy"}, check=False)
    hosts.servers["host-b"].kill()
    down = hosts.ops("move", "shard-00", "--resume", check=False)
    # down: its directory record lapses with its lease; until then it cannot be reached
    assert down.returncode == 1 and (
        "host-b/0 is down" in down.stderr or "cannot reach" in down.stderr
    )
    assert hosts.owner("shard-00") == ("host-a/0", 1)
    fill(a.rpc_url, moving[:1], rows=1)  # the source never stopped serving
    b = hosts.start("host-b")
    hosts.ops("move", "shard-00", "--resume")
    assert hosts.owner("shard-00") == ("host-b/0", 2)
    assert values(b.rpc_url, moving[0]) == [-1, -2, -3, -1]
    assert values(b.rpc_url, moving[5]) == [-1, -2, -3]


def test_a_source_killed_after_the_flip_retires_its_copy_when_it_restarts(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 4)
    fill(a.rpc_url, moving)
    hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "flipped"}, check=False
    )
    a.kill()
    hosts.ops("move", "shard-00", "--resume")  # the source is down: finished without it
    a = hosts.start("host-a")
    assert not (hosts.tmp / "host-a" / "shards" / "shard-00").exists()
    assert list((hosts.tmp / "host-a" / "retired").iterdir())
    assert values(a.rpc_url, moving[0]) == [-1, -2, -3]  # forwarded to host-b


def test_an_unreachable_directory_is_a_clear_error_and_changes_nothing(hosts: Hosts) -> None:
    hosts.etcd.stop()
    out = hosts.ops("move", "shard-00", "--to", "host-b", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "etcd" in out.stderr or "directory" in out.stderr, out.stderr
    hosts.etcd.start()
    assert hosts.owner("shard-00") == ("host-a/0", 1)


def shard_files(hosts: Hosts, host: str, shard: str) -> set[str]:
    return {p.stem for p in (hosts.tmp / host / "shards" / shard).rglob("*.db")} - {"alarms"}


def test_split_under_write_load_moves_the_upper_half_of_the_files(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    keys = keys_of(0, 30)
    fill(a.rpc_url, keys)
    with Writer(a.rpc_url, keys[:12]) as writer:
        writer.wait_for(200)
        report = json.loads(hosts.ops("split", "shard-00", "--json").stdout)
        writer.wait_for(sum(map(len, writer.acked.values())) + 200)
    assert report["new_shard"] == "shard-02" and report["slots"] == [[1024, 2048]]
    shards = {s["id"]: s for s in hosts.status()["shards"]}
    assert shards["shard-00"]["slots"] == [[0, 1024]] and shards["shard-00"]["epoch"] == 2
    assert shards["shard-02"]["owner"] == "host-a/0" and shards["shard-02"]["epoch"] == 1
    upper = {k for k in keys if slot_of(k, SLOTS) >= 1024}
    assert upper and report["actors_moved"] == len(upper)
    assert shard_files(hosts, "host-a", "shard-02") == upper
    assert shard_files(hosts, "host-a", "shard-00") == set(keys) - upper
    writer.check(a.rpc_url)
    for key in keys[12:]:
        assert values(a.rpc_url, key) == [-1, -2, -3]


def test_a_split_cut_short_after_its_flip_is_finished_on_restart(hosts: Hosts) -> None:
    hosts.servers["host-a"].kill()
    a = hosts.start("host-a", env={"SHARDLITE_CRASH_AT": "split-flipped"})
    keys = keys_of(0, 10)
    fill(a.rpc_url, keys)
    out = hosts.ops("split", "shard-00", check=False)
    assert out.returncode != 0  # its owner died under it
    a.kill()
    a = hosts.start("host-a")  # renames what the split did not get to
    upper = {k for k in keys if slot_of(k, SLOTS) >= 1024}
    assert shard_files(hosts, "host-a", "shard-02") == upper
    for key in keys:
        assert values(a.rpc_url, key) == [-1, -2, -3]
    fill(a.rpc_url, keys[:1], rows=1)
    assert values(a.rpc_url, keys[0]) == [-1, -2, -3, -1]
    assert {s["id"] for s in hosts.status()["shards"]} == {"shard-00", "shard-01", "shard-02"}


def _chattr(flag: str, path: Path) -> bool:
    out = subprocess.run(["chattr", flag, str(path)], check=False, capture_output=True)
    return out.returncode == 0


def test_a_split_refuses_while_a_file_it_would_move_lacks_writes_only_the_log_holds(
    hosts: Hosts,
) -> None:
    """After a kill -9 the shard log alone holds the last writes. A file that recovery
    cannot bring up to it (an I/O error: here, the file made immutable) must not be
    carried to the new shard, which does not get this log: the split refuses, the
    shard serves whole, and once the disk is back the split carries every write."""
    from shardlite.actor import resolve_actor_path

    hosts.servers["host-a"].kill()
    quiet = ("--log-checkpoint-interval", "3600")  # no pass commits the files before the kill
    a = hosts.start("host-a", *quiet)
    keys = keys_of(0, 12)
    fill(a.rpc_url, keys)
    a.kill()
    victim = next(k for k in keys if slot_of(k, SLOTS) >= 1024)
    path = Path(resolve_actor_path(str(hosts.tmp / "host-a" / "shards" / "shard-00"), victim))
    if not _chattr("+i", path):
        pytest.skip("chattr +i is not permitted here (needs root on ext4 or alike)")
    try:
        a = hosts.start("host-a", *quiet)
        out = hosts.ops("split", "shard-00", check=False)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert "not splitting" in out.stderr and repr(victim) in out.stderr, out.stderr
        shards = {s["id"]: s for s in hosts.status()["shards"]}
        assert "shard-02" not in shards and shards["shard-00"]["slots"] == [[0, 2048]]
        for key in keys:
            if key != victim:
                assert values(a.rpc_url, key) == [-1, -2, -3]
    finally:
        assert _chattr("-i", path)
    wait_until(lambda: _readable(a.rpc_url, victim))  # the recovery tries it again
    report = json.loads(hosts.ops("split", "shard-00", "--json").stdout)
    assert report["new_shard"] == "shard-02"
    upper = {k for k in keys if slot_of(k, SLOTS) >= 1024}
    assert shard_files(hosts, "host-a", "shard-02") == upper
    for key in keys:
        assert values(a.rpc_url, key) == [-1, -2, -3]


def _readable(url: str, key: str) -> bool:
    try:
        return values(url, key) == [-1, -2, -3]
    except shardlite.Unavailable:
        return False


def file_lsn(path: Path) -> int:
    import apsw

    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.execute("SELECT lsn FROM _shardlite_lsn").fetchall()[0][0])
    finally:
        conn.close()


def test_the_new_owners_log_positions_are_above_the_copied_files(hosts: Hosts) -> None:
    """Recovery replays the records above the position a file holds: the copy's shard
    log must start above every position the copied files hold, or a power cut on the
    new owner would skip its own acknowledged writes."""
    a = hosts.servers["host-a"]
    keys = keys_of(0, 3)
    fill(a.rpc_url, keys)
    hosts.ops("move", "shard-00", "--to", "host-b")
    (retired,) = (hosts.tmp / "host-a" / "retired").iterdir()
    before = {p.stem: file_lsn(p) for p in retired.rglob("*.db") if p.stem != "alarms"}
    b = hosts.servers["host-b"]
    fill(b.rpc_url, keys, rows=1)
    b.terminate()
    after = {
        p.stem: file_lsn(p)
        for p in (hosts.tmp / "host-b" / "shards" / "shard-00").rglob("*.db")
        if p.stem != "alarms"
    }
    assert set(before) == set(after) == set(keys)
    for key in keys:
        assert after[key] >> 40 > before[key] >> 40 > 0, (key, hex(before[key]), hex(after[key]))
    b = hosts.start("host-b")
    for key in keys:
        assert values(b.rpc_url, key) == [-1, -2, -3, -1]


def test_a_target_killed_after_the_flip_serves_its_copy_when_it_restarts(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    moving = keys_of(0, 4)
    fill(a.rpc_url, moving)
    hosts.ops(
        "move", "shard-00", "--to", "host-b", env={"SHARDLITE_CRASH_AT": "flipped"}, check=False
    )
    hosts.servers["host-b"].kill()
    b = hosts.start("host-b")  # owns shard-00 now: its copy was durable before the flip
    hosts.ops("move", "shard-00", "--resume")
    assert hosts.owner("shard-00") == ("host-b/0", 2)
    for key in moving:
        assert values(b.rpc_url, key) == [-1, -2, -3]


def test_a_backup_restored_into_the_wrong_shard_is_refused(hosts: Hosts) -> None:
    a = hosts.servers["host-a"]
    keys = keys_of(0, 3)
    fill(a.rpc_url, keys)
    out = json.loads(
        hosts.ops("backup", "shard-00", "--to", str(hosts.tmp / "bk"), "--json").stdout
    )
    refused = hosts.ops("restore", "shard-01", "--from", out["path"], check=False)
    assert refused.returncode == 1 and "belongs to shard-00" in refused.stderr, refused.stderr
    assert values(a.rpc_url, keys[0]) == [-1, -2, -3]
