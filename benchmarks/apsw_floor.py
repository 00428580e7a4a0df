"""The durable section's floor: the same single-row transactions in raw apsw, no server.

One thread draws keys uniformly and runs ``BEGIN; INSERT; [UPDATE the LSN row]; COMMIT``
on each key's file (the actor files the servers use, opened with the same pragmas and
VFS: WAL, ``synchronous=NORMAL``, ``locking_mode=EXCLUSIVE``, no autocheckpoint). No
network, no framing, no durability wait, no checkpoints but evictions': what SQLite
alone costs per write on one core, which no server built on one file per key can beat.
Every file's WAL is started (one write) before the warm-up, as the servers' opening pass
does: the first commit into a new WAL syncs its header, even with synchronous=NORMAL.
With more keys than the descriptor limit allows open, the least recently used file is
closed to open the next, as the servers close it: inline with no checkpoint while its WAL
holds at most 64 KiB, else checkpointed (start the next WAL, keep it) in one of two
closing threads beside the writer. Prints one JSON line."""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import resource
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import apsw

from shardlite.actor._residency import QUICK_CLOSE_WAL_BYTES

from .common import INSERT_SQL

LSN_SQL = "UPDATE _shardlite_lsn SET lsn = ? WHERE id = 1"
NUDGE_SQL = "UPDATE _shardlite_lsn SET lsn = lsn + ? WHERE id = 1"
CLOSE_THREADS = 2  # as the servers' pool (actor/_pool.py)


def _start_wal(conn: apsw.Connection) -> None:
    """A write that changes nothing, so the next commit does not sync a new WAL header."""
    with conn:
        conn.execute(NUDGE_SQL, (1,))
        conn.execute(NUDGE_SQL, (-1,))


def _close_quick(conn: apsw.Connection) -> None:
    """Close as the servers' LRU closes a file whose WAL is short: no checkpoint, no sync."""
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.close()


def _evict(conn: apsw.Connection) -> None:
    """Close as the servers' LRU closes the others: checkpoint, start the next WAL, keep it."""
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    _start_wal(conn)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.close()


def _open(path: str, wal_bytes: dict[apsw.Connection, int]) -> apsw.Connection:
    conn = apsw.Connection(path, vfs="unix-none")
    conn.pragma("locking_mode", "exclusive")
    conn.pragma("journal_mode", "wal")
    conn.pragma("synchronous", "normal")
    conn.wal_autocheckpoint(0)
    page = conn.pragma("page_size")

    def hook(_conn: apsw.Connection, _db: str, pages: int) -> int:
        wal_bytes[conn] = pages * page
        return apsw.SQLITE_OK

    conn.set_wal_hook(hook)
    return conn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--lsn", action="store_true", help="also update the LSN row (log mode)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warm", type=float, default=1.5)
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.data, "shards", "**", "*.db"), recursive=True))
    files = files[: args.keys]
    assert len(files) == args.keys, f"{len(files)} actor files under {args.data}"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cap = max(1, (hard - 64) // 2)  # two descriptors per WAL connection
    conns: OrderedDict[int, apsw.Connection] = OrderedDict()
    rnd = random.Random(1)
    lsn = args.lsn
    opens = 0
    closer = ThreadPoolExecutor(CLOSE_THREADS)
    closing: dict[int, Future[None]] = {}
    wal_bytes: dict[apsw.Connection, int] = {}  # as the servers' actors track it

    def one(n: int) -> None:
        nonlocal opens
        i = rnd.randrange(args.keys)
        conn = conns.get(i)
        if conn is None:
            if len(conns) >= cap:
                j, old = conns.popitem(last=False)
                if wal_bytes.pop(old, 0) <= QUICK_CLOSE_WAL_BYTES:
                    _close_quick(old)
                else:
                    closing[j] = closer.submit(_evict, old)
            if (pending := closing.pop(i, None)) is not None:
                pending.result()  # a file reopens only once closed, as in the servers
            conn = conns[i] = _open(files[i], wal_bytes)
            opens += 1
        else:
            conns.move_to_end(i)
        conn.execute("BEGIN")
        conn.execute(INSERT_SQL, (i, n))
        if lsn:
            conn.execute(LSN_SQL, (n,))
        conn.execute("COMMIT")

    for i in range(min(args.keys, cap)):  # open every file first, as the servers' pass does
        conns[i] = _open(files[i], wal_bytes)
        _start_wal(conns[i])
    n = 0
    until = time.perf_counter() + args.warm
    while time.perf_counter() < until:
        for _ in range(200):
            one(n)
            n += 1
    opens, done = 0, 0
    started = time.perf_counter()
    cpu0 = time.process_time()
    while (elapsed := time.perf_counter() - started) < args.seconds:
        for _ in range(200):
            one(n)
            n += 1
        done += 200
    cpu = time.process_time() - cpu0
    closer.shutdown()
    for conn in conns.values():
        conn.close()
    print(
        json.dumps(
            {
                "rps": done / elapsed,
                "requests": done,
                "seconds": elapsed,
                "server_util": cpu / elapsed,
                "per_cpu_s": done / cpu if cpu else 0.0,
                "opens_per_s": opens / elapsed,
                "errors": 0,
                "p50_ms": 0.0,
                "p99_ms": 0.0,
                "gen_cpu_util": 0.0,
            }
        )
    )


if __name__ == "__main__":
    main()
