"""What a load run does: its options, its key distribution and its scenario.

A :class:`LoadSpec` is plain data (it crosses into the generator processes). Scenarios
are described once, as SQL, and turned into requests for each kind of target: shardlite
RPC frames, shardlite HTTP requests, or PostgreSQL statements (the usual multi-tenant
schema: the tenant key as a column, in the primary key).
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import random
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import msgspec

SCENARIOS = ("insert", "read", "mixed", "kv", "batch", "call", "ping")
DISTRIBUTIONS = ("uniform", "zipf", "hot", "cold")
DEFAULT_ROWS = 100
"""Rows each key holds before a read scenario starts."""

SQLITE_SCHEMA = "CREATE TABLE IF NOT EXISTS lt (id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT"
SQLITE_INSERT = "INSERT INTO lt (v) VALUES (?)"
SQLITE_READ = "SELECT v FROM lt WHERE id = ?"
SQLITE_FILL = (
    "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < ?) "
    "INSERT INTO lt (id, v) SELECT n, 'row ' || n FROM s WHERE NOT EXISTS (SELECT 1 FROM lt)"
)
PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS lt (tenant TEXT NOT NULL, id BIGINT NOT NULL, v TEXT NOT NULL, "
    "PRIMARY KEY (tenant, id))",
    "CREATE TABLE IF NOT EXISTS lt_kv (tenant TEXT NOT NULL, name TEXT NOT NULL, value TEXT, "
    "PRIMARY KEY (tenant, name))",
)
PG_INSERT = "INSERT INTO lt (tenant, id, v) VALUES (%s, %s, %s)"
PG_READ = "SELECT v FROM lt WHERE tenant = %s AND id = %s"
PG_FILL = (
    "INSERT INTO lt (tenant, id, v) SELECT %s, g, 'row ' || g FROM generate_series(1, %s) g "
    "ON CONFLICT DO NOTHING"
)
PG_KV_PUT = (
    "INSERT INTO lt_kv (tenant, name, value) VALUES (%s, %s, %s) "
    "ON CONFLICT (tenant, name) DO UPDATE SET value = excluded.value"
)
PG_KV_GET = "SELECT value FROM lt_kv WHERE tenant = %s AND name = %s"
INSERTED_ID_BASE = 1 << 32
"""Ids of inserted rows start here (PostgreSQL: the key has no autoincrement per tenant)."""


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a run needs (recorded in the result JSON as its configuration)."""

    target: str
    scenario: str = "insert"
    keys: int = 1000
    dist: str = "uniform"
    zipf_s: float = 1.1
    duration_s: float = 10.0
    max_requests: int = 0
    """Stop after this many requests in all (0: only the duration bounds the run)."""
    concurrency: int = 64
    rate: float = 0.0
    """Requests per second in all (open loop); 0: closed loop at ``concurrency``."""
    procs: int = 1
    read_ratio: float = 0.9
    batch_size: int = 10
    rows: int = DEFAULT_ROWS
    method: str = ""
    method_args: list[Any] = []
    key_prefix: str = "lt-"
    seed: int = 1
    setup: bool = True
    connections: int = 0
    """RPC connections per generator process (0: chosen from the concurrency)."""
    value_bytes: int = 16
    token: str = ""
    """An access token for servers that require one (never written to results)."""


class Target(msgspec.Struct, frozen=True):
    kind: str  # "rpc" | "http" | "postgres"
    host: str
    port: int
    url: str


