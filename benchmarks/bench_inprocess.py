"""Section inprocess: single-row INSERTs through the actor API vs raw apsw, one process.

Each run is a fresh child process pinned to the server CPU (``--worker``), so no run
inherits another's files, caches or garbage. Cases:

* ``actor-os`` / ``actor-fsync``: ``await pool.call(key, Sql(INSERT ...))`` from 64 trio
  tasks, one key, for a fixed time (and at most a fixed count); each task times its calls.
* ``raw-batch``: apsw, one file, WAL, synchronous=NORMAL, single-row INSERTs batched 1000
  per transaction (the baseline), and ``raw-autocommit``, one transaction per INSERT (for
  scale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from .common import (
    CREATE_SQL,
    INSERT_SQL,
    SERVER_CPU,
    Options,
    SectionResult,
    fmt,
    header,
    md_table,
    num,
    percentile,
    python_cmd,
    ratio,
    run_json,
    stat,
)

NAME = "inprocess"
TITLE = "In-process: actor API vs raw apsw"
DEFAULT_RUNS = 3
TASKS = 64
KEY = "bench-inprocess"
MAX_CALLS = 5_000_000
ROWS_PER_TXN = 1000
CASES = ("raw-batch", "actor-os", "actor-fsync", "raw-autocommit")


async def _actor(durability: str, seconds: float, workdir: str) -> dict[str, Any]:
    import trio

    from shardlite.actor import ActorConfig, Durability, Sql, open_actor_pool

    config = ActorConfig(durability=Durability(durability))
    lats: list[float] = []
    clock = time.perf_counter
    async with open_actor_pool(config, lambda key: workdir) as pool:
        await pool.call(KEY, Sql(CREATE_SQL))
        before = pool.statistics()
        start = clock()
        deadline = start + seconds

        async def caller(i: int) -> None:
            n = 0
            while len(lats) < MAX_CALLS:
                t0 = clock()
                if t0 >= deadline:
                    return
                await pool.call(KEY, Sql(INSERT_SQL, [i, n]))
                lats.append(clock() - t0)
                n += 1

        async with trio.open_nursery() as nursery:
            for i in range(TASKS):
                nursery.start_soon(caller, i)
        wall = clock() - start
        after = pool.statistics()
        count = (await pool.call(KEY, Sql("SELECT count(*) FROM t"))).rows[0][0]
    if count != len(lats):
        raise RuntimeError(f"{count} rows in the table after {len(lats)} acknowledged INSERTs")
    lats.sort()
    batches = after["batches"] - before["batches"]
    return {
        "writes_per_s": len(lats) / wall,
        "p50_us": percentile(lats, 50) * 1e6,
        "p99_us": percentile(lats, 99) * 1e6,
        "rows_per_txn": (after["calls"] - before["calls"]) / batches if batches else 0.0,
    }


def _raw(rows_per_txn: int, seconds: float, workdir: str) -> dict[str, Any]:
    import apsw

    conn = apsw.Connection(os.path.join(workdir, "raw.db"))
    conn.pragma("journal_mode", "wal")
    conn.pragma("synchronous", "normal")
    conn.execute(CREATE_SQL)
    cur = conn.cursor()
    clock = time.perf_counter
    txn_lats: list[float] = []
    rows = 0
    start = clock()
    deadline = start + seconds
    while clock() < deadline and rows < MAX_CALLS:
        t0 = clock()
        cur.execute("BEGIN")
        for n in range(rows, rows + rows_per_txn):
            cur.execute(INSERT_SQL, (0, n))
        cur.execute("COMMIT")
        txn_lats.append(clock() - t0)
        rows += rows_per_txn
    wall = clock() - start
    conn.close()
    txn_lats.sort()
    return {
        "writes_per_s": rows / wall,
        "p50_us": percentile(txn_lats, 50) * 1e6,
        "p99_us": percentile(txn_lats, 99) * 1e6,
        "rows_per_txn": float(rows_per_txn),
    }


def worker(case: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shardlite-bench-") as workdir:
        if case.startswith("actor-"):
            import trio

            return trio.run(_actor, case.removeprefix("actor-"), seconds, workdir)
        return _raw(ROWS_PER_TXN if case == "raw-batch" else 1, seconds, workdir)


def run(opts: Options) -> SectionResult:
    seconds = {"raw-batch": 2.0, "raw-autocommit": 2.0}
    actor_s = 0.3 if opts.quick else 3.0
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    for round_no in range(opts.runs):
        for case in CASES:
            dur = 0.3 if opts.quick else seconds.get(case, actor_s)
            cmd = python_cmd(
                "benchmarks.bench_inprocess", "--worker", case, str(dur), cpu=SERVER_CPU
            )
            results[case].append(run_json(cmd, timeout=dur + 120))
            print(
                f"  inprocess round {round_no + 1}: {case}: "
                f"{num(results[case][-1]['writes_per_s'])} writes/s"
            )
    base = stat([r["writes_per_s"] for r in results["raw-batch"]])
    labels = {
        "raw-batch": f"raw apsw, {ROWS_PER_TXN} INSERTs per transaction (baseline)",
        "actor-os": f"actor API, durability os, {TASKS} tasks, 1 key",
        "actor-fsync": f"actor API, durability fsync, {TASKS} tasks, 1 key",
        "raw-autocommit": "raw apsw, one INSERT per transaction (for scale)",
    }
    rows = []
    for case in CASES:
        rs = results[case]
        writes = stat([r["writes_per_s"] for r in rs])
        rows.append(
            [
                labels[case],
                fmt(writes),
                ratio(writes, base),
                fmt(stat([r["p50_us"] for r in rs])),
                fmt(stat([r["p99_us"] for r in rs])),
                fmt(stat([r["rows_per_txn"] for r in rs])),
            ]
        )
    table = md_table(
        ["case", "writes/s", "÷ raw batched", "p50 µs", "p99 µs", "rows per transaction"], rows
    )
    notes = (
        "Schema `t(id INTEGER PRIMARY KEY, tenant INTEGER NOT NULL, v INTEGER NOT NULL)`, "
        "one row per INSERT, WAL, synchronous=NORMAL (the actor commits with NORMAL too; "
        "`fsync` adds an fdatasync of the WAL before the replies leave). Each run is a "
        "fresh process pinned to CPU 0. Actor latency: one `pool.call` as its caller "
        "sees it; raw latency: one whole transaction. Figures: median [min–max] of "
        f"{opts.runs} runs; ratios: median ÷ baseline median [min, max ÷ baseline median]."
    )
    body = header(NAME, opts, DEFAULT_RUNS) + "\n\n" + table + "\n\n" + notes
    console = [f"{r[0]:62} {r[1]:>24} writes/s  {r[2]}" for r in rows]
    return SectionResult(NAME, body, console)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "SECONDS"), required=True)
    args = ap.parse_args()
    out = worker(args.worker[0], float(args.worker[1]))
    sys.stdout.write(json.dumps(out) + "\n")
