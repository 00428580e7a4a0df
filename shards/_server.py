"""The shard server process: the actor pool above the HTTP and RPC servers.

The pool's nursery is the outermost: on SIGTERM/SIGINT both servers stop accepting,
in-flight requests finish (bounded by ``shutdown_timeout``), then the pool drains every
mailbox, releases every reply, checkpoints and closes every file, and only then does the
process exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import logging
import os
import resource
import signal
import socket as stdlib_socket
import time
from collections.abc import Callable
from typing import Any

import apsw
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from shardlite.actor import load_app, open_actor_pool
from shardlite.router import (
    Directory,
    DirectoryUnavailable,
    Forwarder,
    HostRecord,
    Lease,
    NodeRecord,
    Placement,
    open_directory,
    open_lease,
)

from ._admin import Admin
from ._auth import (
    PEER,
    PEER_TTL_S,
    REVOKED_POLL_S,
    Auth,
    RateLimiter,
    create_token,
    load_keys,
    signing_key,
)
from ._cluster import ensure_cluster, node_id, resolve_host_id
from ._http import create_app
from ._metrics import Metrics
from ._routing import Node
from ._rpc import serve_rpc
from ._settings import Settings
from ._shardfiles import delete_retired

log = logging.getLogger("shardlite.server")

FDS_PER_ACTOR = {"os": 2, "log": 2, "fsync": 3}
"""The database and its WAL (no -shm: locking_mode=EXCLUSIVE), plus the flusher's own
descriptor of the WAL with durability=fsync."""
FDS_RESERVED = 256
"""Descriptors kept for sockets, logs and worker threads."""
LISTEN_BACKLOG = 4096
GC_THRESHOLDS = (100_000, 50, 100)
"""The cyclic collector's thresholds once serving (CPython's default is 700, 10, 10).
Under load the default ran a young pass dozens of times a second, each promoting the
requests in flight, which then piled into full passes over every open actor's objects
(a fifth of a pass a second at 10,000 keys, each a stop of the loop). What a request
allocates is freed by reference counts; the collector is only for cycles (tracebacks,
cancelled tasks), and this still runs it every 100,000 net allocations."""
_KEEP_OPEN: list[stdlib_socket.socket] = []
"""Listening sockets hypercorn uses by descriptor: they must outlive the server."""


class ServerInfo(msgspec.Struct, frozen=True):
    http_url: str
    rpc_url: str
    data: str
    durability: str
    max_open_actors: int
    node: str = ""
    shards: list[str] = []
    auth: bool = False


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` descriptors; return the new soft limit.

    The soft limit goes up to the hard one. If that is still short of ``wanted``, the hard
    limit is raised too when the process may (root or CAP_SYS_RESOURCE, as Redis does
    for ``maxclients``); otherwise the pool opens fewer actors (see the caller).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(OSError, ValueError):  # unprivileged, or past fs.nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
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


class NodeSpec(msgspec.Struct, frozen=True):
    """How a supervisor starts one of its shard processes (see _supervisor.py)."""

    index: int
    procs: int
    http: tuple[str, int]
    rpc: tuple[str, int]
    """The host's public addresses: each process listens there too (SO_REUSEPORT)."""
    since: float
    """When the supervisor started: a peer registered before that is a previous one."""