def parse_target(url: str, *, allow_remote: bool = False) -> Target:
    """``rpc://HOST:PORT``, ``http://HOST:PORT`` or ``postgres://...``; loopback only
    unless ``allow_remote``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    kinds = {"rpc": "rpc", "http": "http", "postgres": "postgres", "postgresql": "postgres"}
    if scheme not in kinds or not parts.hostname:
        raise ValueError(
            f"{url!r}: expected rpc://HOST:PORT, http://HOST:PORT or postgres://USER@HOST:PORT/DB"
        )
    kind = kinds[scheme]
    port = parts.port or {"rpc": 7070, "http": 8080, "postgres": 5432}[kind]
    if not allow_remote and not is_loopback(parts.hostname):
        raise ValueError(
            f"{parts.hostname} is not a loopback address: pass --allow-remote to load another host"
        )
    return Target(kind, parts.hostname, port, url)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(text: str) -> float:
    """``30s``, ``2m``, ``500ms``, ``1h``, ``7d`` or plain seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 2m, 500ms, 7d)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_dist(text: str) -> tuple[str, float]:
    """``uniform``, ``zipf:S`` (S > 0, default 1.1), ``hot`` (one key) or ``cold`` (each
    key once, in order: cold starts)."""
    name, _, arg = text.partition(":")
    if name not in DISTRIBUTIONS:
        raise ValueError(f"{text!r}: expected one of uniform, zipf:S, hot, cold")
    if name == "zipf":
        try:
            s = float(arg) if arg else 1.1
        except ValueError:
            raise ValueError(f"{text!r}: the zipf exponent must be a number") from None
        if not s > 0:
            raise ValueError(f"{text!r}: the zipf exponent must be above 0")
        return name, s
    if arg:
        raise ValueError(f"{text!r}: {name} takes no parameter")
    return name, 0.0


class KeyChooser:
    """Draws key indexes for one generator process (each process its own stream)."""

    def __init__(self, spec: LoadSpec, worker: int, workers: int) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed * 1000 + worker)
        self._cold = itertools.count(worker, workers)
        self._cdf: list[float] = []
        if spec.dist == "zipf":
            weights = [1.0 / (i**spec.zipf_s) for i in range(1, spec.keys + 1)]
            self._cdf = list(itertools.accumulate(weights))

    def next(self) -> int:
        dist = self.spec.dist
        if dist == "uniform":
            return self.rng.randrange(self.spec.keys)
        if dist == "zipf":
            cdf = self._cdf
            return min(bisect.bisect_left(cdf, self.rng.random() * cdf[-1]), len(cdf) - 1)
        if dist == "hot":
            return 0
        return next(self._cold) % self.spec.keys

    def name(self, index: int) -> str:
        return f"{self.spec.key_prefix}{index}"


def setup_keys(spec: LoadSpec) -> list[int]:
    """The keys a run prepares before timing (none for cold keys: their first request
    creates them, which is what it measures)."""
    if spec.scenario == "ping" or spec.dist == "cold" or not spec.setup:
        return []
    if spec.dist == "hot":
        return [0]
    return list(range(spec.keys))


def needs_rows(spec: LoadSpec) -> bool:
    return spec.scenario in ("read", "mixed")


def check(spec: LoadSpec) -> None:
    """Refuse options that do not fit together (click checks each one's type)."""
    if spec.scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {spec.scenario!r}")
    if spec.keys < 1:
        raise ValueError("--keys must be at least 1")
    if spec.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if spec.procs < 1:
        raise ValueError("--procs must be at least 1")
    if spec.rate < 0:
        raise ValueError("--rate must be positive")
    if spec.duration_s <= 0:
        raise ValueError("--duration must be positive")
    if not 0.0 <= spec.read_ratio <= 1.0:
        raise ValueError("--read-ratio must be between 0 and 1")
    if spec.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if spec.scenario == "call" and not spec.method:
        raise ValueError("--scenario call needs --method NAME")
    kind = urlsplit(spec.target).scheme
    if kind.startswith("postgres") and spec.scenario in ("call", "ping"):
        raise ValueError(f"--scenario {spec.scenario} needs a shardlite target")


__all__ = [
    "DISTRIBUTIONS",
    "SCENARIOS",
    "KeyChooser",
    "LoadSpec",
    "Target",
    "check",
    "needs_rows",
    "parse_dist",
    "parse_duration",
    "parse_target",
    "setup_keys",
]
