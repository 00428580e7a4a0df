"""Shared fixtures: an in-process actor pool, and a real `shardlite serve` process."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shardlite.actor import ActorConfig, ActorPool, Durability, open_actor_pool

SERVE_READY = re.compile(r"shardlite serving (http://\S+) and (rpc://\S+)")
SERVER_START_TIMEOUT_S = 30.0


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[ActorPool]:
    """An actor pool over a temporary directory (one shard), durability=log."""
    async with open_actor_pool(ActorConfig(), str(tmp_path)) as p:
        yield p


@pytest.fixture
async def fsync_pool(tmp_path: Path) -> AsyncIterator[ActorPool]:
    """An actor pool over a temporary directory, durability=fsync."""
    config = ActorConfig(durability=Durability.FSYNC)
    async with open_actor_pool(config, str(tmp_path)) as p:
        yield p


@pytest.fixture
async def os_pool(tmp_path: Path) -> AsyncIterator[ActorPool]:
    """An actor pool over a temporary directory, durability=os."""
    config = ActorConfig(durability=Durability.OS)
    async with open_actor_pool(config, str(tmp_path)) as p:
        yield p


class ServerProcess:
    """A `shardlite serve` child process on loopback with its own data directory."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.http_url = ""
        self.rpc_url = ""
        self.output: list[str] = []

    def start(self) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "shardlite",
            "serve",
            "--data",
            str(self.data),
            "--http",
            "127.0.0.1:0",
            "--rpc",
            "127.0.0.1:0",
            *self.args,
        ]
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: kill() takes its children too
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = SERVE_READY.search(line)
                if m:
                    self.http_url, self.rpc_url = m.group(1), m.group(2)
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(SERVER_START_TIMEOUT_S) or not self.rpc_url:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reap()
        return code

    def kill(self) -> None:
        """SIGKILL to the server and every shard process it started: the crash path."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        self._pump.join(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def log(self) -> str:
        return "".join(self.output)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: start_server(*args, data=None) -> a running ServerProcess (stopped at the end)."""
    started: list[ServerProcess] = []

    def start(
        *args: str, data: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(data or tmp_path / "data", *args, env=env).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            try:
                server.terminate(30)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture
def server(start_server: Any) -> ServerProcess:
    """One running server with the default settings (durability=fsync)."""
    return start_server()


# ---------------------------------------------------------------------- a real etcd

ETCD_START_TIMEOUT_S = 20.0
ETCD_PORT_ATTEMPTS = 3  # a free port another process takes before etcd binds it: new ports
ETCD_PREFIX = "/shardlite/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def clean_etcd(client_url: str) -> None:
    """Delete every key under the directory's prefix."""
    end = ETCD_PREFIX[:-1] + chr(ord(ETCD_PREFIX[-1]) + 1)
    body = {"key": _b64(ETCD_PREFIX.encode()), "range_end": _b64(end.encode())}
    httpx.post(client_url + "/v3/kv/deleterange", json=body, timeout=10).raise_for_status()


class EtcdServer:
    """A real etcd (Debian's etcd-server) on free loopback ports (never 2379).

    CI installs it (``.ci/run``): a missing binary fails the tests rather than skipping
    them. ``stop()`` and ``start()`` again keep its data and ports (etcd lost, then back).
    """

    def __init__(self, work: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: apt-get install etcd-server (.ci/run does it)")
        self.binary = binary
        self.work = work
        self.ran = False  # once it has served, its data names its ports: keep them
        self.proc: subprocess.Popen[bytes] | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.client = f"http://127.0.0.1:{free_port()}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.url = "etcd://" + self.client.removeprefix("http://")
        self.cmd = [
            self.binary,
            "--name=test",
            f"--data-dir={self.work / 'data'}",
            f"--listen-client-urls={self.client}",
            f"--advertise-client-urls={self.client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            # short raft timings: a quick start, and a minimum lease TTL of 1 s (not 2 s)
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]

    def start(self) -> EtcdServer:
        for attempt in range(ETCD_PORT_ATTEMPTS):
            failure = self._launch()
            if failure is None:
                self.ran = True
                return self
            # another process took a port between free_port() and etcd's bind: new ports
            # (and no data from the failed try), unless this etcd already served on them
            if self.ran or "address already in use" not in failure:
                break
            if attempt < ETCD_PORT_ATTEMPTS - 1:
                shutil.rmtree(self.work / "data", ignore_errors=True)
                self._pick_ports()
        pytest.fail(failure)

    def _launch(self) -> str | None:
        """Start etcd and wait until it is healthy; None, or why it did not start."""
        log_path = self.work / "etcd.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work
            )
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                return f"etcd exited with {self.proc.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(self.client + "/health", timeout=1).json().get("health") == "true":
                    return None
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                return f"etcd did not start:\n{log_path.read_text()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``etcd://127.0.0.1:PORT`` of an etcd started for this session, stopped at the end."""
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield etcd.url
    finally:
        etcd.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own (it may stop and start it)."""
    server = EtcdServer(tmp_path / "etcd")
    server.work.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def directory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty directory, once per backend."""
    if request.param == "sqlite":
        return "sqlite:" + str(tmp_path / "directory.db")
    url: str = request.getfixturevalue("etcd_url")
    clean_etcd("http://" + url.removeprefix("etcd://"))
    return url


@pytest.fixture
def unused_port() -> int:
    """A loopback port nobody listens on (as far as one can tell)."""
    return free_port()
