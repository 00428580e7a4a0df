"""Section coldstart: first request to a passivated actor, and RSS under an LRU cap.

Setup (untimed): N actor files, each with table t and one row. Each run starts a fresh
``shardlite serve --durability os --max-open-actors CAP`` (CAP < N) on them, then:

1. touches every file once (an INSERT per key, pipelined): the LRU must evict N - CAP
   actors; then reads VmRSS/VmHWM and the server's /metrics;
2. for a sample of keys touched early (so evicted), one at a time: a cold request then
   the same request again (warm), for reads (``SELECT count(*)``) and for writes.

Reference, in the same run: raw apsw opening an existing file and reading it (no server).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import apsw
import msgspec

from shardlite.actor import Sql

from . import rpc_load
from .common import (
    CREATE_SQL,
    INSERT_SQL,
    Options,
    SectionResult,
    fmt,
    header,
    md_table,
    metrics,
    percentile,
    ratio,
    serve_shardlite,
    stat,
    status_kib,
)
from .data import actor_files

NAME = "coldstart"
TITLE = "Cold start and memory under the LRU cap"
DEFAULT_RUNS = 3
READ = Sql("SELECT count(*) FROM t")
PAUSE_S = 0.003
"""Pause before each timed request: the close of the actor evicted by the previous cold
start is over by then (a file whose WAL holds more than 64 KiB closes in a worker thread
on the server's CPU; a shorter one closes inline, with no checkpoint)."""
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(rpc_load.Reply).decode


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(files, cap, sampled keys per kind)."""
    return (1000, 100, 100) if quick else (10_000, 1000, 500)


class Client:
    """One blocking connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.next_id = 1

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the server closed the connection")
            data += chunk
        return data

    def timed(self, key: str, op: Sql) -> float:
        payload = _encode((self.next_id, key, op))
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        self.sock.sendall(len(payload).to_bytes(4, "big") + payload)
        reply = _decode(self._recv(int.from_bytes(self._recv(4), "big")))
        elapsed = time.perf_counter() - t0
        if reply.status or reply.id != self.next_id:
            raise RuntimeError(f"{key}: {msgspec.msgpack.decode(reply.body)}")
        self.next_id += 1
        return elapsed

    def close(self) -> None:
        self.sock.close()


def _raw_open(workdir: str, count: int) -> list[float]:
    """Open an existing WAL file with apsw and read it, once per file (files precreated)."""
    folder = os.path.join(workdir, "raw-open")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i}.db") for i in range(count)]
    for path in paths:
        conn = apsw.Connection(path)
        conn.pragma("journal_mode", "wal")
        conn.execute(CREATE_SQL)
        conn.execute(INSERT_SQL, (0, 0))
        conn.close()
    lats = []
    for path in paths:
        t0 = time.perf_counter()
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
        conn.execute("SELECT count(*) FROM t").fetchall()
        lats.append(time.perf_counter() - t0)
        conn.close()
    return lats


def _one_run(data: str, files: int, cap: int, sample: int) -> dict[str, Any]:
    server, http, port = serve_shardlite(data, "os", "--max-open-actors", str(cap))
    out: dict[str, Any] = {}
    with server:
        out["rss_start_mib"] = status_kib(server.pid, "VmRSS") / 1024
        names = [rpc_load.key_name(i) for i in range(files)]
        t0 = time.perf_counter()
        r = rpc_load.run(port, rpc_load.templates(names, rpc_load.insert_op), once=True)
        out["touch_per_s"] = files / (time.perf_counter() - t0)
        if r["errors"]:
            raise RuntimeError(f"touching every file failed: {r['first_error']}")
        time.sleep(1.0)  # let the evictions' closes finish
        m = metrics(http)
        out["open"] = m["shardlite_actors_open"]
        out["evictions"] = m["shardlite_actor_evictions_total"]
        out["rss_mib"] = status_kib(server.pid, "VmRSS") / 1024
        out["hwm_mib"] = status_kib(server.pid, "VmHWM") / 1024
        client = Client(port)
        lat: dict[str, list[float]] = {"cold_read": [], "warm_read": [], "cold_write": []}
        lat["warm_write"] = []
        opens0 = m["shardlite_actor_opens_total"]
        for j in range(2 * sample):  # early keys: evicted long ago
            kind, op = ("read", READ) if j % 2 == 0 else ("write", rpc_load.insert_op(j))
            lat["cold_" + kind].append(client.timed(names[j], op))
            lat["warm_" + kind].append(client.timed(names[j], op))
        client.close()
        m = metrics(http)
        out["cold_opens"] = m["shardlite_actor_opens_total"] - opens0
        out["open_after"] = m["shardlite_actors_open"]
        out["rss_after_mib"] = status_kib(server.pid, "VmRSS") / 1024
    for kind, values in lat.items():
        values.sort()
        out[kind + "_p50_ms"] = percentile(values, 50) * 1e3
        out[kind + "_p99_ms"] = percentile(values, 99) * 1e3
    return out


