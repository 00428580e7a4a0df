"""Server settings: one table drives the CLI flags, the SHARDLITE_* variables and the docs.

Each :class:`Setting` has a name (``max_db_bytes`` -> ``--max-db-bytes`` ->
``SHARDLITE_MAX_DB_BYTES``), a default, a kind that says how its text is parsed
(sizes take ``KiB``/``MiB``/``GiB``, durations ``ms``/``s``/``m``), and the help text.
``docs/settings.md`` is generated from this table (``shardlite settings --markdown``) and
a test checks that it is current.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import msgspec

from shardlite.actor import ActorConfig, Durability
from shardlite.actor import _config as defaults
from shardlite.router import DEFAULT_LEASE_TTL_S, DEFAULT_SLOTS

DEFAULT_DATA_DIR = "./shardlite-data"
DEFAULT_HTTP = "127.0.0.1:8080"
DEFAULT_RPC = "127.0.0.1:7070"
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


class Setting(msgspec.Struct, frozen=True):
    name: str
    default: Any
    kind: str  # "str" | "int" | "float" | "size" | "duration" | "choice" | "addr"
    help: str
    choices: tuple[str, ...] = ()
    minimum: int = 0
    """int settings: the least value accepted."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "SHARDLITE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "data", DEFAULT_DATA_DIR, "str", "Data directory: actor files live under DATA/shards/."
    ),
    Setting(
        "http", DEFAULT_HTTP, "addr", "HTTP listen address, HOST:PORT (port 0 picks a free one)."
    ),
    Setting("rpc", DEFAULT_RPC, "addr", "RPC listen address, HOST:PORT (port 0 picks a free one)."),
    Setting(
        "procs",
        0,
        "int",
        "Shard processes on this host (0: one per core). They share the HTTP and RPC ports.",
    ),
    Setting(
        "directory",
        "",
        "str",
        "Where placement lives: sqlite:PATH (default: DATA/directory.db, one host) or "
        "etcd://HOST:PORT[,HOST:PORT] (many hosts).",
    ),
    Setting(
        "host_id",
        "",
        "str",
        "This host's id in the directory (default: the id this data directory was first "
        "served as, else the hostname).",
    ),
    Setting(
        "advertise",
        "",
        "str",
        "The address other hosts and routing clients reach this host at (default: the "
        "listen address; 127.0.0.1 when that is a wildcard).",
    ),
    Setting(
        "lease_ttl",
        DEFAULT_LEASE_TTL_S,
        "duration",
        "A process that cannot renew its directory lease for this long stops serving its "
        "shards (503) until the directory is back.",
    ),
    Setting(
        "retired_keep",
        24 * 3600.0,
        "duration",
        "After a shard moves away, its old files stay under DATA/retired for this long "
        "(for inspection or a manual rollback), then they are deleted.",
    ),
    Setting(
        "shards",
        0,
        "int",
        "Shards of a new cluster (0: one per process); each has its own log and moves as a "
        "unit. Fixed at creation.",
    ),
    Setting(
        "slots",
        DEFAULT_SLOTS,
        "int",
        "Hash slots of a new cluster (keys map to slots, slots to shards); fixed at creation.",
    ),
    Setting(
        "auth",
        "auto",
        "choice",
        "Tokens: required (every request carries one: `shardlite ops token create`), off, "
        "or auto: required unless both listen addresses are loopback.",
        choices=("auto", "required", "off"),
    ),
    Setting(
        "auth_secret",
        "",
        "str",
        "Secrets tokens are signed with, comma-separated (the first signs; all verify, for "
        "rotation). Give every host of a cluster the same. Default: DATA/auth-keys.json.",
    ),
    Setting(
        "rate_limit",
        0.0,
        "float",
        "Requests per second one actor key may send (bursts of twice that); past it 429 "
        "rate_limited with Retry-After. 0: no limit.",
    ),
    Setting(
        "max_memory",
        0,
        "size",
        "A hard cap on the SQLite heap of each shard process (all actors together); a "
        "statement that needs more fails alone (503 overloaded). Past three quarters of "
        "it, cached pages are recycled first. 0: no cap.",
    ),
    Setting(
        "app",
        "",
        "str",
        "Actor classes, MODULE:OBJECT: a shardlite.Actor subclass (every key) or a "
        "shardlite.App (classes by key prefix). Imported with the working directory on the path.",
    ),
    Setting(
        "call_timeout",
        defaults.DEFAULT_CALL_TIMEOUT_S,
        "duration",
        "How long an async actor method (or alarm handler) may run; past it, it is rolled "
        "back (504 timeout).",
    ),
    Setting(
        "durability",
        Durability.LOG.value,
        "choice",
        "When a write is acknowledged: log (after the shard's log is flushed: survives power "
        "loss, one flush for many keys), fsync (after the actor's own file is flushed) or os "
        "(after COMMIT: survives a process crash, not a power cut).",
        choices=tuple(d.value for d in Durability),
    ),
    Setting(
        "statement_timeout",
        defaults.DEFAULT_STATEMENT_TIMEOUT_S,
        "duration",
        "Time budget of one SQL statement; past it the statement is interrupted (504 timeout).",
    ),
    Setting(
        "inline_slice",
        defaults.DEFAULT_INLINE_SLICE_S,
        "duration",
        "A read-only statement still running after this long on a shard's event loop is "
        "stopped and run again in the slow lane (one worker thread per process), so a long "
        "query does not hold other tenants' requests. 0: never.",
    ),
    Setting(
        "max_temp_bytes",
        defaults.DEFAULT_MAX_TEMP_BYTES,
        "size",
        "Temporary storage one statement may use for sorts, grouping, subqueries, index "
        "builds and the undo journal of large updates (held in memory, measured as heap "
        "growth: a rough bound); past it the statement stops (507 quota_exceeded). 0: no "
        "bound.",
    ),
    Setting(
        "mailbox_size",
        defaults.DEFAULT_MAILBOX_SIZE,
        "int",
        "Calls that may wait for one actor; past it callers get 503 overloaded.",
    ),
    Setting(
        "max_batch",
        defaults.DEFAULT_MAX_BATCH,
        "int",
        "Most calls one actor runs in one transaction (group commit).",
        minimum=1,
    ),
    Setting(
        "max_open_actors",
        defaults.DEFAULT_MAX_OPEN_ACTORS,
        "int",
        "Most actor files open at once in a process (LRU); capped by the file-descriptor limit.",
    ),
    Setting(
        "idle_timeout",
        defaults.DEFAULT_IDLE_TIMEOUT_S,
        "duration",
        "An actor idle this long is checkpointed and closed (passivated), once more than "
        "half of --max-open-actors are open.",
    ),
    Setting(
        "max_db_bytes",
        defaults.DEFAULT_MAX_DB_BYTES,
        "size",
        "Size quota of one actor's database file (507 quota_exceeded past it).",
    ),
    Setting(
        "max_value_bytes",
        defaults.DEFAULT_MAX_VALUE_BYTES,
        "size",
        "Largest string, blob, row or KV value (SQLITE_LIMIT_LENGTH).",
    ),
    Setting("max_sql_bytes", defaults.DEFAULT_MAX_SQL_BYTES, "size", "Longest SQL statement text."),
    Setting(
        "max_result_bytes",
        defaults.DEFAULT_MAX_RESULT_BYTES,
        "size",
        "Largest result of one statement (413 too_large past it).",
    ),
    Setting(
        "max_request_bytes",
        DEFAULT_MAX_REQUEST_BYTES,
        "size",
        "Largest HTTP body or RPC frame (413 too_large past it).",
    ),
    Setting(
        "checkpoint_wal_bytes",
        defaults.DEFAULT_CHECKPOINT_WAL_BYTES,
        "size",
        "An actor's WAL is checkpointed (off the event loop) once it grows past this, then "
        "reused from its start if it grew within a minute, else truncated: an actor that "
        "writes often keeps a WAL file of about this size (at most twice it after a large "
        "batch); closing the actor empties it.",
    ),
    Setting(
        "page_size",
        str(defaults.DEFAULT_PAGE_SIZE),
        "choice",
        "SQLite page size of new actor files, in bytes (a file keeps the size it was created "
        "with). A small transaction writes whole pages to the WAL: with many keys each "
        "writing a row at a time, 1024 writes a quarter of the bytes and gave about 1.2x the "
        "durable writes/s at 10,000 keys (docs/benchmarks.md), but rows over about 1,000 "
        "bytes then spill into overflow pages and large tables get deeper.",
        choices=tuple(str(n) for n in defaults.PAGE_SIZES),
    ),
    Setting(
        "fsync_threads",
        defaults.DEFAULT_FSYNC_THREADS,
        "int",
        "Worker threads issuing fdatasyncs concurrently (durability=fsync).",
    ),
    Setting(
        "log_segment_bytes",
        defaults.DEFAULT_LOG_SEGMENT_BYTES,
        "size",
        "durability=log: the shard log starts a new segment file past this size.",
    ),
    Setting(
        "log_init_zero",
        "on",
        "choice",
        "durability=log: zero-fill each log segment file (and fdatasync it) before use, as "
        "PostgreSQL's wal_init_zero does, so a flush overwrites blocks in place and commits "
        "no file-system journal entry for a growing file. Costs --log-segment-bytes of "
        "disk per shard for the next segment; off suits copy-on-write file systems (ZFS, "
        "btrfs).",
        choices=("on", "off"),
    ),
    Setting(
        "log_trim_bytes",
        defaults.DEFAULT_LOG_TRIM_BYTES,
        "size",
        "durability=log: past this much log, the shard's actor files are synced and the log "
        "trimmed, so the log stays about this size.",
    ),
    Setting(
        "log_batches_per_commit",
        defaults.DEFAULT_LOG_BATCHES_PER_COMMIT,
        "int",
        "durability=log: batches an actor's file transaction holds before it commits (the "
        "log makes each batch durable; the file commits at the latest at the log's next "
        "checkpoint). 1: every batch commits its file.",
        minimum=1,
    ),
    Setting(
        "log_checkpoint_interval",
        defaults.DEFAULT_LOG_CHECKPOINT_INTERVAL_S,
        "duration",
        "durability=log: the log is trimmed at least this often.",
    ),
    Setting(
        "body_timeout",
        DEFAULT_BODY_TIMEOUT_S,
        "duration",
        "An HTTP request body must arrive within this time (408 past it).",
    ),
    Setting(
        "shutdown_timeout",
        DEFAULT_SHUTDOWN_TIMEOUT_S,
        "duration",
        "On SIGTERM, how long in-flight requests may take to finish.",
    ),
    Setting(
        "log_level", "info", "choice", "Log level.", choices=("debug", "info", "warning", "error")
    ),
)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"8MiB"`` -> 8388608; plain numbers are bytes."""
    m = _NUMBER_UNIT.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64KiB, 8MiB, 1GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """``"500ms"`` -> 0.5; plain numbers are seconds."""
    m = _NUMBER_UNIT.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration (examples: 0.5, 500ms, 30s, 5m)")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_addr(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ("127.0.0.1", 8080); IPv6 as ``[::1]:8080``."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if not 0 <= int(port) < 65536:
        raise ValueError(f"port {port} is out of range")
    return host.strip("[]"), int(port)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "size": parse_size,
    "duration": parse_duration,
    "choice": str,
    "addr": parse_addr,
}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every server setting, parsed. Build with :func:`settings_from`."""

    data: str = DEFAULT_DATA_DIR
    http: tuple[str, int] = parse_addr(DEFAULT_HTTP)
    rpc: tuple[str, int] = parse_addr(DEFAULT_RPC)
    procs: int = 0
    directory: str = ""
    host_id: str = ""
    advertise: str = ""
    lease_ttl: float = DEFAULT_LEASE_TTL_S
    retired_keep: float = 24 * 3600.0
    shards: int = 0
    slots: int = DEFAULT_SLOTS
    auth: str = "auto"
    auth_secret: str = ""
    rate_limit: float = 0.0
    max_memory: int = 0
    app: str = ""
    call_timeout: float = defaults.DEFAULT_CALL_TIMEOUT_S
    durability: str = Durability.LOG.value
    statement_timeout: float = defaults.DEFAULT_STATEMENT_TIMEOUT_S
    inline_slice: float = defaults.DEFAULT_INLINE_SLICE_S
    max_temp_bytes: int = defaults.DEFAULT_MAX_TEMP_BYTES
    mailbox_size: int = defaults.DEFAULT_MAILBOX_SIZE
    max_batch: int = defaults.DEFAULT_MAX_BATCH
    max_open_actors: int = defaults.DEFAULT_MAX_OPEN_ACTORS
    idle_timeout: float = defaults.DEFAULT_IDLE_TIMEOUT_S
    max_db_bytes: int = defaults.DEFAULT_MAX_DB_BYTES
    max_value_bytes: int = defaults.DEFAULT_MAX_VALUE_BYTES
    max_sql_bytes: int = defaults.DEFAULT_MAX_SQL_BYTES
    max_result_bytes: int = defaults.DEFAULT_MAX_RESULT_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    checkpoint_wal_bytes: int = defaults.DEFAULT_CHECKPOINT_WAL_BYTES
    page_size: str = str(defaults.DEFAULT_PAGE_SIZE)
    fsync_threads: int = defaults.DEFAULT_FSYNC_THREADS
    log_segment_bytes: int = defaults.DEFAULT_LOG_SEGMENT_BYTES
    log_init_zero: str = "on"
    log_trim_bytes: int = defaults.DEFAULT_LOG_TRIM_BYTES
    log_checkpoint_interval: float = defaults.DEFAULT_LOG_CHECKPOINT_INTERVAL_S
    log_batches_per_commit: int = defaults.DEFAULT_LOG_BATCHES_PER_COMMIT
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    log_level: str = "info"

    @property
    def auth_secrets(self) -> list[str]:
        return [p.strip() for p in self.auth_secret.split(",") if p.strip()]

    def auth_required(self) -> bool:
        """``--auth auto``: required unless both listen addresses are loopback."""
        if self.auth != "auto":
            return self.auth == "required"
        return not (is_loopback_host(self.http[0]) and is_loopback_host(self.rpc[0]))

    def actor_config(self, max_open_actors: int | None = None) -> ActorConfig:
        return ActorConfig(
            durability=Durability(self.durability),
            statement_timeout_s=self.statement_timeout,
            inline_slice_s=self.inline_slice,
            max_temp_bytes=self.max_temp_bytes,
            mailbox_size=self.mailbox_size,
            max_batch=self.max_batch,
            max_open_actors=max_open_actors or self.max_open_actors,
            idle_timeout_s=self.idle_timeout,
            max_db_bytes=self.max_db_bytes,
            max_value_bytes=self.max_value_bytes,
            max_sql_bytes=self.max_sql_bytes,
            max_result_bytes=self.max_result_bytes,
            checkpoint_wal_bytes=self.checkpoint_wal_bytes,
            page_size=int(self.page_size),
            fsync_threads=self.fsync_threads,
            log_segment_bytes=self.log_segment_bytes,
            log_init_zero=self.log_init_zero == "on",
            log_trim_bytes=self.log_trim_bytes,
            log_checkpoint_interval_s=self.log_checkpoint_interval,
            log_batches_per_commit=self.log_batches_per_commit,
            call_timeout_s=self.call_timeout,
        )


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_setting(setting: Setting, value: Any) -> Any:
    """Parse one setting's text (or pass through an already typed value)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = _PARSERS[setting.kind](value)
    except ValueError as exc:
        raise ValueError(f"{setting.flag}: {exc}") from None
    if setting.choices and parsed not in setting.choices:
        raise ValueError(f"{setting.flag}: {value!r} is not one of {', '.join(setting.choices)}")
    if setting.kind in ("int", "size") and parsed < setting.minimum:
        if setting.minimum == 0:
            raise ValueError(f"{setting.flag}: must not be negative")
        raise ValueError(f"{setting.flag}: must be at least {setting.minimum}")
    return parsed


def settings_from(values: dict[str, Any]) -> Settings:
    """Build Settings from raw values (CLI/env text or typed), validating each."""
    by_name = {s.name: s for s in SETTINGS}
    parsed = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in by_name:
            raise ValueError(f"unknown setting {name!r}")
        parsed[name] = parse_setting(by_name[name], value)
    return Settings(**parsed)


def settings_markdown() -> str:
    """The settings table as Markdown (docs/settings.md)."""
    lines = [
        "# shardlite serve: settings",
        "",
        "Generated from `shards/_settings.py` by `shardlite settings --markdown`; do not edit.",
        "Every setting is a flag of `shardlite serve` and an environment variable.",
        "",
        "| flag | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = s.default
        if s.kind == "size":
            default = _format_size(int(default))
        elif s.kind == "duration":
            default = f"{default:g}s"
        choices = f" One of: {', '.join(s.choices)}." if s.choices else ""
        lines.append(f"| `{s.flag}` | `{s.envvar}` | `{default}` | {s.help}{choices} |")
    return "\n".join(lines) + "\n"


def _format_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)
