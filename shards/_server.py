"""The shard server process: the actor pool above the HTTP and RPC servers.

The pool's nursery is the outermost: on SIGTERM/SIGINT both servers stop accepting,
in-flight requests finish (bounded by ``shutdown_timeout``), then the pool drains every
mailbox, releases every reply, checkpoints and closes every file, and only then does the
process exit.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import logging
import os
import resource
import signal
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from shardlite.actor import open_actor_pool

from ._http import create_app
from ._metrics import Metrics
from ._rpc import serve_rpc
from ._settings import Settings

log = logging.getLogger("shardlite.server")

DEFAULT_SHARD = "shard-00"
FDS_PER_ACTOR = {"os": 2, "log": 2, "fsync": 3}
"""The database and its WAL (no -shm: locking_mode=EXCLUSIVE), plus the flusher's own
descriptor of the WAL with durability=fsync."""
FDS_RESERVED = 256
"""Descriptors kept for sockets, logs and worker threads."""


class ServerInfo(msgspec.Struct, frozen=True):
    http_url: str
    rpc_url: str
    data: str
    durability: str
    max_open_actors: int


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class DataDirInUse(OSError):
    """Another process serves this data directory."""


def lock_data_dir(data: str) -> int:
    """Hold an exclusive lock on DATA/.lock for the life of the process.

    Two servers on one data directory would open the same SQLite files with separate
    connections and unlink each other's files; the second one refuses to start.
    """
    fd = os.open(os.path.join(data, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"{data} is in use by another shardlite process") from None
    return fd


def shard_dir(data: str, shard: str = DEFAULT_SHARD) -> str:
    return os.path.join(os.path.abspath(data), "shards", shard)


async def run_server(
    settings: Settings,
    *,
    handle_signals: bool = True,
    stopping: trio.Event | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stopping`` is set); ``task_status`` gets ServerInfo."""
    stopping = stopping if stopping is not None else trio.Event()
    data = os.path.abspath(settings.data)  # noqa: ASYNC240 (no I/O: a string operation)
    directory = shard_dir(data)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lock = lock_data_dir(data)
    fd_cap = max(16, (raise_fd_limit() - FDS_RESERVED) // FDS_PER_ACTOR[settings.durability])
    max_open = min(settings.max_open_actors, fd_cap)
    if max_open < settings.max_open_actors:
        log.warning("max_open_actors lowered to %d by the file-descriptor limit", max_open)
    config = settings.actor_config(max_open_actors=max_open)
    metrics = Metrics()

    async with trio.open_nursery() as outer:
        if handle_signals:
            outer.start_soon(_stop_on_signal, stopping)
        async with open_actor_pool(config, lambda key: directory, shards=[directory]) as pool:
            metrics.watch_pool(pool)
            app = create_app(pool, settings, metrics)
            async with trio.open_nursery() as servers:
                http_urls = await servers.start(
                    functools.partial(
                        hypercorn_serve,
                        app,
                        _hypercorn_config(settings),
                        shutdown_trigger=stopping.wait,
                    )
                )
                rpc_addresses = await servers.start(
                    functools.partial(
                        serve_rpc,
                        pool,
                        metrics,
                        settings.rpc[0],
                        settings.rpc[1],
                        max_frame_bytes=settings.max_request_bytes,
                        stopping=stopping,
                    )
                )
                host, port = rpc_addresses[0]
                info = ServerInfo(
                    http_url=http_urls[0],
                    rpc_url=f"rpc://{_host_for_url(host)}:{port}",
                    data=data,
                    durability=settings.durability,
                    max_open_actors=max_open,
                )
                # Everything allocated so far (modules, the app) lives as long as the
                # process: keep it out of the cyclic collector's full passes, which
                # otherwise stall the loop for tens of milliseconds under load.
                gc.freeze()
                task_status.started(info)
            log.info("servers stopped; draining actors")
        log.info("all actors closed")
        outer.cancel_scope.cancel()
    os.close(lock)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _hypercorn_config(settings: Settings) -> HypercornConfig:
    cfg = HypercornConfig()
    host, port = settings.http
    cfg.bind = [f"{_host_for_url(host)}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("shardlite.http")
    cfg.keep_alive_timeout = 5.0
    cfg.read_timeout = 30
    cfg.graceful_timeout = settings.shutdown_timeout
    return cfg


async def _stop_on_signal(stopping: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; shutting down gracefully", signal.Signals(signum).name)
            stopping.set()
            return