async def run_server(
    settings: Settings,
    *,
    node_spec: NodeSpec | None = None,
    handle_signals: bool = True,
    stopping: trio.Event | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stopping`` is set); ``task_status`` gets ServerInfo.

    Alone (``node_spec`` None) this process is the host's only shard process: it locks
    the data directory, creates or finds the cluster and owns every shard of this host.
    Under a supervisor it serves the shards the directory gives its node, on the
    listening sockets it inherited, plus an RPC listener of its own for direct routing.
    """
    stopping = stopping if stopping is not None else trio.Event()
    data = os.path.abspath(settings.data)  # noqa: ASYNC240 (no I/O: a string operation)
    os.makedirs(os.path.join(data, "shards"), mode=0o700, exist_ok=True)
    lock = lock_data_dir(data) if node_spec is None else -1
    try:
        host_id = resolve_host_id(data, settings.host_id)
        per_actor = FDS_PER_ACTOR[settings.durability]
        wanted = settings.max_open_actors * per_actor + FDS_RESERVED
        fd_cap = max(16, (raise_fd_limit(wanted) - FDS_RESERVED) // per_actor)
        max_open = min(settings.max_open_actors, fd_cap)
        if max_open < settings.max_open_actors:
            log.warning("max_open_actors lowered to %d by the file-descriptor limit", max_open)
        config = settings.actor_config(max_open_actors=max_open)
        if settings.max_memory:
            apsw.hard_heap_limit(settings.max_memory)
            # past this, SQLite recycles cached pages before it allocates: caches shrink
            # before a statement fails for want of memory
            apsw.soft_heap_limit(settings.max_memory * 3 // 4)
        metrics = Metrics()
        index = node_spec.index if node_spec else 0
        async with open_directory(settings.directory, data) as directory:
            if node_spec is None:
                placement = await ensure_cluster(
                    directory, data, host_id, procs=1, shards=settings.shards, slots=settings.slots
                )
            else:
                loaded = await directory.load()
                if loaded is None:
                    raise RuntimeError(f"the directory {directory.url} has no cluster")
                placement = loaded
            lease = await open_lease(directory, settings.lease_ttl)
            await _serve(
                settings=settings,
                config=config,
                metrics=metrics,
                directory=directory,
                placement=placement,
                lease=lease,
                host_id=host_id,
                index=index,
                node_spec=node_spec,
                handle_signals=handle_signals,
                stopping=stopping,
                task_status=task_status,
            )
    finally:
        if lock >= 0:
            os.close(lock)


async def _keep_lease(scope: trio.CancelScope, lease: Lease) -> None:
    with scope:
        await lease.run()


async def _serve(
    *,
    settings: Settings,
    config: Any,
    metrics: Metrics,
    directory: Directory,
    placement: Placement,
    lease: Lease,
    host_id: str,
    index: int,
    node_spec: NodeSpec | None,
    handle_signals: bool,
    stopping: trio.Event,
    task_status: Any,
) -> None:
    data = os.path.abspath(settings.data)  # noqa: ASYNC240 (no I/O: a string operation)
    holder: list[Node] = []
    async with trio.open_nursery() as outer:
        if handle_signals:
            # a shard process leaves SIGINT (a terminal's Ctrl-C) to its supervisor, which
            # stops it with SIGTERM (_supervisor.child_command)
            which = (signal.SIGTERM,) if node_spec is not None else (signal.SIGTERM, signal.SIGINT)
            outer.start_soon(stop_on_signal, stopping, which)
        classes = load_app(settings.app) if settings.app else None
        async with open_actor_pool(config, _locate_by(holder), app=classes) as pool:
            metrics.watch_pool(pool)
            async with trio.open_nursery() as background:
                background.start_soon(metrics.watch_loop_lag)
                auth, credential = _auth_for(settings, data)
                forwarder = Forwarder(background, settings.max_request_bytes, credential)
                async with trio.open_nursery() as servers:
                    record = NodeRecord(
                        node_id(host_id, index), host_id, "", "", os.getpid(), time.time()
                    )
                    node = Node(
                        record=record,
                        directory=directory,
                        placement=placement,
                        lease=lease,
                        data=data,
                        forwarder=forwarder,
                        attach=pool.attach_shard,
                    )
                    holder.append(node)
                    metrics.watch_held(node.held)
                    metrics.watch_unservable(lambda: len(node.unservable))
                    node.admin = admin = Admin(pool, node, data, background)
                    node.detach = admin.detach
                    node.prepare = admin.prepare
                    node.nursery = background
                    background.start_soon(delete_retired, data, settings.retired_keep)
                    node.auth = auth
                    if settings.rate_limit > 0:
                        node.rate_limit = RateLimiter(settings.rate_limit)
                    if pool.runtime is not None:  # actor classes call others through it
                        pool.runtime.remote = functools.partial(node.call, pool)
                    # renew the lease while starting: recovering the shards' logs after a
                    # crash can take longer than its TTL, and the registration needs it
                    starting = trio.CancelScope()
                    background.start_soon(_keep_lease, starting, lease)
                    await node.adopt(placement)
                    app = create_app(pool, node, settings, metrics)
                    http_urls = await servers.start(
                        functools.partial(
                            hypercorn_serve,
                            app,
                            _hypercorn_config(settings, node_spec),
                            shutdown_trigger=stopping.wait,
                        )
                    )
                    listeners = _rpc_listeners(node_spec)
                    rpc_addresses = await servers.start(
                        functools.partial(
                            serve_rpc,
                            pool,
                            node,
                            metrics,
                            settings.rpc if listeners is None else listeners,
                            max_frame_bytes=settings.max_request_bytes,
                            stopping=stopping,
                        )
                    )
                    if node_spec is not None:  # a listener of its own, for direct routing
                        own = await servers.start(
                            functools.partial(
                                serve_rpc,
                                pool,
                                node,
                                metrics,
                                (settings.rpc[0], 0),
                                max_frame_bytes=settings.max_request_bytes,
                                stopping=stopping,
                            )
                        )
                        direct = own[0]
                    else:
                        direct = rpc_addresses[0]
                    advertise = _advertised(settings, direct[0])
                    node.record = record = NodeRecord(
                        record.id,
                        host_id,
                        f"{host_for_url(advertise)}:{direct[1]}",
                        http_urls[-1],  # its own port (the shared one when alone)
                        os.getpid(),
                        record.started,
                    )
                    if node_spec is None or node_spec.index == 0:
                        public_rpc = f"{host_for_url(advertise)}:{rpc_addresses[0][1]}"
                        node.host_record = HostRecord(host_id, public_rpc, http_urls[0])
                    await node.register()
                    registered = await directory.load()  # this very process included
                    if registered is not None:
                        await node.adopt(registered)
                    starting.cancel()  # the node keeps it from here (and registers again)
                    await background.start(node.run_lease)
                    await background.start(node.run_watcher)
                    if auth.required:
                        background.start_soon(_follow_revocations, directory, auth)
                    if node_spec is not None:
                        await node.wait_for_peers(node_spec.procs, node_spec.since)
                    host, port = rpc_addresses[0]
                    info = ServerInfo(
                        http_url=http_urls[0],
                        rpc_url=f"rpc://{host_for_url(host)}:{port}",
                        data=data,
                        durability=settings.durability,
                        max_open_actors=config.max_open_actors,
                        node=record.id,
                        shards=sorted(node.served),
                        auth=auth.required,
                    )
                    # Everything allocated so far (modules, the app) lives as long as the
                    # process: keep it out of the cyclic collector's full passes, which
                    # otherwise stall the loop for tens of milliseconds under load.
                    gc.freeze()
                    gc.set_threshold(*GC_THRESHOLDS)
                    task_status.started(info)
                # the servers have finished their in-flight requests (forwarded ones
                # too): now the watcher and the forwarding connections go
                background.cancel_scope.cancel()
            log.info("servers stopped; draining actors")
        log.info("all actors closed")
        with trio.CancelScope(shield=True):
            await holder[0].lease.revoke()
        outer.cancel_scope.cancel()


def _auth_for(settings: Settings, data: str) -> tuple[Auth, Callable[[], str | None]]:
    """The token checker, and this process's host credential for its peers."""
    required = settings.auth_required()
    if not required:
        return Auth({}, required=False), lambda: None
    secrets = settings.auth_secrets
    keys = load_keys(data, secrets, create=True)
    kid, secret = signing_key(data, secrets)

    def credential() -> str:
        return create_token(kid, secret, pattern="*", perm=PEER, ttl_s=PEER_TTL_S)[0]

    return Auth(keys, required=True), credential


