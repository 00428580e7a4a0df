"""Running a load test: check the target, set up each key, drive load from N processes.

The parent process checks that the target answers (a clear error before anything
starts), prepares every key (untimed), starts ``procs`` generator processes, shows a live
line (rich) from their progress messages, and merges their HDR histograms and
per-second series into one result.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from ._engine import RUNNERS, Recorder, new_histogram, rpc_exchange
from ._requests import KV_NAMES, Scenario
from ._spec import (
    PG_FILL,
    PG_SCHEMA,
    SQLITE_FILL,
    SQLITE_SCHEMA,
    LoadSpec,
    Target,
    needs_rows,
    setup_keys,
)

SETUP_TASKS = 64
CONNECT_TIMEOUT_S = 5.0
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class TargetUnreachable(Exception):
    """The target did not answer before the run: nothing was sent."""


# ---------------------------------------------------------------------- before the run


def preflight(target: Target) -> str:
    """Check that the target answers; return what it is (server name, version)."""
    if target.kind == "postgres":
        try:
            import psycopg
        except ImportError as exc:
            raise TargetUnreachable(
                "a postgres:// target needs psycopg: pip install 'shardlite[loadtest]'"
            ) from exc
        try:
            with psycopg.connect(target.url, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                return f"PostgreSQL {row[0] if row else '?'}"
        except psycopg.Error as exc:
            raise TargetUnreachable(f"cannot reach {target.url}: {exc}") from None
    url = f"{target.kind}://{target.host}:{target.port}"
    try:
        if target.kind == "http":
            import httpx

            r = httpx.get(f"{url}/livez", timeout=CONNECT_TIMEOUT_S)
            if r.status_code != 200:
                raise OSError(f"GET /livez answered {r.status_code}")
            return "shardlite"
        return _rpc_ping(target)
    except (OSError, ValueError) as exc:
        raise TargetUnreachable(f"cannot reach {url}: {exc}") from None


def _rpc_ping(target: Target) -> str:
    """One ``ping`` (touches no actor); the server's name from the reply."""
    from shardlite.router import wire

    with socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT_S) as sock:
        return str(rpc_exchange(sock, 1, wire.Ping())[0])


def setup(spec: LoadSpec, target: Target, say: Callable[[str], None]) -> float:
    """Create each key's schema (and rows, for reads): untimed. Returns the seconds taken."""
    t0 = time.perf_counter()
    if target.kind == "postgres":
        _setup_postgres(spec, target)
    else:
        keys = setup_keys(spec)
        if keys:
            say(f"setting up {len(keys):,} keys (not timed)")
            trio.run(_setup_shardlite, spec, target, keys)
    return time.perf_counter() - t0


async def _setup_shardlite(spec: LoadSpec, target: Target, keys: list[int]) -> None:
    import shardlite

    statements: list[Any] = [SQLITE_SCHEMA]
    if needs_rows(spec):
        statements.append((SQLITE_FILL, [spec.rows]))
    todo = iter(keys)
    url = f"{target.kind}://{target.host}:{target.port}"
    async with shardlite.connect_async(url, token=spec.token or None) as client:

        async def worker() -> None:
            for i in todo:
                actor = client.actor(f"{spec.key_prefix}{i}")
                if spec.scenario == "kv":
                    for n in range(KV_NAMES):
                        await actor.kv.put(f"k{n}", "x" * spec.value_bytes)
                elif spec.scenario != "call":
                    await actor.batch(statements)

        async with trio.open_nursery() as nursery:
            for _ in range(SETUP_TASKS):
                nursery.start_soon(worker)


def _setup_postgres(spec: LoadSpec, target: Target) -> None:
    import psycopg

    with psycopg.connect(target.url, autocommit=True) as conn:
        for ddl in PG_SCHEMA:
            conn.execute(ddl)
        if needs_rows(spec) and spec.dist != "cold":
            for i in setup_keys(spec):
                conn.execute(PG_FILL, (f"{spec.key_prefix}{i}", spec.rows))
        if spec.scenario == "kv":
            conn.execute(
                "INSERT INTO lt_kv (tenant, name, value) SELECT %s || t, 'k' || n, %s "
                "FROM generate_series(0, %s) t, generate_series(0, %s) n ON CONFLICT DO NOTHING",
                (spec.key_prefix, "x" * spec.value_bytes, spec.keys - 1, KV_NAMES - 1),
            )


# ---------------------------------------------------------------------- the run


