"""``shardlite serve --procs N``: N shard processes under one supervisor.

The supervisor locks the data directory, creates or finds the cluster (giving this
host's shards evenly to its N nodes, see _cluster.py), binds the public HTTP and RPC
sockets once and starts N children that all accept on them (the kernel spreads the
connections); each child also listens on a port of its own, which it registers in the
directory, so that peers forward to it and routing clients reach it directly.

A child that dies is started again with backoff (its keys are unavailable meanwhile;
what it acknowledged is in its shards' logs and files). SIGTERM or SIGINT stops the
children gracefully (each drains and closes its actors) and then the supervisor. A child
whose supervisor dies notices its stdin closing and stops too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import msgspec
import trio

from shardlite.router import DirectoryUnavailable, open_directory

from ._cluster import ensure_cluster, resolve_host_id
from ._server import (
    NodeSpec,
    ServerInfo,
    host_for_url,
    lock_data_dir,
    reuseport_socket,
    run_server,
    stop_on_signal,
)
from ._settings import Settings

log = logging.getLogger("shardlite.supervisor")

SPEC_ENV = "SHARDLITE_NODE_SPEC"
SETTINGS_ENV = "SHARDLITE_NODE_SETTINGS"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0
"""A child that ran this long is healthy again: its next restart starts from the first
backoff."""
STOP_GRACE_S = 10.0
"""Past its --shutdown-timeout, how long a shard process may take to exit on SIGTERM
before the supervisor kills it."""
BACKLOG = 4096


class HostInfo(msgspec.Struct, frozen=True):
    """What the supervisor reports once every child serves."""

    http_url: str
    rpc_url: str
    data: str
    durability: str
    procs: int
    nodes: list[ServerInfo]


def default_procs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _reserve(address: tuple[str, int]) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: it holds the port (and resolves port 0)
    while each child listens on it with a socket of its own, and the kernel spreads
    the connections over the children's sockets (a hash of each connection's addresses).
    A shared accept queue would give every connection to whichever process accepts
    first: measured 4+0 splits of four long-lived client connections."""
    return reuseport_socket(address)


