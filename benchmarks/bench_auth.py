"""Section auth: what tokens cost per request, and a victim tenant beside a noisy one.

Part 1. Verifying a token in process (a fresh token: the HS256 signature check; a token
seen before: the cache), then point reads over HTTP (a token on every request) and RPC
(a token per connection) against one server with ``--auth required`` and one with
``--auth off``, measured in alternating rounds with the load harness.

Part 2. A victim tenant inserting at a steady 500 requests/s (open loop, latency from
the intended send time) on a server alone, then with a noisy tenant on the same shard
(``benchmarks/noisy.py``: runaway queries stopped only by the statement budget, plus a
flood of small ones).
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from shardlite.loadtest import LoadSpec, parse_target, run_loadtest
from shardlite.shards._auth import Auth, create_token, load_keys, signing_key

from .common import (
    Options,
    SectionResult,
    Stat,
    fmt,
    header,
    md_table,
    num,
    python_cmd,
    ratio,
    serve_shardlite,
    stat,
)

NAME = "auth"
TITLE = "Tokens and a noisy neighbour: what isolation costs"
DEFAULT_RUNS = 3
VICTIM_RATE = 500.0
QUIET_AFTER_NOISE_S = 15.0


def _verify_costs(workdir: str) -> dict[str, float]:
    data = os.path.join(workdir, "keys")
    os.makedirs(data)
    keys = load_keys(data, [], create=True)
    kid, secret = signing_key(data, [])
    auth = Auth(keys, required=True)
    tokens = [
        create_token(kid, secret, pattern="t-*", perm="write", ttl_s=600)[0] for _ in range(2000)
    ]
    t0 = time.perf_counter()
    for t in tokens:
        auth.verify(t)
    fresh = (time.perf_counter() - t0) / len(tokens)
    t0 = time.perf_counter()
    for _ in range(50):
        for t in tokens:
            auth.verify(t)
    cached = (time.perf_counter() - t0) / (50 * len(tokens))
    return {"fresh_us": fresh * 1e6, "cached_us": cached * 1e6}


def _read(target: str, seconds: float, token: str = "") -> dict[str, Any]:
    spec = LoadSpec(
        target=target,
        scenario="read",
        keys=64,
        rows=10,
        duration_s=seconds,
        concurrency=32,
        token=token,
    )
    return run_loadtest(spec, parse_target(target), quiet=True)


def run(opts: Options) -> SectionResult:
    seconds = 1.0 if opts.quick else 5.0
    costs = _verify_costs(opts.workdir)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    on, on_http, on_port = serve_shardlite(
        os.path.join(opts.workdir, "on"), "log", "--auth", "required"
    )
    off, off_http, off_port = serve_shardlite(
        os.path.join(opts.workdir, "off"), "log", "--auth", "off"
    )
    try:
        data = os.path.join(opts.workdir, "on")
        kid, secret = signing_key(data, [])
        token = create_token(kid, secret, pattern="lt-*", perm="write", ttl_s=3600)[0]
        targets = {
            ("HTTP", "required"): (on_http, token),
            ("HTTP", "off"): (off_http, ""),
            ("RPC", "required"): (f"rpc://127.0.0.1:{on_port}", token),
            ("RPC", "off"): (f"rpc://127.0.0.1:{off_port}", ""),
        }
        for target, tok in targets.values():
            _read(target, 0.5, tok)  # setup and warm-up
        for round_no in range(opts.runs):
            for case, (target, tok) in targets.items():
                r = _read(target, seconds, tok)
                runs.setdefault(case, []).append(r)
                print(f"  auth round {round_no + 1}: {case}: {num(r['throughput'])} req/s")
    finally:
        on.stop()
        off.stop()
    victim = _victim(opts, seconds * 2)
    return _report(opts, costs, runs, victim, seconds)


def _victim(opts: Options, seconds: float) -> dict[str, list[dict[str, Any]]]:
    server, _, port = serve_shardlite(os.path.join(opts.workdir, "victim"), "log")
    url = f"rpc://127.0.0.1:{port}"
    spec = LoadSpec(
        target=url,
        scenario="insert",
        dist="hot",
        keys=1,
        key_prefix="victim-",
        rate=VICTIM_RATE,
        duration_s=seconds,
        concurrency=64,
    )
    out: dict[str, list[dict[str, Any]]] = {"alone": [], "noisy": []}
    try:
        run_loadtest(spec, parse_target(url), quiet=True)  # setup, warm-up
        for _ in range(opts.runs):
            out["alone"].append(run_loadtest(spec, parse_target(url), quiet=True))
            noisy = subprocess.Popen(
                python_cmd("benchmarks.noisy", "--url", url, "--seconds", str(seconds + 10)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(1.0)  # let it get going
                out["noisy"].append(run_loadtest(spec, parse_target(url), quiet=True))
            finally:
                noisy.kill()
                noisy.wait()
            # what it left queued (and its actor's pauses) drain before the next "alone"
            time.sleep(QUIET_AFTER_NOISE_S)
    finally:
        server.stop()
    return out


def _s(runs: list[dict[str, Any]], get: Any) -> Stat:
    return stat([get(r) for r in runs])


def _report(
    opts: Options,
    costs: dict[str, float],
    runs: dict[tuple[str, str], list[dict[str, Any]]],
    victim: dict[str, list[dict[str, Any]]],
    seconds: float,
) -> SectionResult:
    rows = []
    for (proto, auth), rs in runs.items():
        base = _s(runs[(proto, "off")], lambda r: r["throughput"])
        rps = _s(rs, lambda r: r["throughput"])
        rows.append(
            [
                proto,
                f"`--auth {auth}`",
                fmt(rps),
                ratio(rps, base),
                fmt(_s(rs, lambda r: r["latency_ms"]["p50"])),
                fmt(_s(rs, lambda r: r["latency_ms"]["p99"])),
                str(sum(r["errors"] for r in rs)),
            ]
        )
    table = md_table(
        ["protocol", "server", "reads/s", "÷ auth off", "p50 ms", "p99 ms", "errors"], rows
    )
    vrows = []
    for case, label in (("alone", "alone on the shard"), ("noisy", "beside the noisy tenant")):
        rs = victim[case]
        vrows.append(
            [
                label,
                fmt(_s(rs, lambda r: r["throughput"])),
                fmt(_s(rs, lambda r: r["latency_ms"]["p50"])),
                fmt(_s(rs, lambda r: r["latency_ms"]["p99"])),
                fmt(_s(rs, lambda r: r["latency_ms"]["p999"])),
                str(sum(r["errors"] for r in rs)),
            ]
        )
    vtable = md_table(
        ["victim (500 inserts/s, open loop)", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"],
        vrows,
    )
    body = (
        header(NAME, opts, DEFAULT_RUNS)
        + f"\n\nVerifying a token in process: {costs['fresh_us']:.1f} µs the first time (HS256 "
        f"signature and claims), {costs['cached_us']:.2f} µs once cached.\n\n"
        + table
        + "\n\n"
        + vtable
        + "\n\n"
        + f"Reads: point SELECTs on 64 keys, 32 in flight, {seconds:g} s per run, {opts.runs} "
        "rounds alternating the servers; median [min–max]. Over HTTP every request carries "
        "the token (verified once, then cached); over RPC it is sent once per connection. "
        "The noisy tenant runs 4 runaway queries at a time (each stopped by the 0.5 s "
        "statement budget) and 8 tasks of `SELECT 1` on the same shard process. Each runaway "
        "read is stopped on the event loop after `--inline-slice` (10 ms) and run again in "
        "the slow lane (one worker thread per process), so the victim waits at most one "
        "slice for it; a batch that still holds the loop over 20 ms (a long write) pauses "
        "its actor for 4× as long."
    )
    console = [f"{r[0]:5} {r[1]:18} {r[2]:>24} reads/s" for r in rows] + [
        f"victim {r[0]:26} p99 {r[3]} ms" for r in vrows
    ]
    return SectionResult(NAME, body, console)
