"""Shared fixtures: an in-process actor pool, and a real `shardlite serve` process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
