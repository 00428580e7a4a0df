"""Section recovery: restart after a crash (kill -9 under load), beside PostgreSQL.

Per run and key count, on N actor files (table t, one row each):

1. ``shardlite serve --durability log`` (one process, CPU 0) is started and timed until
   it prints its ready line: a clean start, the baseline;
2. single-row INSERTs over uniform keys, pipelined from CPU 1, for ``LOAD_S``; then the
   server is killed (SIGKILL) mid-load;
3. a new ``serve`` on the same data is timed until ready: it reads the log and serves,
   while a background task brings each actor file up to the records it lacks (a key
   called before its turn is brought up first); then timed, by its /metrics, until that
   recovery is over (every file durable); and right after ready, a first call to each of
   ``FIRST_CALLS`` keys spread over the key space is timed.

PostgreSQL in the same run: pgbench inserts (64 clients) for ``LOAD_S`` into a fresh
cluster, every process of the cluster SIGKILLed, ``pg_ctl start -w`` timed (crash
recovery replays the WAL since the last checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
import urllib.request
from typing import Any

from . import pg, rpc_load
from .common import (
    Options,
    SectionResult,
    fmt,
    header,
    md_table,
    metrics,
    ratio,
    serve_shardlite,
    stat,
)
from .data import actor_files

NAME = "recovery"
TITLE = "Restart after a crash (kill -9 under load)"
DEFAULT_RUNS = 3
LOAD_S = 25.0
"""Just under one log checkpoint interval (30 s, counted from the server's start): with
the default --log-batches-per-commit 64 and keys that see few writes each, the files
then lack about every batch since the start, so recovery has the most to apply."""
KEYS = (1_000, 10_000)
FIRST_CALLS = 20
RECOVERED_WAIT_S = 300.0
PG_CLIENTS = 64
MAX_OPEN = "100000"


def _start(data: str) -> tuple[Any, float, str, int]:
    """Start a server on ``data``; (it, seconds until ready, its HTTP URL, RPC port)."""
    began = time.perf_counter()
    server, http, port = serve_shardlite(data, "log", "--max-open-actors", MAX_OPEN)
    return server, time.perf_counter() - began, http, port


def _shardlite_run(data: str, keys: int, seconds: float) -> dict[str, Any]:
    server, clean_s, _, port = _start(data)
    names = [rpc_load.key_name(i) for i in range(keys)]
    frames = rpc_load.templates(names, rpc_load.insert_op)

    def load() -> None:
        with contextlib.suppress(OSError, RuntimeError):  # it ends when the server dies
            rpc_load.run(port, frames, seconds=seconds + 60, draw="uniform")

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(seconds)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    server.stop()
    loader.join(90)
    began = time.perf_counter()
    again, restart_s, http, _ = _start(data)
    with again:
        first_ms = [_call_ms(http, name) for name in names[:: max(1, keys // FIRST_CALLS)]]
        while True:
            m = metrics(http)
            if not m["shardlite_log_recovering_actors"]:
                break
            if time.perf_counter() - began > RECOVERED_WAIT_S:
                raise RuntimeError(f"recovery not over in {RECOVERED_WAIT_S:g} s")
            time.sleep(0.05)
        recovered_s = time.perf_counter() - began
    return {
        "clean_s": clean_s,
        "restart_s": restart_s,
        "recovered_s": recovered_s,
        "first_ms": statistics.median(first_ms),
        "records": m["shardlite_log_recovered_records_total"],
        "read_us": 1e6
        * m["shardlite_log_read_seconds_total"]
        / max(1.0, m["shardlite_log_recovered_records_total"]),
        "replayed": int(m["shardlite_log_recovered_actors_total"]),
    }


def _call_ms(http: str, key: str) -> float:
    """One read of ``key`` over HTTP (its first call since the restart), in ms."""
    body = json.dumps({"sql": "SELECT count(*) FROM t"}).encode()
    req = urllib.request.Request(f"{http}/v1/actors/{key}/sql", data=body, method="POST")
    began = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
    return (time.perf_counter() - began) * 1000


def _pg_run(cluster: pg.Cluster, keys: int, seconds: float) -> dict[str, Any]:
    cluster.start()
    postmaster = cluster.pid
    load = cluster.start_load(keys, PG_CLIENTS, seconds + 60)
    try:
        time.sleep(seconds)
        victims = [postmaster, *_children(postmaster)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") for pid in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {victims} outlived SIGKILL")
            time.sleep(0.01)
    finally:
        load.kill()
        load.wait(30)
    began = time.perf_counter()
    cluster.start()
    restart_s = time.perf_counter() - began
    cluster.stop()
    return {"restart_s": restart_s}


def _children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == parent:
                found.append(int(name))
    return found


def run(opts: Options) -> SectionResult:
    seconds = 1.0 if opts.quick else LOAD_S
    sizes = (200,) if opts.quick else KEYS
    missing = pg.available()
    results: dict[int, list[dict[str, Any]]] = {keys: [] for keys in sizes}
    pg_results: dict[int, list[dict[str, Any]]] = {keys: [] for keys in sizes}
    with contextlib.ExitStack() as stack:
        cluster = None
        if not missing:
            cluster = stack.enter_context(pg.Cluster(max_connections=PG_CLIENTS + 20))
        for i in range(opts.runs):
            for keys in sizes:
                dest = os.path.join(opts.workdir, f"recovery-{keys}-{i}")
                r = _shardlite_run(actor_files(opts.cache, keys, dest), keys, seconds)
                results[keys].append(r)
                print(
                    f"  recovery run {i + 1}, {keys:,} keys: clean start {r['clean_s']:.2f} s, "
                    f"after kill -9 {r['restart_s']:.2f} s, a first call {r['first_ms']:.1f} ms, "
                    f"every file recovered {r['recovered_s']:.2f} s ({r['records']:,} log records)"
                )
                if cluster is not None:
                    p = _pg_run(cluster, keys, seconds)
                    pg_results[keys].append(p)
                    print(
                        f"  recovery run {i + 1}, PostgreSQL: after kill -9 {p['restart_s']:.2f} s"
                    )
    return _report(opts, results, pg_results, seconds, missing)


def _report(
    opts: Options,
    results: dict[int, list[dict[str, Any]]],
    pg_results: dict[int, list[dict[str, Any]]],
    seconds: float,
    missing: str,
) -> SectionResult:
    rows = []
    for keys, runs in results.items():
        clean = stat([r["clean_s"] for r in runs])
        crash = stat([r["restart_s"] for r in runs])
        recovered = stat([r["recovered_s"] for r in runs])
        pg_runs = pg_results[keys]
        pg_crash = stat([p["restart_s"] for p in pg_runs]) if pg_runs else None
        rows.append(
            [
                f"{keys:,}",
                fmt(stat([r["records"] for r in runs])),
                fmt(stat([r["read_us"] for r in runs])),
                f"{max(r['replayed'] for r in runs):,}",
                fmt(clean),
                fmt(crash),
                ratio(crash, clean),
                fmt(stat([r["first_ms"] for r in runs])),
                fmt(recovered),
                fmt(pg_crash) if pg_crash else "—",
                ratio(crash, pg_crash) if pg_crash else "—",
            ]
        )
    table = md_table(
        [
            "keys",
            "log records at the kill",
            "reading the log, µs a record",
            "files that lacked writes (most in a run)",
            "clean start, s",
            "serving after kill -9, s",
            "÷ clean start",
            "a key's first call then, ms (median)",
            "every file recovered, s",
            "PostgreSQL after kill -9, s",
            "serving ÷ PostgreSQL",
        ],
        rows,
    )
    notes = (
        f"Each run: `shardlite serve --durability log` on {', '.join(f'{k:,}' for k in results)} "
        f"actor files (one process, CPU 0), single-row INSERTs over uniform keys from CPU 1 "
        f"(4 connections × 64 in flight) for {seconds:g} s, then SIGKILL. Times run from "
        "starting the command until its ready line, Python's start included. After a kill -9 "
        "the actor files keep every write they committed (the page cache survives), but with "
        "the default `--log-batches-per-commit 64` a file commits once every 64 batches and "
        "at each log checkpoint, so the batches its open transaction held die with the "
        "process, as after a power cut. The restart reads the log and serves; a background "
        "task then applies to each file the records it lacks (the files-that-lacked-writes "
        "column; an open of each file the log names, about 1.6 ms apiece) and makes them "
        "durable with one syncfs: the every-file-recovered column, from the command's start, "
        "read off `shardlite_log_recovering_actors` in /metrics. A key called before its turn "
        f"is brought up first: the first-call column is the median of {FIRST_CALLS} reads over "
        "HTTP of keys spread over the key space, one after the other, right after the ready "
        "line. Reading the log: the restart's time in `ShardLog.open` (all shards, in worker "
        "threads, before serving; `shardlite_log_read_seconds_total`) over the records read. "
        "The log keeps its active segment (`--log-segment-bytes`, 16 MiB) and the "
        "segments not yet covered by the checkpointer's sync of the files. "
        f"PostgreSQL: pgbench, {PG_CLIENTS} clients, one insert per transaction into a fresh "
        f"cluster for {seconds:g} s, then SIGKILL to every process of the cluster, and "
        "`pg_ctl start -w` (crash recovery replays the WAL since its last checkpoint)."
        + (f" PostgreSQL not measured: {missing}." if missing else "")
        + f" Figures: median [min–max] over {opts.runs} runs."
    )
    body = "\n\n".join([header(NAME, opts, DEFAULT_RUNS), table, notes])
    console = [" | ".join(r) for r in rows]
    return SectionResult(NAME, body, console)
