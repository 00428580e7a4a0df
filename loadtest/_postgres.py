"""A throwaway PostgreSQL server on loopback, for ``postgres://`` targets.

``shardlite loadtest postgres --data DIR`` runs one in the foreground; tests and the
benchmarks start one with :class:`PostgresServer`. It is a real server from the Debian
``postgresql`` package (or any PostgreSQL whose ``initdb``/``pg_ctl`` are on the path):
``fsync`` and ``synchronous_commit`` on, so a committed transaction is on disk, as a
shardlite write is under ``--durability log`` or ``fsync``. PostgreSQL refuses to run as
root: as root, the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence

PG_BIN_DIRS = (
    "/usr/local/bin",
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
    "/usr/bin",
)
CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = {max_connections}
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 512MB
wal_buffers = 16MB
max_wal_size = 4GB
checkpoint_timeout = 30min
"""


def find(name: str) -> str | None:
    """A PostgreSQL program (initdb, pg_ctl, psql, pgbench, postgres), or None."""
    for d in PG_BIN_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def missing(names: Sequence[str] = ("initdb", "pg_ctl", "postgres")) -> str:
    """'' when every program is found, else the names that are not."""
    return ", ".join(n for n in names if find(n) is None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A cluster in ``directory`` (created on first use), listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        directory: str,
        *,
        port: int = 0,
        max_connections: int = 300,
        cpus: str | None = None,
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.data = os.path.join(self.dir, "data")
        self.port = port or free_port()
        self.max_connections = max_connections
        self.cpus = cpus
        self.pid = 0
        root = os.geteuid() == 0
        self.as_user = ["runuser", "-u", "postgres", "--"] if root else []

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        """initdb (once) and write the configuration (every time: the port may change)."""
        if not os.path.isdir(self.data):
            os.makedirs(self.dir, exist_ok=True)
            if self.as_user:
                shutil.chown(self.dir, "postgres", "postgres")
                probe = subprocess.run([*self.as_user, "test", "-w", self.dir], check=False)
                if probe.returncode != 0:
                    raise RuntimeError(
                        f"the postgres user cannot reach {self.dir} (PostgreSQL refuses to run "
                        "as root, so it runs as that user): choose a directory it can reach, "
                        "e.g. under /tmp"
                    )
            self._run(find("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-N")
        conf = CONF.format(
            port=self.port, socket_dir=self.dir, max_connections=self.max_connections
        )
        with open(os.path.join(self.data, "postgresql.auto.conf"), "w") as f:
            f.write(conf)

    def start(self) -> None:
        log = os.path.join(self.dir, "server.log")
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        self._run(*pin, find("pg_ctl"), "-D", self.data, "-l", log, "-w", "-t", "120", "start")
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def stop(self) -> None:
        if self.pid:
            self._run(find("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "120", "stop")
            self.pid = 0

    def psql(self, db: str, sql: str) -> str:
        return self._run(
            find("psql"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db),
            *("-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql),
            user=False,
        )

    def _run(self, *cmd: str | None, user: bool = True, timeout: float = 180) -> str:
        argv = [c for c in cmd if c is not None]
        if user and self.as_user:
            # the user switch goes after taskset, before the PostgreSQL program
            i = next(k for k, c in enumerate(argv) if os.path.isabs(c) and "taskset" not in c)
            argv = [*argv[:i], *self.as_user, *argv[i:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def __enter__(self) -> PostgresServer:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["PostgresServer", "find", "free_port", "missing"]
