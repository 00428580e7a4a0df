"""The load harness: options, histogram merging, open-loop math, and real short runs
against a real `shardlite serve` and a real PostgreSQL."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from shardlite.loadtest._engine import Pacer, Recorder
from shardlite.loadtest._postgres import PostgresServer, missing
from shardlite.loadtest._run import merge
from shardlite.loadtest._spec import (
    KeyChooser,
    LoadSpec,
    parse_dist,
    parse_duration,
    parse_target,
)
from shardlite.ops.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- options


def test_durations_distributions_targets() -> None:
    assert parse_duration("30s") == 30.0
    assert parse_duration("2m") == 120.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("7") == 7.0
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    assert parse_dist("uniform") == ("uniform", 0.0)
    assert parse_dist("zipf:1.3") == ("zipf", 1.3)
    assert parse_dist("zipf") == ("zipf", 1.1)
    for bad in ("zipf:x", "zipf:0", "hot:2", "gauss"):
        with pytest.raises(ValueError):
            parse_dist(bad)
    assert parse_target("rpc://127.0.0.1:7070").kind == "rpc"
    assert parse_target("postgresql://u@localhost/db").port == 5432
    with pytest.raises(ValueError, match="not a loopback address"):
        parse_target("rpc://10.1.2.3:7070")
    assert parse_target("rpc://10.1.2.3:7070", allow_remote=True).host == "10.1.2.3"
    with pytest.raises(ValueError, match="expected rpc://"):
        parse_target("ftp://127.0.0.1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--target is required"),
        (["--target", "rpc://127.0.0.1:1", "--scenario", "nope"], "Invalid value for '--scenario'"),
        (["--target", "rpc://127.0.0.1:1", "--keys", "0"], "Invalid value for '--keys'"),
        (["--target", "rpc://127.0.0.1:1", "--duration", "fast"], "not a duration"),
        (["--target", "rpc://127.0.0.1:1", "--dist", "zipf:-1"], "above 0"),
        (["--target", "rpc://127.0.0.1:1", "--read-ratio", "2"], "--read-ratio"),
        (["--target", "rpc://127.0.0.1:1", "--scenario", "call"], "needs --method"),
        (["--target", "rpc://127.0.0.1:1", "--args", "{}"], "--args"),
        (["--target", "rpc://192.0.2.1:1"], "not a loopback address"),
        (
            ["--target", "postgres://u@127.0.0.1/db", "--scenario", "call", "--method", "m"],
            "shardlite target",
        ),
    ],
)
def test_invalid_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["loadtest", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_key_distributions() -> None:
    spec = LoadSpec(target="rpc://127.0.0.1:1", keys=1000, dist="zipf", zipf_s=1.1)
    chooser = KeyChooser(spec, 0, 1)
    draws = [chooser.next() for _ in range(20_000)]
    assert all(0 <= d < 1000 for d in draws)
    top = draws.count(0) / len(draws)
    assert 0.1 < top < 0.2  # zipf 1.1 over 1000 keys: the first key gets about 14%
    cold = KeyChooser(LoadSpec(target="x://", keys=10, dist="cold"), 1, 2)
    assert [cold.next() for _ in range(5)] == [1, 3, 5, 7, 9]  # each key once, per process
    hot = KeyChooser(LoadSpec(target="x://", keys=10, dist="hot"), 0, 1)
    assert {hot.next() for _ in range(50)} == {0}


# ---------------------------------------------------------------------- histograms


def test_histograms_merge_across_generators() -> None:
    spec = LoadSpec(target="rpc://127.0.0.1:1")
    parts = []
    all_values: list[float] = []
    for worker in range(3):
        rec = Recorder(100.0, lambda p: None)
        for i in range(1000):
            latency = (worker * 1000 + i + 1) / 1e6  # 1 µs .. 3 ms, each once
            all_values.append(latency)
            rec.record(100.0 + i / 1000, latency, ("overloaded", "busy") if i % 100 == 0 else None)
        parts.append(rec.result(wall=1.0, cpu=0.5))
    result = merge(spec, parse_target(spec.target), parts, {"server": "test"})
    assert result["requests"] == 3000
    assert result["errors_by_code"] == {"overloaded": 30}
    reference = HdrHistogram(1, 60_000_000, 3)
    for v in all_values:
        reference.record_value(int(v * 1e6))
    for q, key in ((50.0, "p50"), (99.0, "p99"), (99.9, "p999")):
        assert result["latency_ms"][key] == reference.get_value_at_percentile(q) / 1000
    assert result["latency_ms"]["p50"] == pytest.approx(1.5, rel=0.01)
    assert sum(s["requests"] for s in result["series"]) == 3000
    assert result["series"][0]["errors"] == 30


# ---------------------------------------------------------------------- open loop


def test_open_loop_schedule_and_intended_time_latency() -> None:
    spec = LoadSpec(target="rpc://127.0.0.1:1", rate=2000.0, duration_s=1.0)
    pacer = Pacer(spec, procs=2, start=10.0)  # 1000/s for this process
    assert pacer.due(10.0) == 1  # request 0 is due at the start
    assert pacer.due(10.0105) == 11  # requests 0..10 are due by 10.5 ms
    pacer.issued = 11
    assert pacer.intended() == pytest.approx(10.011)
    assert pacer.wait(10.0105) == pytest.approx(0.0005)
    # the server stalls 200 ms: the requests it held are late by what they waited, counted
    # from when they were meant to leave, not from when the generator got to send them
    rec = Recorder(10.0, lambda p: None)
    stall_end = 10.2
    for k in range(200):
        intended = 10.0 + k / 1000
        rec.record(stall_end + 0.001, stall_end + 0.001 - intended)
    assert rec.hist.get_max_value() >= 200_000  # 200 ms for the first request
    assert rec.hist.get_value_at_percentile(50) >= 100_000
    assert pacer.due(11.5) == 0  # past the duration: nothing more
    closed = Pacer(LoadSpec(target="x://", max_requests=10), procs=1, start=0.0)
    assert closed.due(0.5) == 10  # closed loop: as many as allowed
    closed.issued = 10
    assert closed.finished(0.5)


# ---------------------------------------------------------------------- real runs


def run_cli(tmp_path: Path, name: str, *args: str) -> tuple[Any, dict[str, Any] | None]:
    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(
        main, ["loadtest", *args, "--out", str(out), "--quiet"], catch_exceptions=False
    )
    data = json.loads(out.read_text()) if out.exists() else None
    return result, data


def test_short_runs_against_shardlite(start_server: Any, tmp_path: Path) -> None:
    server = start_server("--procs", "1", "--durability", "os")
    result, data = run_cli(
        tmp_path,
        "insert",
        *("--target", server.rpc_url, "--scenario", "insert", "--keys", "50"),
        *("--dist", "zipf:1.1", "--duration", "2s", "--concurrency", "32", "--procs", "2"),
    )
    assert result.exit_code == 0, result.output
    assert data is not None and data["requests"] > 100 and data["errors"] == 0
    assert data["config"]["dist"] == "zipf" and data["config"]["procs"] == 2
    assert len(data["series"]) >= 2 and data["latency_ms"]["p99"] >= data["latency_ms"]["p50"] > 0
    assert (tmp_path / "insert.png").read_bytes().startswith(PNG_MAGIC)
    assert "req/s" in result.output and "p99.9" in result.output
    with __import__("shardlite").connect(server.rpc_url) as client:
        stored = sum(
            client.actor(f"lt-{i}").sql("SELECT count(*) FROM lt").rows[0][0] for i in range(50)
        )
    assert stored == data["requests"]  # every acknowledged insert is there, once

    result, data = run_cli(
        tmp_path,
        "mixed-http",
        *("--target", server.http_url, "--scenario", "mixed", "--keys", "20", "--rows", "10"),
        *("--rate", "300", "--duration", "2s", "--concurrency", "8"),
    )
    assert result.exit_code == 0, result.output
    assert data is not None and data["errors"] == 0
    assert 450 <= data["requests"] <= 610  # open loop: 300/s for 2 s

    # a run where every request fails: the error table, and a non-zero exit
    result, data = run_cli(
        tmp_path,
        "broken",
        *("--target", server.rpc_url, "--scenario", "read", "--keys", "5", "--no-setup"),
        *("--key-prefix", "never-set-up-"),
        *("--duration", "1s", "--concurrency", "4", "--no-plot"),
    )
    assert result.exit_code == 3, result.output
    assert data is not None and data["error_rate"] == 1.0
    assert list(data["errors_by_code"]) == ["sql_error"]
    assert "no such table" in result.output


def test_unreachable_target_fails_before_the_run(tmp_path: Path) -> None:
    from tests.conftest import free_port

    result, data = run_cli(tmp_path, "none", "--target", f"rpc://127.0.0.1:{free_port()}")
    assert result.exit_code == 1 and "cannot reach" in result.output
    assert data is None


@pytest.fixture
def postgres() -> Any:
    absent = missing()
    assert not absent, f"PostgreSQL is needed for the peer comparison (missing: {absent})"
    # under /tmp, not pytest's tmp_path: as root the server runs as the postgres user,
    # which cannot enter root's private pytest directories
    where = tempfile.mkdtemp(prefix="shardlite-test-pg-")
    try:
        with PostgresServer(where, max_connections=50) as pg:
            yield pg
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_short_run_against_postgres_and_compare(
    postgres: PostgresServer, start_server: Any, tmp_path: Path
) -> None:
    common = ("--scenario", "insert", "--keys", "100", "--duration", "2s", "--concurrency", "8")
    result, pg_data = run_cli(tmp_path, "pg", "--target", postgres.url, *common)
    assert result.exit_code == 0, result.output
    assert pg_data is not None and pg_data["requests"] > 50 and pg_data["errors"] == 0
    assert pg_data["target"]["server"].startswith("PostgreSQL")
    assert (tmp_path / "pg.png").read_bytes().startswith(PNG_MAGIC)
    rows = int(postgres.psql("postgres", "SELECT count(*) FROM lt"))
    assert rows == pg_data["requests"]

    server = start_server("--procs", "1")
    result, sl_data = run_cli(tmp_path, "sl", "--target", server.rpc_url, *common)
    assert result.exit_code == 0 and sl_data is not None

    cmp = CliRunner().invoke(
        main,
        ["loadtest", "compare", str(tmp_path / "pg.json"), str(tmp_path / "sl.json"), "--json"],
    )
    assert cmp.exit_code == 0, cmp.output
    table = json.loads(cmp.output)
    assert table["baseline"] == "pg.json"
    assert table["rows"]["req/s"]["sl.json"] == sl_data["throughput"]
    shown = CliRunner().invoke(
        main, ["loadtest", "compare", str(tmp_path / "pg.json"), str(tmp_path / "sl.json")]
    )
    assert "×" in shown.output and "req/s" in shown.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    refused = CliRunner().invoke(main, ["loadtest", "compare", str(bad), str(tmp_path / "sl.json")])
    assert refused.exit_code == 1 and "not a shardlite loadtest result" in refused.output
