"""Section actors: method calls vs raw SQL over RPC, and a shard with 100,000 pending alarms.

Part 1. One ``shardlite serve --app benchmarks.actor_app:Bench`` per durability (``os``
shows the CPU cost of the method layer, ``log`` is the default), pinned to the server
CPU; the pipelined generator (``rpc_load``) on the load CPU sends, in rounds:
the raw statement ``UPDATE counter SET n = n + 1 WHERE id = 1 RETURNING n`` as a ``sql``
call, the method ``hit`` running that same statement, and the trivial method ``noop``.

Part 2. A server with N actor files (``os``): the counter's req/s on 64 keys, then 10
alarms set on every actor (N × 10 pending, a day ahead), the counter again, a restart
(the scheduler loads the alarm index), then every alarm re-set to one instant and the
time until all of them have run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from shardlite.actor import CallMethod

from . import rpc_load
from .actor_app import COUNTER_SQL
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
    status_kib,
)
from .data import actor_files

NAME = "actors"
TITLE = "Actor classes: method calls vs raw SQL, and 100,000 pending alarms"
DEFAULT_RUNS = 3
APP = "benchmarks.actor_app:Bench"
CONNS, WINDOW = 8, 64
KEY_COUNTS = (1, 64)
DURABILITIES = ("os", "log")
OPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("raw sql: the counter's UPDATE … RETURNING", ("--sql", COUNTER_SQL)),
    ("method hit (the counter)", ("--method", "hit")),
    ("method noop (trivial)", ("--method", "noop")),
)
ALARMS_PER_KEY = 20
ALARM_KEYS = 5000
"""5,000 actors × 20 alarms: 100,000 pending, every actor open (10,000 files would
exceed this box's open-file cap of about 9,870 actors, and the LRU would reopen a file
per call: the cliff the rpc and durable sections show)."""
IDLE = ("--idle-timeout", "3600", "--log-checkpoint-interval", "3600")


class Case:
    def __init__(self, durability: str, keys: int, label: str, args: tuple[str, ...]) -> None:
        self.durability, self.keys, self.label, self.args = durability, keys, label, args
        self.runs: list[dict[str, Any]] = []


def _measure(
    server: Child, port: int, keys: int, args: tuple[str, ...], seconds: float
) -> dict[str, Any]:
    cpu0 = server.cpu()
    cmd = python_cmd(
        "benchmarks.rpc_load",
        *("--port", str(port), "--keys", str(keys), "--conns", str(CONNS)),
        *("--window", str(WINDOW), "--seconds", str(seconds), *args),
        cpu="1",
    )
    r = run_json(cmd, timeout=seconds + 120)
    cpu = server.cpu() - cpu0
    r["us_per_req"] = cpu / r["requests"] * 1e6 if r["requests"] else 0.0
    return r


def _once(port: int, keys: int, op: Any, conns: int = CONNS) -> dict[str, Any]:
    names = [rpc_load.key_name(i) for i in range(keys)]
    r = rpc_load.run(
        port, rpc_load.templates(names, lambda i: op), conns=conns, window=WINDOW, once=True
    )
    if r["errors"]:
        raise RuntimeError(f"{op}: {r['errors']} errors, first {r['first_error']}")
    return r


def _methods(opts: Options, seconds: float) -> list[Case]:
    cases = [
        Case(d, k, label, args) for d in DURABILITIES for k in KEY_COUNTS for label, args in OPS
    ]
    servers: dict[str, tuple[Child, int]] = {}
    try:
        for d in DURABILITIES:
            data = os.path.join(opts.workdir, f"methods-{d}")
            server, _, port = serve_shardlite(data, d, "--app", APP, *IDLE)
            servers[d] = (server, port)
            _once(port, max(KEY_COUNTS), CallMethod("noop"))  # create + migrate (untimed)
        for case in cases:  # warm-up
            server, port = servers[case.durability]
            _measure(server, port, case.keys, case.args, 0.3 if opts.quick else 1.0)
        for round_no in range(opts.runs):
            for case in cases:
                server, port = servers[case.durability]
                case.runs.append(_measure(server, port, case.keys, case.args, seconds))
                print(
                    f"  actors round {round_no + 1}: {case.durability} {case.keys} keys "
                    f"{case.label}: {num(case.runs[-1]['rps'])} req/s"
                )
    finally:
        for server, _ in servers.values():
            server.stop()
    return cases


def _alarms(opts: Options, seconds: float) -> dict[str, Any]:
    keys = 250 if opts.quick else ALARM_KEYS
    n = keys * ALARMS_PER_KEY
    out: dict[str, Any] = {"keys": keys, "alarms": n}
    data = actor_files(opts.cache, keys, os.path.join(opts.workdir, "alarms"))
    extra = ("--app", APP, "--max-open-actors", str(keys + 16), *IDLE)
    hit = ("--method", "hit")
    t0 = time.perf_counter()
    server, http, port = serve_shardlite(data, "os", *extra)
    out["start_s_without"] = time.perf_counter() - t0
    try:
        _once(port, keys, CallMethod("noop"))  # open + migrate every actor (untimed)
        out["rss_kib_without"] = status_kib(server.proc.pid, "VmRSS")
        out["rps_without"] = stat(
            [_measure(server, port, 64, hit, seconds)["rps"] for _ in range(opts.runs)]
        )
        r = _once(port, keys, CallMethod("arm", [ALARMS_PER_KEY, time.time() + 86400]))
        out["set_per_s"] = n / r["seconds"]
        out["pending_actors"] = metrics(http)["shardlite_actors_with_alarms"]
        out["rps_with"] = stat(
            [_measure(server, port, 64, hit, seconds)["rps"] for _ in range(opts.runs)]
        )
        out["rss_kib_with"] = status_kib(server.proc.pid, "VmRSS")
        # every alarm moved to one instant, after re-arming (all actors open) is done
        at = time.time() + 3 * r["seconds"] + 2.0
        _once(port, keys, CallMethod("arm", [ALARMS_PER_KEY, at]))
        if time.time() > at:
            raise RuntimeError("re-arming took longer than its lead time")
        goal = metrics(http)["shardlite_alarms_run_total"] + n
        cpu0 = server.cpu()
        deadline = time.time() + 600
        while metrics(http)["shardlite_alarms_run_total"] < goal:
            if time.time() > deadline:
                raise RuntimeError("the alarms did not all run within 10 minutes")
            time.sleep(0.05)
        out["fire_s"] = time.time() - at
        out["fired_per_s"] = n / out["fire_s"]
        out["fire_cpu_s"] = server.cpu() - cpu0
        _once(port, keys, CallMethod("arm", [ALARMS_PER_KEY, time.time() + 86400]))
    finally:
        server.stop()
    t0 = time.perf_counter()
    server, http, port = serve_shardlite(data, "os", *extra)  # the index: no file opened
    out["start_s_with"] = time.perf_counter() - t0
    try:
        out["pending_after_restart"] = metrics(http)["shardlite_actors_with_alarms"]
        out["opened_at_start"] = metrics(http)["shardlite_actor_opens_total"]
    finally:
        server.stop()
    return out


def run(opts: Options) -> SectionResult:
    seconds = 0.5 if opts.quick else 5.0
    cases = _methods(opts, seconds)
    alarms = _alarms(opts, seconds)
    return _report(opts, cases, alarms, seconds)


def _col(case: Case, key: str) -> Stat:
    return stat([r[key] for r in case.runs])


def _report(opts: Options, cases: list[Case], a: dict[str, Any], seconds: float) -> SectionResult:
    rows = []
    console = []
    for case in cases:
        base = next(c for c in cases if c.durability == case.durability and c.keys == case.keys)
        rps = _col(case, "rps")
        rows.append(
            [
                f"`{case.durability}`, {case.keys} key{'s' * (case.keys > 1)}",
                case.label,
                fmt(rps),
                ratio(rps, _col(base, "rps")),
                fmt(_col(case, "p50_ms")),
                fmt(_col(case, "p99_ms")),
                fmt(_col(case, "us_per_req")),
                str(sum(r["errors"] for r in case.runs)),
            ]
        )
        console.append(
            f"{case.durability} {case.keys:>2} keys {case.label:44} {num(rps.median):>8} req/s"
        )
    table = md_table(
        [
            "server",
            "call",
            "req/s",
            "÷ raw sql",
            "p50 ms",
            "p99 ms",
            "server CPU µs/req",
            "errors",
        ],
        rows,
    )
    n = a["alarms"]
    alarm_rows = [
        ["counter `hit` req/s on 64 keys, no alarms", fmt(a["rps_without"])],
        [
            f"the same with {n:,} alarms pending on the shard",
            f"{fmt(a['rps_with'])} ({ratio(a['rps_with'], a['rps_without'])})",
        ],
        [
            f"alarms set per second ({ALARMS_PER_KEY} per method call, pipelined)",
            num(a["set_per_s"]),
        ],
        [
            "after a restart: actors in the alarm index / actor files opened",
            f"{a['pending_after_restart']:,.0f} of {a['keys']:,} / {a['opened_at_start']:,.0f}",
        ],
        [
            "start to ready: without / with the alarm index",
            f"{a['start_s_without']:.2f} s / {a['start_s_with']:.2f} s",
        ],
        [
            "server RSS with every actor open: before / after arming",
            f"{a['rss_kib_without'] / 1024:.0f} MiB / {a['rss_kib_with'] / 1024:.0f} MiB",
        ],
        [
            f"{n:,} alarms due at one instant: all run after",
            f"{a['fire_s']:.2f} s ({num(a['fired_per_s'])} alarms/s, {a['fire_cpu_s']:.1f} CPU-s)",
        ],
    ]
    notes = (
        f"Part 1: {CONNS} connections × {WINDOW} outstanding frames, {seconds:g} s per run, "
        f"{opts.runs} rounds, every case in each round; median [min–max]. `÷ raw sql` "
        "compares each call with the raw `sql` call of the same server and key count in the "
        "same run; `server CPU µs/req` is the server's CPU time (all threads, /proc) per "
        "request. `hit` runs the very statement the raw case sends, so the difference is "
        "the method layer: argument passing, a savepoint per call, the instance lookup, the "
        "result check.\n\n"
        f"Part 2 (`os`, {a['keys']:,} actor files, {ALARMS_PER_KEY} alarms each = {n:,} "
        "pending): one scheduler per process keeps a heap of the next alarm per actor; the "
        "shard's `alarms.db` index holds the same, so a restart does not open every file."
    )
    body = (
        header(NAME, opts, DEFAULT_RUNS)
        + "\n\n"
        + table
        + "\n\n"
        + md_table(["alarms", "figure"], alarm_rows)
        + "\n\n"
        + notes
    )
    console.append(
        f"alarms: {n:,} pending: hit {num(a['rps_with'].median)} vs {num(a['rps_without'].median)} req/s; fired {num(a['fired_per_s'])}/s"
    )
    return SectionResult(NAME, body, console)
