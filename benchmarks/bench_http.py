"""Section http: ``POST /v1/actors/{key}/sql`` (one INSERT) vs a no-op quart-trio endpoint.

Load from wrk (one thread, pinned to the load CPU, body from ``post.lua``); every server
runs at once, pinned to the server CPU and idle unless measured, and the cases are
measured in rounds so the box's drift hits them alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from typing import Any

from .common import (
    CREATE_SQL,
    LOAD_CPU,
    Child,
    Options,
    SectionResult,
    fmt,
    header,
    md_table,
    num,
    python_cmd,
    ratio,
    serve_shardlite,
    stat,
)

NAME = "http"
TITLE = "HTTP: POST /v1/actors/{key}/sql vs a no-op quart-trio endpoint"
DEFAULT_RUNS = 3
CONCURRENCY = (16, 64)
KEY = "bench-http"
NOOP_READY = re.compile(r"noop serving (http://\S+)")
LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "post.lua")
TARGET = 0.9


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, conns: int, seconds: int) -> dict[str, Any]:
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
    cmd += ["--latency", "-s", LUA, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    text = out.stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (total and rps and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    return {
        "requests": int(total.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": _to_ms(p50.group(1)),
        "p99_ms": _to_ms(p99.group(1)),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(map(int, sock.groups())) if sock else 0),
    }


def _post(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


class Target:
    def __init__(self, label: str, server: Child, url: str) -> None:
        self.label, self.server, self.url = label, server, url
        self.runs: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}


def _measure(target: Target, conns: int, seconds: int) -> dict[str, Any]:
    cpu0 = target.server.cpu()
    t0 = time.perf_counter()
    r = wrk(target.url, conns, seconds)
    r["server_util"] = (target.server.cpu() - cpu0) / (time.perf_counter() - t0)
    return r


def run(opts: Options) -> SectionResult:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install -y wrk)")
    seconds = 1 if opts.quick else 5
    targets: list[Target] = []
    try:
        noop = Child(python_cmd("benchmarks.noop_app"), NOOP_READY)
        assert noop.match is not None
        targets.append(Target("no-op quart-trio endpoint (baseline)", noop, noop.match.group(1)))
        for durability in ("os", "fsync"):
            data = os.path.join(opts.workdir, f"http-{durability}")
            server, http, _ = serve_shardlite(data, durability)
            targets.append(Target(f"shardlite, durability {durability}", server, http))
        for t in targets:
            t.url += f"/v1/actors/{KEY}/sql"
            _post(t.url, {"sql": CREATE_SQL})
            wrk(t.url, CONCURRENCY[0], 1)  # warm-up
        for round_no in range(opts.runs):
            for t in targets:
                for conns in CONCURRENCY:
                    r = _measure(t, conns, seconds)
                    t.runs[conns].append(r)
                    print(f"  http round {round_no + 1}: {t.label} c{conns}: {num(r['rps'])} req/s")
    finally:
        for t in targets:
            t.server.stop()
    return _report(opts, targets, seconds)


def _report(opts: Options, targets: list[Target], seconds: int) -> SectionResult:
    rows = []
    verdicts = []
    for conns in CONCURRENCY:
        base = stat([r["rps"] for r in targets[0].runs[conns]])
        for t in targets:
            runs = t.runs[conns]
            rps = stat([r["rps"] for r in runs])
            util = stat([r["server_util"] for r in runs])
            per_cpu = stat([r["rps"] / r["server_util"] for r in runs])
            rows.append(
                [
                    t.label,
                    str(conns),
                    fmt(rps),
                    ratio(rps, base),
                    fmt(stat([r["p50_ms"] for r in runs])),
                    fmt(stat([r["p99_ms"] for r in runs])),
                    fmt(util),
                    fmt(per_cpu),
                    str(sum(r["errors"] for r in runs)),
                ]
            )
            if t is targets[1]:
                verdicts.append(f"c{conns}: {rps.median / base.median:.2f}×")
    table = md_table(
        [
            "server",
            "connections",
            "req/s",
            "÷ no-op",
            "p50 ms",
            "p99 ms",
            "server CPU (cores)",
            "req per server CPU-s",
            "errors (all runs)",
        ],
        rows,
    )
    notes = (
        f"wrk -t1, {seconds} s per run, {opts.runs} rounds, every case in every round; "
        "latencies from `wrk --latency`; errors: non-2xx responses plus socket errors. "
        'Body: `{"sql": "INSERT INTO t(tenant, v) VALUES (?, ?)", "params": [1, n]}` '
        f"to one key (`{KEY}`). Server CPU from /proc/PID/stat. Figures: median [min–max]; "
        "ratios: median ÷ no-op median [min, max ÷ no-op median].\n\n"
        f"Target: shardlite (`os`) ≥ {TARGET}× the no-op endpoint: {', '.join(verdicts)}."
    )
    body = header(NAME, opts, DEFAULT_RUNS) + "\n\n" + table + "\n\n" + notes
    console = [f"{r[0]:40} c{r[1]:>3} {r[2]:>22} req/s  {r[3]}" for r in rows]
    return SectionResult(NAME, body, console)
