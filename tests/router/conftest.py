"""A real etcd for the directory tests, on free loopback ports (never 2379).

One etcd serves the whole session; each test starts from an empty ``/shardlite/``
prefix (:func:`clean_etcd`). CI installs etcd (``.ci/run``): a missing binary fails the
tests rather than skipping them.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ETCD_START_TIMEOUT_S = 20.0
PREFIX = "/shardlite/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def clean_etcd(client_url: str) -> None:
    """Delete every key under the directory's prefix."""
    end = PREFIX[:-1] + chr(ord(PREFIX[-1]) + 1)
    body = {"key": _b64(PREFIX.encode()), "range_end": _b64(end.encode())}
    httpx.post(client_url + "/v3/kv/deleterange", json=body, timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``etcd://127.0.0.1:PORT`` of an etcd started for this session, stopped at the end."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.fail("etcd is not installed: apt-get install etcd-server (.ci/run does it)")
    work: Path = tmp_path_factory.mktemp("etcd")
    client = f"http://127.0.0.1:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    cmd = [
        binary,
        "--name=test",
        f"--data-dir={work / 'data'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=test={peer}",
        # short raft timings: a quick start, and a minimum lease TTL of 1 s (not 2 s)
        "--heartbeat-interval=50",
        "--election-timeout=500",
    ]
    log_path = work / "etcd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"etcd exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(client + "/health", timeout=1).json().get("health") == "true":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"etcd did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield "etcd://" + client.removeprefix("http://")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
