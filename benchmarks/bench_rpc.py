"""Section rpc: pipelined single-row INSERTs over the RPC port vs the framing ceiling.

Every server runs at once, pinned to the server CPU and idle unless measured: the bare
echo server (``echo_server.py``) and one ``shardlite serve`` per durability and key count,
each with its own copy of the actor files (built untimed by data.py), then a warm-up. The cases are
then measured in rounds, one run of every case per round, so slow drift of this noisy
box hits every case alike; the generator runs as a child pinned to the load CPU.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from . import rpc_load
from .common import (
    Child,
    Options,
    SectionResult,
    Stat,
    fmt,
    header,
    md_table,
    metrics,
    num,
    python_cmd,
    ratio,
    run_json,
    serve_shardlite,
    stat,
)
from .data import actor_files

NAME = "rpc"
TITLE = "RPC: pipelined single-row INSERTs vs the framing ceiling"
DEFAULT_RUNS = 3
CONNS, WINDOW = 8, 64
ECHO_READY = re.compile(r"echo serving rpc://127\.0\.0\.1:(\d+)")
TARGET = 0.5
DURABILITIES = ("os", "log", "fsync")
IDLE_TIMEOUT_S = 3600
"""Every server idles while the others are measured: no passivation between its runs, and
no log checkpoint (``log``) landing in another case's run."""


class Case:
    def __init__(
        self, label: str, server: Child, port: int, keys: int, http: str = "", *, mode: str = ""
    ) -> None:
        self.label, self.server, self.port, self.keys, self.http = label, server, port, keys, http
        self.mode = mode
        self.runs: list[dict[str, Any]] = []


def _key_counts(quick: bool) -> list[int]:
    return [1, 64, 1000] if quick else [1, 64, 10_000]


def _measure(case: Case, seconds: float) -> dict[str, Any]:
    before = metrics(case.http) if case.http else {}
    cpu0 = case.server.cpu()
    cmd = python_cmd(
        "benchmarks.rpc_load",
        *("--port", str(case.port), "--keys", str(case.keys)),
        *("--conns", str(CONNS), "--window", str(WINDOW), "--seconds", str(seconds)),
        cpu="1",
    )
    r = run_json(cmd, timeout=seconds + 120)
    cpu = case.server.cpu() - cpu0
    r["server_util"] = cpu / r["seconds"]
    r["per_cpu_s"] = r["requests"] / cpu if cpu else 0.0
    if case.http:
        after = metrics(case.http)
        r["opens_per_s"] = (
            after["shardlite_actor_opens_total"] - before["shardlite_actor_opens_total"]
        ) / r["seconds"]
    return r


def run(opts: Options) -> SectionResult:
    seconds = 0.5 if opts.quick else 5.0
    warm = 0.3 if opts.quick else 1.5
    cases: list[Case] = []
    servers: list[Child] = []
    try:
        echo = Child(python_cmd("benchmarks.echo_server"), ECHO_READY)
        servers.append(echo)
        assert echo.match is not None
        cases.append(Case("echo (framing ceiling)", echo, int(echo.match.group(1)), 64))
        for keys in _key_counts(opts.quick):
            for durability in DURABILITIES:
                dest = os.path.join(opts.workdir, f"{durability}-{keys}")
                data = actor_files(opts.cache, keys, dest)
                defer = ("--log-checkpoint-interval", str(IDLE_TIMEOUT_S))
                server, http, port = serve_shardlite(
                    data,
                    durability,
                    *("--max-open-actors", str(max(keys + 16, 4096))),
                    *("--idle-timeout", str(IDLE_TIMEOUT_S)),
                    *(defer if durability == "log" else ()),
                )
                servers.append(server)
                cases.append(
                    Case(
                        f"shardlite {durability}, {keys:,} key{'s' * (keys > 1)}",
                        server,
                        port,
                        keys,
                        http,
                        mode=durability,
                    )
                )
        for case in cases:  # warm-up: open every actor, fill the caches (untimed)
            if case.keys > 64:
                names = [rpc_load.key_name(i) for i in range(case.keys)]
                rpc_load.run(case.port, rpc_load.templates(names, rpc_load.insert_op), once=True)
            _measure(case, warm)
        for round_no in range(opts.runs):
            for case in cases:
                case.runs.append(_measure(case, seconds))
                print(
                    f"  rpc round {round_no + 1}: {case.label}: {num(case.runs[-1]['rps'])} req/s"
                )
                time.sleep(0.3)
        big = _key_counts(opts.quick)[-1]
        caps = {c.mode: _cap(c.server) for c in cases if c.keys == big and c.http}
    finally:
        for server in servers:
            server.stop()
    return _report(opts, cases, seconds, caps)