async def _follow_revocations(directory: Directory, auth: Auth) -> None:
    """Keep the set of revoked token ids current (every REVOKED_POLL_S)."""
    while True:
        try:
            auth.revoked = set(await directory.revoked_tokens())
        except DirectoryUnavailable as exc:
            log.warning("cannot read revoked tokens: %s", exc)
        await trio.sleep(REVOKED_POLL_S)


def _locate_by(holder: list[Node]) -> Callable[[str], str]:
    def locate(key: str) -> str:
        return holder[0].locate(key)

    return locate


def _rpc_listeners(node_spec: NodeSpec | None) -> list[trio.SocketListener] | None:
    if node_spec is None:
        return None
    sock = trio.socket.from_stdlib_socket(listen_shared(node_spec.rpc))
    return [trio.SocketListener(sock)]


def reuseport_socket(address: tuple[str, int]) -> stdlib_socket.socket:
    """A TCP socket bound to ``address`` with SO_REUSEPORT (not listening yet)."""
    host, port = address
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    sock = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def listen_shared(address: tuple[str, int]) -> stdlib_socket.socket:
    """A listening socket on the host's public ``address``, shared by port (SO_REUSEPORT)
    with the host's other shard processes."""
    sock = reuseport_socket(address)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _advertised(settings: Settings, listen_host: str) -> str:
    if settings.advertise:
        return settings.advertise
    if listen_host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return listen_host


def host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _hypercorn_config(settings: Settings, node_spec: NodeSpec | None) -> HypercornConfig:
    cfg = HypercornConfig()
    host, port = settings.http
    if node_spec is not None:  # the host's port, shared by its processes (SO_REUSEPORT)
        sock = listen_shared(node_spec.http)
        _KEEP_OPEN.append(sock)
        # and a port of its own: /metrics of this very process, for Prometheus to scrape
        cfg.bind = [f"fd://{sock.fileno()}", f"{host_for_url(host)}:0"]
    else:
        cfg.bind = [f"{host_for_url(host)}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("shardlite.http")
    cfg.keep_alive_timeout = 5.0
    cfg.read_timeout = 30
    cfg.graceful_timeout = settings.shutdown_timeout
    return cfg


async def stop_on_signal(
    stopping: trio.Event,
    which: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Set ``stopping`` on the first of these signals (SIGTERM or SIGINT). Started
    (``nursery.start``) once the signals are caught."""
    with trio.open_signal_receiver(*which) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s; shutting down gracefully", signal.Signals(signum).name)
            stopping.set()
            return