def _generator(spec: LoadSpec, target: Target, worker: int, conn: Any, start_at: float) -> None:
    """One generator process: wait for the common start, drive load, send the result."""
    scenario = Scenario(spec, worker, spec.procs)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        start = time.perf_counter()
        cpu0 = time.process_time()
        rec = Recorder(start, lambda p: conn.send(("progress", worker, p)))
        RUNNERS[target.kind](spec, target, scenario, rec, spec.procs)
        rec.flush_progress(time.perf_counter())
        conn.send(
            ("done", worker, rec.result(time.perf_counter() - start, time.process_time() - cpu0))
        )
    except BaseException as exc:
        conn.send(("failed", worker, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def drive(
    spec: LoadSpec, target: Target, on_progress: Callable[[float, dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Run the generators; call ``on_progress(elapsed, totals)`` as they report."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 0.5 + 0.3 * spec.procs  # spawning takes a moment
    pipes, procs = [], []
    for w in range(spec.procs):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_generator, args=(spec, target, w, child, start_at), daemon=True)
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    latest: dict[int, dict[str, Any]] = {}
    results: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    open_pipes = list(pipes)
    limit = time.time() + spec.duration_s + 120
    while open_pipes:
        if time.time() > limit:
            raise TimeoutError("the generators did not finish in time")
        ready: list[Any] = multiprocessing.connection.wait(open_pipes, timeout=0.25)
        for pipe in ready:
            try:
                kind, worker, payload = pipe.recv()
            except EOFError:
                open_pipes.remove(pipe)
                continue
            if kind == "progress":
                latest[worker] = payload
            elif kind == "done":
                results[worker] = payload
            else:
                failures.append(payload)
        if latest:
            on_progress(max(0.0, time.time() - start_at), _totals(latest))
    for p in procs:
        p.join(10)
    if failures:
        raise RuntimeError(f"a generator failed: {failures[0]}")
    return [results[w] for w in sorted(results)]


def _totals(latest: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {
        "count": sum(p["count"] for p in latest.values()),
        "errors": sum(p["errors"] for p in latest.values()),
        "p50_us": max(p["p50_us"] for p in latest.values()),
        "p99_us": max(p["p99_us"] for p in latest.values()),
    }


# ---------------------------------------------------------------------- the result


def merge(
    spec: LoadSpec, target: Target, parts: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """One result from every generator's: histograms added, series summed per second."""
    hist = new_histogram()
    seconds: dict[int, list[Any]] = {}
    errors: dict[str, int] = {}
    first_errors: dict[str, str] = {}
    for part in parts:
        hist.decode_and_add(part["hist"])
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
        for code, message in part["first_errors"].items():
            first_errors.setdefault(code, message)
        for sec, count, errs, blob in part["seconds"]:
            slot = seconds.setdefault(sec, [0, 0, new_histogram()])
            slot[0] += count
            slot[1] += errs
            if count:
                slot[2].decode_and_add(blob)
    count = sum(p["count"] for p in parts)
    wall = max((p["wall_s"] for p in parts), default=0.0)
    error_count = sum(errors.values())
    series = []
    for sec in sorted(seconds):
        n, errs, h = seconds[sec]
        series.append(
            {
                "second": sec,
                "requests": n,
                "errors": errs,
                **{f"p{_label(q)}_ms": _ms(h, q) for q in (50.0, 99.0, 99.9)},
            }
        )
    return {
        "shardlite_loadtest": 1,
        "config": {**msgspec.to_builtins(spec), "token": "***" if spec.token else ""},
        "target": {
            "kind": target.kind,
            "url": _redact(target.url),
            "server": meta.get("server", ""),
        },
        "environment": _environment(),
        "started": meta.get("started", 0.0),
        "setup_s": meta.get("setup_s", 0.0),
        "duration_s": wall,
        "requests": count,
        "errors": error_count,
        "error_rate": error_count / count if count else 0.0,
        "errors_by_code": errors,
        "first_errors": first_errors,
        "throughput": count / wall if wall else 0.0,
        "latency_ms": {
            **{f"p{_label(q)}": _ms(hist, q) for q in PERCENTILES},
            "max": hist.get_max_value() / 1000 if count else 0.0,
            "mean": hist.get_mean_value() / 1000 if count else 0.0,
        },
        "distribution": _distribution(hist),
        "series": series,
        "generator_cpu_s": sum(p["cpu_s"] for p in parts),
        "histogram": hist.encode().decode(),
    }


def _label(q: float) -> str:
    return str(q).rstrip("0").rstrip(".").replace(".", "")


def _ms(h: Any, q: float) -> float:
    return float(h.get_value_at_percentile(q)) / 1000 if h.total_count else 0.0


def _distribution(h: Any) -> list[list[float]]:
    """(percentile, latency ms) points for the percentile-distribution plot."""
    if not h.total_count:
        return []
    points = []
    for exp in range(0, 60):
        q = 100.0 * (1 - 0.5 ** (exp / 4))
        points.append([q, h.get_value_at_percentile(q) / 1000])
        if q > 99.999:
            break
    points.append([100.0, h.get_max_value() / 1000])
    return points


def _redact(url: str) -> str:
    """A URL without its password (results get shared)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _environment() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


__all__ = ["TargetUnreachable", "drive", "merge", "preflight", "setup"]