def _cap(server: Child) -> int:
    m = re.search(r"up to (\d+) open actors", server.log)
    return int(m.group(1)) if m else 0


def _col(case: Case, key: str) -> Stat:
    return stat([r[key] for r in case.runs])


def _report(
    opts: Options, cases: list[Case], seconds: float, caps: dict[str, int]
) -> SectionResult:
    echo = cases[0]
    echo_rps, echo_eff = _col(echo, "rps"), _col(echo, "per_cpu_s")
    rows = []
    for case in cases:
        rps, eff = _col(case, "rps"), _col(case, "per_cpu_s")
        opens = fmt(_col(case, "opens_per_s")) if case.http else "—"
        rows.append(
            [
                case.label,
                fmt(rps),
                ratio(rps, echo_rps),
                fmt(_col(case, "p50_ms")),
                fmt(_col(case, "p99_ms")),
                fmt(_col(case, "server_util")),
                fmt(eff),
                ratio(eff, echo_eff),
                fmt(_col(case, "gen_cpu_util")),
                opens,
                str(sum(r["errors"] for r in case.runs)),
            ]
        )
    table = md_table(
        [
            "server",
            "req/s",
            "÷ echo req/s",
            "p50 ms",
            "p99 ms",
            "server CPU (cores)",
            "req per server CPU-s",
            "÷ echo per CPU-s",
            "generator CPU (cores)",
            "actor opens/s",
            "error replies (all runs)",
        ],
        rows,
    )
    os_one = stat([r["rps"] for r in cases[1].runs])
    verdict = "met" if os_one.median / echo_rps.median >= TARGET else "not met"
    big = _key_counts(opts.quick)[-1]
    capped = {mode: cap for mode, cap in caps.items() if cap < big}
    lru = (
        "the file-descriptor hard limit caps open actors per process at "
        + ", ".join(f"{cap:,} with `{mode}`" for mode, cap in capped.items())
        + f" (2 descriptors per actor with `os`/`log`, 3 with `fsync`), below {big:,}, "
        "whatever `--max-open-actors` says; each connection sends its keys in a shuffled "
        'cycle, so the LRU keeps evicting and reopening files (the "actor opens/s" column).'
        if capped
        else f"all {big:,} actors stay open."
    )
    notes = (
        f"Load: {CONNS} connections × a window of {WINDOW} outstanding frames (a sliding "
        f"window), {seconds:g} s per run, {opts.runs} rounds; every run of every case in each "
        "round. Every server runs for the whole section, idle while the others are measured: "
        f"`--idle-timeout {IDLE_TIMEOUT_S}` (no actor passivated between its runs) and, for "
        f"`log`, `--log-checkpoint-interval {IDLE_TIMEOUT_S}` (an idle server's log "
        "checkpoint, which fsyncs every actor file written since the last one, would land in "
        "another case's run; the log is still trimmed past its size limit; the `durable` "
        "section runs `log` with its defaults). Figures: median "
        "[min–max] over the rounds; p50/p99 are per-request "
        "latencies from send to reply. Server CPU from /proc/PID/stat (all threads); the "
        "generator reports its own CPU (one process on CPU 1; near 1.0 means it, not the "
        "server, set the pace). Ratios: median ÷ echo median [min ÷ echo median – max ÷ "
        "echo median].\n\n"
        f"Target: shardlite `--durability os` ≥ {TARGET}× the echo ceiling in req/s. "
        f"With one key: {os_one.median / echo_rps.median:.2f}× ({verdict}).\n\n"
        f"{big:,} keys: {lru} `fsync` flushes each key's WAL on its own, one fdatasync per "
        "key per batch; `log` flushes one shard log per round for every key (the `durable` "
        "section compares the modes across key counts, with PostgreSQL)."
    )
    for case in cases:
        first = next((r["first_error"] for r in case.runs if r["errors"]), None)
        if first:
            notes += f"\n\nErrors from {case.label}, the first: `{first}`."
    echo_util = _col(echo, "server_util").median
    if echo_util < 0.9:
        notes += (
            f"\n\nThe echo server used {echo_util:.2f} of its core at this load shape: on this "
            "VM, cross-CPU wake-ups pace the ping-pong before either side saturates, so its "
            "req/s is not a pure CPU ceiling; req per server CPU-second compares capacity."
        )
    body = header(NAME, opts, DEFAULT_RUNS) + "\n\n" + table + "\n\n" + notes
    console = [f"{r[0]:30} {r[1]:>24} req/s  {r[2]}" for r in rows]
    return SectionResult(NAME, body, console)
