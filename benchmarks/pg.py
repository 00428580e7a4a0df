"""PostgreSQL as a peer: a throwaway cluster on loopback, driven by pgbench.

The cluster lives in a temporary directory (owned by the ``postgres`` user when this
runs as root: PostgreSQL refuses to run as root), listens on 127.0.0.1 and a free port,
and is started pinned to the server CPU (its backends inherit the affinity). pgbench runs
a custom script (``-M prepared``) pinned to the load CPU and logs every transaction, so
throughput and latency are taken over exactly the window in which server CPU is read.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from shardlite.loadtest._postgres import CONF, PostgresServer, find, missing

__all__ = ["CONF", "SCHEMA", "SCRIPT", "Cluster", "available", "find", "missing", "version"]

from .common import LOAD_CPU, SERVER_CPU, percentile

SCHEMA = (
    "CREATE TABLE t(id bigserial PRIMARY KEY, tenant int NOT NULL, v bigint NOT NULL); "
    "CREATE INDEX t_tenant ON t(tenant);"
)
SCRIPT = (
    "\\set tenant random(1, {keys})\n"
    "\\set v random(1, 1000000000)\n"
    "INSERT INTO t(tenant, v) VALUES (:tenant, :v);\n"
)


def available() -> str:
    """'' when initdb, pg_ctl, psql and pgbench are all found, else what is missing."""
    return missing(("initdb", "pg_ctl", "psql", "pgbench"))


def version() -> str:
    cmd = [find("postgres") or "postgres", "--version"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its children: live ones, and those it reaped."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid, ppid = int(name), int(fields[1])
        if pid == root:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif ppid == root:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Cluster(PostgresServer):
    """``with Cluster(...) as pg``: initdb'ed and removed on exit; start()/stop() per run."""

    def __init__(self, max_connections: int = 300) -> None:
        super().__init__(
            tempfile.mkdtemp(prefix="shardlite-pg-"),
            max_connections=max_connections,
            cpus=SERVER_CPU,
        )
        self.init()
        self.start()
        try:
            self.psql("postgres", "CREATE DATABASE bench")
            self.psql("bench", SCHEMA)
        finally:
            self.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _pgbench_cmd(self, keys: int, clients: int, seconds: float, run_dir: str) -> list[str]:
        script = os.path.join(run_dir, "insert.sql")
        with open(script, "w") as f:
            f.write(SCRIPT.format(keys=keys))
        cmd = ["taskset", "-c", LOAD_CPU, find("pgbench") or "pgbench", "-n", "-M", "prepared"]
        cmd += ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        cmd += ["-c", str(clients), "-j", "1", "-T", str(round(seconds))]
        return [*cmd, "-f", script, "bench"]

    def start_load(self, keys: int, clients: int, seconds: float) -> subprocess.Popen[str]:
        """pgbench inserting for ``seconds``, in the background, logging nothing."""
        run_dir = tempfile.mkdtemp(prefix="pgbench-", dir=self.dir)
        cmd = self._pgbench_cmd(keys, clients, seconds, run_dir)
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )

    def pgbench(self, keys: int, clients: int, seconds: float, lead: float) -> dict[str, Any]:
        """One pgbench run; figures over [start + lead, start + lead + seconds]."""
        run_dir = tempfile.mkdtemp(prefix="pgbench-", dir=self.dir)
        total = lead + seconds + 1.0
        cmd = self._pgbench_cmd(keys, clients, total, run_dir)
        cmd[-1:-1] = ["-l", "--log-prefix", os.path.join(run_dir, "tx")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            start = time.time()
            time.sleep(lead)
            t_a, cpu_a, gen_a = time.time(), _tree_cpu(self.pid), _tree_cpu(proc.pid)
            time.sleep(max(0.0, t_a + seconds - time.time()))
            t_b, cpu_b, gen_b = time.time(), _tree_cpu(self.pid), _tree_cpu(proc.pid)
            _, err = proc.communicate(timeout=total + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{err[-3000:]}")
        lats, failed = [], 0
        for path in glob.glob(os.path.join(run_dir, "tx.*")):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    done = int(parts[4]) + int(parts[5]) / 1e6
                    if t_a <= done < t_b:
                        if parts[2].isdigit():
                            lats.append(int(parts[2]) / 1e6)
                        else:
                            failed += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        lats.sort()
        wall = t_b - t_a
        cpu = cpu_b - cpu_a
        return {
            "requests": len(lats),
            "seconds": wall,
            "rps": len(lats) / wall,
            "p50_ms": percentile(lats, 50) * 1e3,
            "p99_ms": percentile(lats, 99) * 1e3,
            "errors": failed,
            "server_util": cpu / wall,
            "per_cpu_s": len(lats) / cpu if cpu else 0.0,
            "gen_cpu_util": (gen_b - gen_a) / wall,
            "lead_s": t_a - start,
        }