async def run_supervisor(
    settings: Settings,
    *,
    procs: int,
    stopping: trio.Event | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``procs`` shard processes until SIGTERM/SIGINT (or ``stopping``)."""
    stopping = stopping if stopping is not None else trio.Event()
    data = os.path.abspath(settings.data)  # noqa: ASYNC240 (no I/O: a string operation)
    os.makedirs(os.path.join(data, "shards"), mode=0o700, exist_ok=True)
    lock = lock_data_dir(data)
    # The children inherit the lock (one open file description, one flock): the data
    # directory stays locked until the last of them exits, even if the supervisor dies.
    os.set_inheritable(lock, True)
    try:
        host_id = resolve_host_id(data, settings.host_id)
        async with open_directory(settings.directory, data) as directory:
            await ensure_cluster(
                directory,
                data,
                host_id,
                procs=procs,
                shards=settings.shards,
                slots=settings.slots,
            )
        http_sock, rpc_sock = _reserve(settings.http), _reserve(settings.rpc)
        child_settings = msgspec.structs.replace(settings, host_id=host_id)
        try:
            async with trio.open_nursery() as nursery:
                # caught before any child exists: a child is never left to the signal
                await nursery.start(stop_on_signal, stopping)
                since = time.time()
                children = [
                    _Child(
                        NodeSpec(
                            i,
                            procs,
                            http_sock.getsockname()[:2],
                            rpc_sock.getsockname()[:2],
                            since,
                        ),
                        child_settings,
                        lock,
                    )
                    for i in range(procs)
                ]
                infos: list[ServerInfo] = []

                async def start(child: _Child) -> None:
                    infos.append(await nursery.start(child.run, stopping))

                async with trio.open_nursery() as starting:  # together: each waits for all
                    for child in children:
                        starting.start_soon(start, child)
                infos.sort(key=lambda info: info.node)
                http_host, http_port = http_sock.getsockname()[:2]
                rpc_host, rpc_port = rpc_sock.getsockname()[:2]
                task_status.started(
                    HostInfo(
                        http_url=f"http://{host_for_url(http_host)}:{http_port}",
                        rpc_url=f"rpc://{host_for_url(rpc_host)}:{rpc_port}",
                        data=data,
                        durability=settings.durability,
                        procs=procs,
                        nodes=infos,
                    )
                )
        finally:
            http_sock.close()
            rpc_sock.close()
    finally:
        os.close(lock)


def child_command() -> list[str]:
    """How a shard process is started: with SIGINT ignored from its first instruction.

    A shell's ``trap "" INT`` holds across its ``exec`` of Python, which leaves an
    ignored SIGINT ignored. A terminal's Ctrl-C reaches the whole process group, and the
    supervisor alone acts on it, stopping each child with SIGTERM: a child interrupted
    in its imports printed a traceback, and one cancelled while starting looked as if it
    had failed to start.
    """
    ignore_sigint = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh"]
    return [*ignore_sigint, sys.executable, "-m", "shardlite.shards._child"]


class StoppedStarting(RuntimeError):
    """``serve`` was told to stop (SIGINT, SIGTERM) before every shard process was ready:
    not a failure. Find it in the exception groups around it with :func:`stopped_starting`."""


class _Child:
    """One shard process: started, watched, restarted with backoff, stopped."""

    def __init__(self, spec: NodeSpec, settings: Settings, lock: int) -> None:
        self.index = spec.index
        self.spec = spec
        self.settings = settings
        self.fds = (lock,)

    async def run(
        self, stopping: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = BACKOFF_FIRST_S
        started = False
        while not stopping.is_set():
            began = trio.current_time()
            code = await self._run_once(stopping, task_status if not started else None)
            started = True
            if stopping.is_set():
                return
            if trio.current_time() - began > HEALTHY_AFTER_S:
                backoff = BACKOFF_FIRST_S
            log.error(
                "shard process %d exited (%s); starting it again in %.1fs",
                self.index,
                _exit_reason(code),
                backoff,
            )
            with trio.move_on_after(backoff):
                await stopping.wait()
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self, stopping: trio.Event, task_status: Any) -> int:
        env = dict(os.environ)
        env[SPEC_ENV] = msgspec.json.encode(self.spec).decode()
        env[SETTINGS_ENV] = msgspec.json.encode(self.settings).decode()
        proc = await trio.lowlevel.open_process(
            child_command(),
            stdin=-1,  # PIPE: closes when the supervisor dies, and the child stops
            stdout=-1,
            env=env,
            pass_fds=self.fds,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on(stop: trio.Event) -> None:
                    await stop.wait()
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)  # one still starting gives up

                nursery.start_soon(stop_on, stopping)
                line = await _read_line(proc.stdout)
                if task_status is not None:
                    if not line:
                        code = await proc.wait()
                        if stopping.is_set():  # told to stop (SIGINT/SIGTERM) while starting
                            raise StoppedStarting(f"shard process {self.index} stopped")
                        raise RuntimeError(
                            f"shard process {self.index} failed to start ({_exit_reason(code)})"
                        )
                    task_status.started(msgspec.json.decode(line, type=ServerInfo))
                nursery.start_soon(_drain, proc.stdout)
                code = await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Left early (a sibling failed to start, or the supervisor is cancelled): the
            # child holds the data directory's lock, so it must not outlive us.
            await self._stop(proc)
        await proc.stdin.aclose()
        return code

    async def _stop(self, proc: trio.Process) -> None:
        if proc.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            proc.send_signal(signal.SIGTERM)  # a child still starting gives up at once
            with trio.move_on_after(self.settings.shutdown_timeout + STOP_GRACE_S):
                await proc.wait()
            if proc.returncode is None:
                log.error("shard process %d did not stop on SIGTERM: killing it", self.index)
                proc.kill()
                await proc.wait()


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return b""
        buf += chunk
    return buf.split(b"\n", 1)[0]


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


STARTUP_ERRORS = (OSError, ValueError, RuntimeError, DirectoryUnavailable)
"""Port in use, data directory locked, a bad directory URL, etcd unreachable, a shard
log that cannot be replayed, a shard process that would not start: one line, no
traceback."""


def stopped_starting(exc: BaseException) -> bool:
    """Whether ``exc`` (or a group around it) says serve was stopped while starting."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(StoppedStarting) is not None
    return isinstance(exc, StoppedStarting)


def startup_error(exc: BaseException) -> BaseException | None:
    """The reason behind a startup failure, out of the exception groups around it."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = startup_error(inner)
            if found is not None:
                return found
        return None
    if isinstance(exc, STARTUP_ERRORS):
        return exc
    return None


# ---------------------------------------------------------------------- the child side


def child_main() -> None:
    """Entry point of a shard process started by the supervisor."""
    spec = msgspec.json.decode(os.environ.pop(SPEC_ENV), type=NodeSpec)
    settings = msgspec.json.decode(os.environ.pop(SETTINGS_ENV), type=Settings)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{spec.index}] %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def main() -> None:
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                await run_server(
                    settings, node_spec=spec, stopping=stopping, task_status=task_status
                )
                nursery.cancel_scope.cancel()  # drained and closed: the orphan watch goes too

            nursery.start_soon(_stop_when_orphaned, stopping)
            with trio.CancelScope() as startup:
                # told to stop (SIGTERM, or the supervisor gone) before it serves: give
                # up at once. Waiting for peers that will never come would keep this
                # process, and the data directory's lock, alive for ever.
                nursery.start_soon(_cancel_when, stopping, startup)
                info = await nursery.start(serve)
            if startup.cancelled_caught:
                log.warning("stopped before it served")
                nursery.cancel_scope.cancel()
                return
            sys.stdout.write(msgspec.json.encode(info).decode() + "\n")
            sys.stdout.flush()
            started.append(True)

    started: list[bool] = []
    try:
        trio.run(main)
    except (*STARTUP_ERRORS, BaseExceptionGroup) as exc:
        reason = startup_error(exc)
        if started or reason is None:
            raise  # a failure while serving keeps its traceback
        log.error("cannot serve: %s", reason)  # the supervisor says which process failed
        sys.exit(1)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()  # nothing once the scope has exited


async def _stop_when_orphaned(stopping: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    try:
        while await stdin.receive_some(1024):
            pass
    finally:
        await stdin.aclose()
    log.warning("the supervisor is gone; stopping")
    stopping.set()
