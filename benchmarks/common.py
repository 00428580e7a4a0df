"""Shared helpers: statistics, formatting, machine facts, /proc readings, child processes."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SERVER_CPU = "0"
LOAD_CPU = "1"
SERVE_READY = re.compile(r"shardlite serving (http://\S+) and (rpc://\S+)")
INSERT_SQL = "INSERT INTO t(tenant, v) VALUES (?, ?)"
CREATE_SQL = (
    "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, tenant INTEGER NOT NULL, "
    "v INTEGER NOT NULL)"
)


@dataclass
class Options:
    """What the runner asks of every section."""

    quick: bool
    runs: int
    workdir: str
    cache: str
    """Shared by every section of one suite run (data.actor_files)."""


@dataclass
class SectionResult:
    """A section's Markdown body (below its heading) and what to print on the console."""

    name: str
    body: str
    console: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- statistics and formatting


@dataclass
class Stat:
    median: float
    lo: float
    hi: float
    n: int


def stat(values: Sequence[float]) -> Stat:
    return Stat(statistics.median(values), min(values), max(values), len(values))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))
    return sorted_values[idx]


def num(x: float) -> str:
    """Compact human figure: 1234567 -> 1.23M, 45210 -> 45.2k, 0.512 -> 0.512."""
    if math.isnan(x):
        return "n/a"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.2f}M"
    if ax >= 1e4:
        return f"{x / 1e3:.1f}k"
    if ax >= 1e3:
        return f"{x / 1e3:.2f}k"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if ax >= 1 else f"{x:.3f}"


def fmt(s: Stat) -> str:
    """``median [min-max]`` with the same compact numbers."""
    if s.n == 1:
        return num(s.median)
    return f"{num(s.median)} [{num(s.lo)}–{num(s.hi)}]"


def ratio(a: Stat, b: Stat) -> str:
    """Ratio of two medians; the range is min/max of a over the median of b."""
    if not b.median:
        return "n/a"

    def r(x: float) -> str:
        return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"

    return f"{r(a.median / b.median)}× [{r(a.lo / b.median)}–{r(a.hi / b.median)}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- machine facts


def machine() -> str:
    import apsw
    import hypercorn
    import msgspec
    import trio

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    hc = getattr(hypercorn, "__version__", None) or _dist_version("hypercorn")
    return (
        f"nproc {os.cpu_count()} ({cpu or platform.machine()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, apsw {apsw.apsw_version()}, "
        f"SQLite {apsw.sqlite_lib_version()}, trio {trio.__version__}, "
        f"msgspec {msgspec.__version__}, hypercorn {hc}"
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def command_line(section: str, quick: bool, runs: int, default_runs: int) -> str:
    parts = ["python -m benchmarks", section]
    if quick:
        parts.append("--quick")
    if runs != default_runs:
        parts.append(f"--runs {runs}")
    return " ".join(parts)


def header(section: str, opts: Options, default_runs: int, notes: str = "") -> str:
    cmd = command_line(section, opts.quick, opts.runs, default_runs)
    lines = [
        f"Command: `{cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {machine()}",
    ]
    if opts.quick:
        lines.append("\n**Smoke run (`--quick`): short runs, figures are not representative.**")
    if notes:
        lines.append("\n" + notes)
    return "\n".join(lines)


# ---------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, name: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM, RssAnon, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


# ---------------------------------------------------------------- child processes


def python_cmd(module: str, *args: str, cpu: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", module, *args]
    return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd


def run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a child that prints one JSON object on its last stdout line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


class Child:
    """A server child process, pinned to the server CPU; ready when ``ready`` matches a line.

    Stopped with SIGTERM (then SIGKILL) by its own pid; its output is kept for errors.
    """

    def __init__(self, cmd: list[str], ready: re.Pattern[str], timeout: float = 60.0) -> None:
        self.cmd = ["taskset", "-c", SERVER_CPU, *cmd]
        self.output: list[str] = []
        self.match: re.Match[str] | None = None
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.pid = self.proc.pid  # taskset execs the command: same pid
        started = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if self.match is None and (m := ready.search(line)):
                    self.match = m
                    started.set()
            started.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not started.wait(timeout) or self.match is None:
            self.stop()
            raise RuntimeError(f"{' '.join(cmd)} did not start:\n{self.log}")

    @property
    def log(self) -> str:
        return "".join(self.output[-50:])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 90.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(10)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_shardlite(data: str, durability: str, *extra: str) -> tuple[Child, str, int]:
    """Start ``shardlite serve`` on loopback (free ports); return it, its HTTP URL, RPC port."""
    cmd = python_cmd(
        "shardlite",
        "serve",
        "--data",
        data,
        "--http",
        "127.0.0.1:0",
        "--rpc",
        "127.0.0.1:0",
        "--durability",
        durability,
        "--procs",
        "1",  # one process pinned to the server CPU: the per-core figures
        "--log-level",
        "warning",
        *extra,
    )
    child = Child(cmd, SERVE_READY)
    assert child.match is not None
    http_url, rpc_url = child.match.group(1), child.match.group(2)
    return child, http_url, int(rpc_url.rsplit(":", 1)[1])


def metrics(http_url: str) -> dict[str, float]:
    """The server's Prometheus /metrics, unlabelled series only."""
    import urllib.request

    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