def run(opts: Options) -> SectionResult:
    files, cap, sample = _sizes(opts.quick)
    data = actor_files(opts.cache, files, os.path.join(opts.workdir, "data"))
    runs = []
    raw: list[dict[str, float]] = []
    for i in range(opts.runs):
        runs.append(_one_run(data, files, cap, sample))
        lats = sorted(_raw_open(os.path.join(opts.workdir, f"raw-{i}"), sample))
        raw.append({"p50": percentile(lats, 50) * 1e3, "p99": percentile(lats, 99) * 1e3})
        print(
            f"  coldstart run {i + 1}: cold read p50 {runs[-1]['cold_read_p50_ms']:.2f} ms, "
            f"RSS {runs[-1]['rss_mib']:.0f} MiB, {runs[-1]['open']:.0f} open"
        )
    return _report(opts, runs, raw, (files, cap, sample))


def _col(runs: list[dict[str, Any]], key: str) -> Any:
    return stat([r[key] for r in runs])


def _report(
    opts: Options,
    runs: list[dict[str, Any]],
    raw: list[dict[str, float]],
    sizes: tuple[int, int, int],
) -> SectionResult:
    files, cap, sample = sizes
    raw50, raw99 = stat([r["p50"] for r in raw]), stat([r["p99"] for r in raw])
    lat_rows = []
    for kind in ("read", "write"):
        cold50, warm50 = _col(runs, f"cold_{kind}_p50_ms"), _col(runs, f"warm_{kind}_p50_ms")
        lat_rows.append(
            [
                f"cold {kind} (first request after passivation)",
                fmt(cold50),
                fmt(_col(runs, f"cold_{kind}_p99_ms")),
                ratio(cold50, warm50),
            ]
        )
        lat_rows.append(
            [
                f"warm {kind} (same key, next request)",
                fmt(warm50),
                fmt(_col(runs, f"warm_{kind}_p99_ms")),
                "1.00×",
            ]
        )
    lat_rows.append(
        ["raw apsw: open an existing file + first SELECT (no server)", fmt(raw50), fmt(raw99), "—"]
    )
    lat_table = md_table(["request", "p50 ms", "p99 ms", "p50 ÷ warm p50"], lat_rows)
    mem_rows = [
        ["actor files touched", f"{files:,}"],
        ["`--max-open-actors`", f"{cap:,}"],
        ["`shardlite_actors_open` after touching every file", fmt(_col(runs, "open"))],
        ["`shardlite_actor_evictions` after touching every file", fmt(_col(runs, "evictions"))],
        [
            "actors opened during the cold samples (should equal the samples)",
            f"{fmt(_col(runs, 'cold_opens'))} of {2 * sample}",
        ],
        ["`shardlite_actors_open` after the cold samples", fmt(_col(runs, "open_after"))],
        ["VmRSS at start, MiB", fmt(_col(runs, "rss_start_mib"))],
        ["VmRSS after touching every file, MiB", fmt(_col(runs, "rss_mib"))],
        ["VmRSS after the cold samples, MiB", fmt(_col(runs, "rss_after_mib"))],
        ["VmHWM (peak RSS), MiB", fmt(_col(runs, "hwm_mib"))],
        [
            "RSS per open actor after the cold samples, KiB ((after − start) ÷ open)",
            fmt(
                stat(
                    [
                        (r["rss_after_mib"] - r["rss_start_mib"]) * 1024 / r["open_after"]
                        for r in runs
                    ]
                )
            ),
        ],
        ["touch pass, actor files per second (pipelined INSERTs)", fmt(_col(runs, "touch_per_s"))],
    ]
    mem_table = md_table(["memory and LRU", "value"], mem_rows)
    notes = (
        f"Each run: a fresh server (`--durability os --max-open-actors {cap}`) on the same "
        f"{files:,} files; {sample} cold reads and {sample} cold writes, one request at a "
        "time over one RPC connection from CPU 1, each followed by the same request again "
        "(warm). Latency is the client's round trip. Every cold open past the cap also "
        "evicts (closes) another actor: inline with no checkpoint when its WAL holds at most "
        "64 KiB, as here (one INSERT each), else in a worker thread; requests are spaced "
        f"{PAUSE_S * 1e3:g} ms apart so that this close is over before the next request. "
        "The page cache is warm (the "
        "files were written shortly before), as on a busy server. Figures: median "
        f"[min–max] over {opts.runs} runs."
    )
    body = "\n\n".join([header(NAME, opts, DEFAULT_RUNS), lat_table, mem_table, notes])
    console = [f"{r[0]:64} p50 {r[1]:>22} ms  p99 {r[2]:>22} ms" for r in lat_rows]
    console += [f"{r[0]:64} {r[1]}" for r in mem_rows]
    return SectionResult(NAME, body, console)
