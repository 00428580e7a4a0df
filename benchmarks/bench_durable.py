"""Section durable: durable single-row INSERTs across keys, log vs fsync vs os vs PostgreSQL.

Every run starts its server afresh and stops it afterwards, so nothing else runs on the
server CPU (no idle server's checkpoints, passivations or trims) while a case is
measured: a shardlite server gets its own copy of the actor files (table ``t`` in each,
built untimed by data.py), a pipelined pass that opens every actor, a warm-up, then the
timed load from rpc_load (a child on the load CPU); PostgreSQL 15 (pg.py) is started on
its throwaway cluster and measured with pgbench. The cases run in rounds, one run of
every case per round, so slow drift of this noisy box hits every case alike.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from . import durable_report, pg, rpc_load
from .common import (
    Options,
    SectionResult,
    metrics,
    num,
    python_cmd,
    run_json,
    serve_shardlite,
)
from .data import DEFAULT_PAGE_SIZE, actor_files

NAME = "durable"
TITLE = durable_report.TITLE
DEFAULT_RUNS = 3
CONNS, WINDOW = 4, 64
MODES = ("log", "fsync", "os")
EACH = "log-each"
"""`log` with ``--log-batches-per-commit 1``: every batch commits its actor file (the
default, 64, commits once every 64 batches and at every log checkpoint)."""
FLOORS = {
    "apsw-lsn": "raw apsw, with the LSN row (no server)",
    "apsw": "raw apsw, no LSN row (no server)",
}
"""The floor (apsw_floor.py): the same transactions in one thread, nothing else."""
PG_CLIENTS = (64, CONNS * WINDOW)
MAX_OPEN = 100_000
"""Asked of every server: each lowers it to what its file-descriptor limit allows."""
PG_LEAD_S = 3.0
STEADY_KEYS, STEADY_AFTER_S = 1000, 40.0
"""From this many keys on, the timed window starts at least this long after the server
(a longer warm-up): thousands of growing actor WALs make the first half-minute faster
than what follows."""


class Case:
    def __init__(
        self,
        kind: str,
        keys: int,
        conns: int = CONNS,
        window: int = WINDOW,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self.kind, self.keys, self.conns, self.window = kind, keys, conns, window
        self.page_size = page_size
        self.runs: list[dict[str, Any]] = []
        self.data = ""
        self.cap = 0
        self.extra = (conns, window, page_size) != (CONNS, WINDOW, DEFAULT_PAGE_SIZE)

    @property
    def label(self) -> str:
        pages = f", {self.page_size:,}-byte pages" if self.page_size != DEFAULT_PAGE_SIZE else ""
        if self.kind.startswith("pg"):
            return f"PostgreSQL 15, {self.kind[2:]} clients"
        if self.kind in FLOORS:
            return FLOORS[self.kind] + pages
        if self.kind == EACH:
            return f"shardlite log, a file commit per batch{pages}"
        if (self.conns, self.window) != (CONNS, WINDOW):
            return f"shardlite {self.kind}, {self.conns}×{self.window} outstanding{pages}"
        return f"shardlite {self.kind}{pages}"


def _key_counts(quick: bool) -> list[int]:
    return [1, 64] if quick else [1, 64, 1000, 10_000]


UNCAPPED_KEYS = 9000
"""A contrast to 10,000: every actor stays open (below the descriptor cap), no churn."""
SMALL_PAGES = 1024
"""A contrast at 10,000 keys: actor files of 1 KiB pages (``--page-size``), a quarter of
the bytes a one-row transaction writes."""


def _cases(opts: Options, with_pg: bool) -> list[Case]:
    cases = []
    for keys in _key_counts(opts.quick):
        if keys == 10_000:
            cases += [Case(mode, UNCAPPED_KEYS) for mode in ("log", "os")]
        cases += [Case(mode, keys) for mode in (*MODES, EACH)]
        if keys >= STEADY_KEYS:  # one write per transaction: where the floor binds
            cases += [Case(kind, keys) for kind in FLOORS]
        if keys == 10_000:
            cases += [Case(kind, keys, page_size=SMALL_PAGES) for kind in ("log", "apsw-lsn")]
        if keys == 1000:  # the latency target, at PostgreSQL's c64 concurrency too
            cases.append(Case("log", keys, CONNS, 64 // CONNS))
        if with_pg:
            cases += [Case(f"pg{c}", keys) for c in (PG_CLIENTS[:1] if opts.quick else PG_CLIENTS)]
    return cases


def _load(port: int, case: Case, seconds: float) -> dict[str, Any]:
    cmd = python_cmd(
        "benchmarks.rpc_load",
        *("--port", str(port), "--keys", str(case.keys), "--draw", "uniform"),
        *("--conns", str(case.conns), "--window", str(case.window), "--seconds", str(seconds)),
        cpu="1",
    )
    return run_json(cmd, timeout=seconds + 180)


def _delta(after: dict[str, float], before: dict[str, float], name: str, secs: float) -> float:
    return (after.get(name, 0.0) - before.get(name, 0.0)) / secs


def _shardlite_run(case: Case, seconds: float, warm: float) -> dict[str, Any]:
    mode, extra = case.kind, ()
    if mode == EACH:
        mode, extra = "log", ("--log-batches-per-commit", "1")
    server, http, port = serve_shardlite(
        case.data,
        mode,
        *("--max-open-actors", str(MAX_OPEN), "--page-size", str(case.page_size)),
        *extra,
    )
    started = time.perf_counter()
    with server:
        if m := re.search(r"up to (\d+) open actors", server.log):
            case.cap = int(m.group(1))
        if case.keys > 1:  # open every actor (and write a row to each), untimed
            names = [rpc_load.key_name(i) for i in range(case.keys)]
            rpc_load.run(port, rpc_load.templates(names, rpc_load.insert_op), once=True)
        if case.keys >= STEADY_KEYS:
            warm = max(warm, STEADY_AFTER_S - (time.perf_counter() - started))
        _load(port, case, warm)
        before, cpu0 = metrics(http), server.cpu()
        window_at = time.perf_counter() - started
        r = _load(port, case, seconds)
        cpu, after = server.cpu() - cpu0, metrics(http)
    secs = r["seconds"]
    r["server_util"] = cpu / secs
    r["per_cpu_s"] = r["requests"] / cpu if cpu else 0.0
    r["opens_per_s"] = _delta(after, before, "shardlite_actor_opens_total", secs)
    r["syncs_per_s"] = _delta(after, before, "shardlite_log_flushes_total", secs) + _delta(
        after, before, "shardlite_fsync_files_total", secs
    )
    r["window_at_s"] = window_at  # from server start: where the log checkpoints fall
    return r


def _floor_run(case: Case, seconds: float, warm: float) -> dict[str, Any]:
    cmd = python_cmd(
        "benchmarks.apsw_floor",
        *("--data", case.data, "--keys", str(case.keys)),
        *("--seconds", str(seconds), "--warm", str(warm)),
        *(["--lsn"] if case.kind == "apsw-lsn" else []),
        cpu="0",
    )
    return run_json(cmd, timeout=seconds + warm + 300)


def _pg_run(cluster: pg.Cluster, case: Case, seconds: float) -> dict[str, Any]:
    cluster.start()
    try:
        return cluster.pgbench(case.keys, int(case.kind[2:]), seconds, PG_LEAD_S)
    finally:
        cluster.stop()


def run(opts: Options) -> SectionResult:
    seconds = 1.0 if opts.quick else 8.0
    warm = 0.3 if opts.quick else 1.5
    missing = pg.available()
    cases = _cases(opts, with_pg=not missing)
    for case in cases:
        if not case.kind.startswith("pg"):
            dest = os.path.join(
                opts.workdir, f"{case.kind}-{case.keys}-{case.window}-{case.page_size}"
            )
            case.data = actor_files(opts.cache, case.keys, dest, case.page_size)
    cluster = pg.Cluster(max_connections=max(PG_CLIENTS) + 20) if not missing else None
    pg_version = pg.version() if cluster else ""
    try:
        for round_no in range(opts.runs):
            for case in cases:
                if case.kind.startswith("pg"):
                    assert cluster is not None
                    r = _pg_run(cluster, case, seconds)
                elif case.kind in FLOORS:
                    r = _floor_run(case, seconds, warm)
                else:
                    r = _shardlite_run(case, seconds, warm)
                case.runs.append(r)
                print(
                    f"  durable round {round_no + 1}: {case.keys:,} keys, {case.label}: "
                    f"{num(r['rps'])} writes/s"
                    + ("" if case.kind in FLOORS else f", p99 {num(r['p99_ms'])} ms"),
                    flush=True,
                )
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    setup = durable_report.Setup(
        seconds=seconds,
        conns=CONNS,
        window=WINDOW,
        pg_clients=PG_CLIENTS,
        pg_version=pg_version,
        pg_missing=missing,
        pg_lead=PG_LEAD_S,
        pg_conf=pg.CONF,
        script=pg.SCRIPT,
        steady_keys=STEADY_KEYS,
        steady_after=STEADY_AFTER_S,
    )
    return durable_report.report(NAME, opts, DEFAULT_RUNS, cases, setup)
