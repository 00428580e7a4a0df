"""Prometheus metrics of one shard server (no per-key labels: keys are unbounded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import apsw
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shardlite.actor import ActorPool, LogDurability

LOOP_LAG_INTERVAL_S = 0.01
_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """The registry and the instruments the HTTP and RPC servers update."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise
        self.registry = CollectorRegistry()
        r = self.registry
        # python_gc_collections_total{generation="2"}: full passes of the cyclic
        # collector, each a stop of the event loop (100s of ms with 10,000 actors open)
        GCCollector(registry=r)
        self.http_requests = Counter(
            "shardlite_http_requests",
            "HTTP requests served.",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_duration = Histogram(
            "shardlite_http_request_duration_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.rpc_requests = Counter(
            "shardlite_rpc_requests",
            "RPC request frames received.",
            registry=r,
        )
        self.rpc_connections = Gauge(
            "shardlite_rpc_connections",
            "Open RPC connections.",
            registry=r,
        )
        self.loop_lag = Histogram(
            "shardlite_event_loop_lag_seconds",
            "How late the event loop ran a task whose timer was due (sampled every "
            f"{LOOP_LAG_INTERVAL_S * 1000:.0f} ms): time spent on other work, which every "
            "request waiting then shares.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.log_flush = Histogram(
            "shardlite_log_flush_duration_seconds",
            "durability=log: a shard log flush round, from its start until its records "
            "are durable (write and fdatasync, in a worker thread).",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        Gauge(
            "shardlite_build_info",
            "Versions of shardlite and its SQLite.",
            ["sqlite", "apsw"],
            registry=r,
        ).labels(apsw.sqlite_lib_version(), apsw.apsw_version()).set(1)

    async def watch_loop_lag(self) -> None:
        """Run forever: how late the event loop wakes a task whose timer is due, every
        ``LOOP_LAG_INTERVAL_S`` (Node's event-loop delay). Every request waits that long too."""
        while True:
            due = trio.current_time() + LOOP_LAG_INTERVAL_S
            await trio.sleep_until(due)
            self.loop_lag.observe(trio.current_time() - due)

    def watch_unservable(self, count: Callable[[], int]) -> None:
        """Export how many of this process's shards it cannot serve (a damaged log)."""
        Gauge(
            "shardlite_shards_unservable",
            "Shards this process owns but cannot serve: their log is damaged or in a "
            "format this build does not read (their keys get 503; see /readyz).",
            registry=self.registry,
        ).set_function(count)

    def watch_held(self, held: Callable[[], int]) -> None:
        """Export how many requests wait behind a shard's fence (a move's cutover) or a
        directory read, at scrape time."""
        Gauge(
            "shardlite_requests_held",
            "Requests held by a shard's fence (a move's cutover) or waiting for the "
            "directory to be read.",
            registry=self.registry,
        ).set_function(held)

    def watch_pool(self, pool: ActorPool) -> None:
        """Export the pool's statistics() at scrape time (and its log flushes as they
        happen)."""
        self.registry.register(_PoolCollector(pool.statistics))
        if isinstance(pool.durability, LogDurability):
            pool.durability.observe_flush = self.log_flush.observe


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        yield GaugeMetricFamily(
            "shardlite_actors_open", "Actors with an open SQLite file.", s["actors_open"]
        )
        yield GaugeMetricFamily(
            "shardlite_actors_known",
            "Actors in memory (open, closing or queued).",
            s["actors_known"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_opens", "Actor files opened (cold starts).", s["opened"]
        )
        yield CounterMetricFamily(
            "shardlite_actor_evictions",
            "Actors closed to stay under the open-actor cap.",
            s["evicted"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_quick_closes",
            "Evictions closed at once on the event loop, with no checkpoint and no sync "
            "(the actor's WAL held at most 64 KiB; it stays beside the file).",
            s["quick_closes"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_checkpoints", "WAL checkpoints run.", s["checkpoints"]
        )
        yield CounterMetricFamily(
            "shardlite_actor_overloaded",
            "Calls refused because a mailbox was full.",
            s["overloaded"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_batches", "Transactions (group commits) run.", s["batches"]
        )
        yield CounterMetricFamily(
            "shardlite_actor_hog_pauses",
            "Times an actor was paused after one batch held the event loop too long.",
            s["hog_pauses"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_slow_calls",
            "Read-only calls moved off the event loop to the slow lane (they outran "
            "--inline-slice).",
            s["slow_calls"],
        )
        yield CounterMetricFamily(
            "shardlite_actor_calls", "Calls run inside transactions.", s["calls"]
        )
        dur = s["durability"]
        if dur.get("mode") == "log":
            for name, help_text, value in (
                (
                    "shardlite_log_flushes",
                    "Shard log flush rounds (one fdatasync each).",
                    dur["rounds"],
                ),
                (
                    "shardlite_log_written_bytes",
                    "Bytes written to shard logs.",
                    dur["log_bytes_written"],
                ),
                (
                    "shardlite_log_trimmed_segments",
                    "Log segments deleted by trimming.",
                    dur["trimmed_segments"],
                ),
                ("shardlite_log_failures", "Failed shard log writes.", dur["failures"]),
                (
                    "shardlite_log_syncfs",
                    "syncfs calls of the log checkpointer (each makes many actor files durable).",
                    dur["syncfs_calls"],
                ),
                (
                    "shardlite_log_recovered_records",
                    "Records the shard logs held when their shards were attached (read by "
                    "recovery).",
                    dur["recovered_records"],
                ),
                (
                    "shardlite_log_read_seconds",
                    "Seconds spent reading the shard logs of attached shards (before they "
                    "serve; the records counted by shardlite_log_recovered_records_total).",
                    dur["log_read_s"],
                ),
                (
                    "shardlite_log_recovered_actors",
                    "Actor files recovery brought up to date from a shard log.",
                    dur["recovered_actors"],
                ),
                (
                    "shardlite_log_damaged_actors",
                    "Actor keys recovery found damaged (marked <file>.db.damaged: each answers "
                    "503 until restored or accepted; see docs/shardlog.md, Damage).",
                    dur["damaged_actors"],
                ),
                (
                    "shardlite_log_file_commit_failures",
                    "Actor file commits of batches held for the log (--log-batches-per-commit) "
                    "that failed; the batches stay in the log and the next commit retries.",
                    dur["file_commit_failures"],
                ),
                (
                    "shardlite_log_reapplied_batches",
                    "Batches applied again from their records after SQLite rolled back an actor "
                    "file's transaction that held them (--log-batches-per-commit).",
                    dur["reapplied_batches"],
                ),
            ):
                yield CounterMetricFamily(name, help_text, value)
            yield GaugeMetricFamily(
                "shardlite_log_recovering_actors",
                "Actor keys whose files recovery has yet to bring up to the shard log after "
                "a restart (it runs while the shard serves; each is brought up first if "
                "called before its turn).",
                dur["recovering_actors"],
            )
            yield GaugeMetricFamily(
                "shardlite_log_unsynced_actors",
                "Actors with logged writes not yet durable in their own file.",
                dur["unsynced_actors"],
            )
            yield GaugeMetricFamily(
                "shardlite_log_size_bytes",
                "Bytes of records in the shard logs: what a restart would read (trimming "
                "keeps it near --log-trim-bytes).",
                dur["log_bytes"],
            )
        app = s.get("app")
        if app is not None:
            for name, help_text, value in (
                ("shardlite_method_calls", "Actor-class method calls run.", app["method_calls"]),
                (
                    "shardlite_alarms_run",
                    "Alarm handlers run (retries included).",
                    app["alarms_run"],
                ),
                (
                    "shardlite_alarm_wakeups",
                    "Fire calls the alarm scheduler submitted.",
                    app["fired"],
                ),
                (
                    "shardlite_workflows_started",
                    "Workflow runners started (resumes included).",
                    app["workflows_started"],
                ),
                (
                    "shardlite_workflows_completed",
                    "Workflows completed.",
                    app["workflows_completed"],
                ),
                ("shardlite_workflows_failed", "Workflows failed.", app["workflows_failed"]),
            ):
                yield CounterMetricFamily(name, help_text, value)
            yield GaugeMetricFamily(
                "shardlite_actors_with_alarms",
                "Actors with at least one pending alarm (the alarm index).",
                app["actors_with_alarms"],
            )
            yield GaugeMetricFamily(
                "shardlite_workflows_running",
                "Workflow runners in this process.",
                app["workflows_running"],
            )
        if dur.get("mode") == "fsync":
            yield CounterMetricFamily("shardlite_fsync_rounds", "Flusher rounds.", dur["rounds"])
            yield CounterMetricFamily(
                "shardlite_fsync_files", "WAL files fdatasync'ed.", dur["syncs"]
            )
            yield CounterMetricFamily(
                "shardlite_fsync_failures", "Failed fdatasyncs.", dur["failures"]
            )
