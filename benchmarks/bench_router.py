"""Section router: one shard process vs two, and a forwarded request vs a direct one.

Per durability (``os``, so that the disk does not dominate, and ``log``, the default) two
servers run for the whole section, each on a fresh data directory of its own:
``shardlite serve --procs 1`` and ``--procs 2`` (a supervisor and two shard processes
sharing one public RPC port, each with an RPC port of its own). Their placement
(GetPlacement over RPC) gives every key's shard, owner, owner's port and epoch; the keys
are chosen as many per shard, so that two processes own as many each, and their tables
are created untimed. The cases of each server:

* direct: every request goes to its owner's own port with the shard's epoch, as a routing
  client sends it (``--procs 1``: the one process; ``--procs 2``: half the connections to
  each process, each with the keys that process owns);
* shared port: plain ``[id, key, op]`` frames to the public port, the kernel gives each
  connection to one of the processes, which forwards the requests for keys it does not own;
* forwarded: every request goes to the process that does not own its key (one hop each).

With two shard processes the server cannot be pinned to one CPU, so in this section
servers and load generator all run unpinned on every CPU (the load generator competes
with the server, in every case alike). Server CPU is the sum of /proc/PID/stat
utime+stime over the supervisor and every shard process, read before and after each timed
window. The load generator (this module run as a program, a child process) is rpc_load's
sliding window over several ports. The cases run in rounds, one run of every case per
round, after a warm-up per case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from shardlite.actor import Batch, Sql, Statement
from shardlite.router import Placement, PlacementMap, wire

from . import rpc_load
from .common import (
    CREATE_SQL,
    INSERT_SQL,
    SERVE_READY,
    Child,
    Options,
    SectionResult,
    Stat,
    cpu_seconds,
    fmt,
    header,
    md_table,
    num,
    python_cmd,
    ratio,
    run_json,
    stat,
)

NAME = "router"
TITLE = "Router: one process vs two, forwarded vs direct"
DEFAULT_RUNS = 3
KEYS = 64
"""As many in each of the cluster's shards: two processes get as many each."""
SHARDS = 2
"""The same two shards for one process and for two (one each): only the process count
changes between the cases."""
CONNS, WINDOW = 4, 64
DURABILITIES = ("os", "log")
IDLE_TIMEOUT_S = 3600
"""Every server runs for the whole section, idle while the others are measured (and, the
CPUs being shared here, an idle server's timers would run inside another case's window):
no actor passivated between runs, no ``log`` checkpoint by the clock."""
ALL_CPUS = f"0-{(os.cpu_count() or 1) - 1}"
PLACEMENT_TIMEOUT_S = 10.0
SPLIT_TIMEOUT_S = 5.0
SERVER_TROUBLE = re.compile(r"\b(ERROR|CRITICAL|Traceback|exited)\b")


# ---------------------------------------------------------------- the load generator


def _epoch_templates(indexes: list[int], epochs: list[int]) -> list[tuple[bytes, bytes]]:
    """Like rpc_load.templates, for ``[id, key, op, None, epoch]`` (a routing client's
    frame): the length header and array/uint32 markers, then key, op, nil, epoch."""
    out = []
    for i, epoch in zip(indexes, epochs, strict=True):
        op = Sql(INSERT_SQL, [i, 1])
        tail = _encode(rpc_load.key_name(i)) + _encode(op) + _encode(None) + _encode(epoch)
        size = 2 + 4 + len(tail)  # 0x95 (5-array), 0xce (uint32), id, tail
        out.append((size.to_bytes(4, "big") + b"\x95\xce", tail))
    return out


_encode = msgspec.msgpack.Encoder().encode


def load(
    targets: list[tuple[int, list[tuple[bytes, bytes]]]],
    *,
    conns: int,
    window: int,
    seconds: float,
    seed: int = 1,
) -> dict[str, Any]:
    """rpc_load.run's sliding window (``draw="uniform"``) over several targets:
    ``conns`` connections to each target's port, each drawing its keys uniformly at
    random from that target's frames."""
    clients = []
    for t, (port, frames) in enumerate(targets):
        for c in range(conns):
            rng = random.Random(seed + t * conns + c)
            order = rng.choices(frames, k=max(rpc_load.UNIFORM_DRAWS, 8 * len(frames)))
            clients.append(rpc_load.Conn(port, order, once=False))
    by_fd = {cl.sock.fileno(): cl for cl in clients}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    lats: list[float] = []
    errors = 0
    first_error = None
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = last_reply = clock()
    deadline = start + seconds
    for cl in clients:
        cl.send(window, start)
    active = len(clients)
    while active:
        if clock() - last_reply > rpc_load.STALL_TIMEOUT_S:
            raise RuntimeError(f"no reply for {rpc_load.STALL_TIMEOUT_S:.0f} s")
        for fd, _ in ep.poll(1.0):
            cl = by_fd[fd]
            data = cl.sock.recv(1 << 18)
            if not data:
                raise RuntimeError("the server closed the connection")
            now = last_reply = clock()
            got, failed = cl.take_replies(data, now, lats)
            if failed:
                errors += failed
                first_error = first_error or cl.first_error
            if got and now < deadline:
                cl.send(got, now)
            elif not cl.outstanding:
                ep.unregister(fd)
                active -= 1
    wall = clock() - start
    cpu = time.process_time() - cpu0
    for cl in clients:
        cl.sock.close()
    ep.close()
    return rpc_load.summary(lats, errors, first_error, wall, cpu)


def _frames(spec: dict[str, Any]) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """A target spec (``[port, key indexes, epochs or None]``, as JSON) -> frames."""
    targets = []
    for port, indexes, epochs in spec["targets"]:
        if epochs is None:
            frames = rpc_load.templates([rpc_load.key_name(i) for i in indexes], rpc_load.insert_op)
        else:
            frames = _epoch_templates(indexes, epochs)
        targets.append((port, frames))
    return targets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="the router section's load generator")
    ap.add_argument("--spec", required=True, help="JSON: targets, conns, window, seconds")
    spec = json.loads(ap.parse_args(argv).spec)
    result = load(
        _frames(spec), conns=spec["conns"], window=spec["window"], seconds=spec["seconds"]
    )
    sys.stdout.write(json.dumps(result, default=str) + "\n")


# ---------------------------------------------------------------- servers and cases


class Server:
    """``shardlite serve --procs N``, unpinned, with its placement."""

    def __init__(self, data: str, durability: str, procs: int) -> None:
        self.procs, self.durability = procs, durability
        defer = ("--log-checkpoint-interval", str(IDLE_TIMEOUT_S))
        cmd = python_cmd(
            "shardlite",
            "serve",
            *("--data", data, "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"),
            *("--durability", durability, "--procs", str(procs), "--shards", str(SHARDS)),
            *("--idle-timeout", str(IDLE_TIMEOUT_S), "--log-level", "warning"),
            *(defer if durability == "log" else ()),
        )
        # Child pins to the server CPU; a second taskset (exec'd in place: same pid) widens
        # the affinity again to every CPU, for the supervisor and the shard processes.
        self.child = Child(["taskset", "-c", ALL_CPUS, *cmd], SERVE_READY)
        assert self.child.match is not None
        self.port = int(self.child.match.group(2).rsplit(":", 1)[1])
        try:
            self.placement = self._settled_placement()
        except BaseException:
            self.child.stop()
            raise
        self.pids = sorted({self.child.pid} | {n.pid for n in self.placement.nodes.values()})

    def _settled_placement(self) -> Placement:
        """The placement once it lists every process and every shard's owner among them
        (a server that just said it serves may still answer with the placement it read
        before it registered itself)."""
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while True:
            placement = self.fetch_placement()
            nodes = placement.nodes
            owned = all(s.owner in nodes for s in placement.shards.values())
            if len(nodes) == self.procs and owned:
                return placement
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"--procs {self.procs}: the placement lists {len(nodes)} processes "
                    f"(shard owners all among them: {owned}):\n{self.child.log}"
                )
            time.sleep(0.05)

    def fetch_placement(self) -> Placement:
        """The placement map the server holds (a GetPlacement request)."""
        with socket.create_connection(("127.0.0.1", self.port), PLACEMENT_TIMEOUT_S) as sock:
            sock.settimeout(PLACEMENT_TIMEOUT_S)
            sock.sendall(wire.request_frame(1, "", wire.GetPlacement()))
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("the server closed the connection")
                buf += chunk
        response = wire.response_decoder.decode(buf[4:])
        if response.status != wire.STATUS_OK:
            raise RuntimeError(f"placement: {msgspec.msgpack.decode(response.body)}")
        return Placement.from_map(msgspec.msgpack.decode(response.body, type=PlacementMap))

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def check_same_processes(self) -> None:
        """A shard process restarted by the supervisor would take its CPU-seconds along."""
        now = self.fetch_placement()
        if sorted({self.child.pid} | {n.pid for n in now.nodes.values()}) != self.pids:
            raise RuntimeError(f"a shard process restarted:\n{self.child.log}")

    def owners(self, keys: list[int]) -> dict[str, list[int]]:
        """Node id -> indexes of the keys it owns."""
        out: dict[str, list[int]] = {node: [] for node in sorted(self.placement.nodes)}
        for i in keys:
            out[self.placement.shard_for(rpc_load.key_name(i)).owner].append(i)
        return out

    def shard_ranges(self) -> dict[str, list[tuple[int, int]]]:
        return {s.id: sorted(s.ranges) for s in self.placement.shards.values()}

    def create_tables(self, keys: list[int]) -> None:
        """Table t and one row in every key's actor (untimed; the files stay open)."""
        names = [rpc_load.key_name(i) for i in keys]
        op = Batch([Statement(CREATE_SQL), Statement(INSERT_SQL, [0, 0])])
        r = rpc_load.run(self.port, rpc_load.templates(names, lambda i: op), once=True)
        if r["errors"] or r["requests"] != len(keys):
            raise RuntimeError(f"creating the actors' tables failed: {r}")

    def node_port(self, node: str) -> int:
        return int(self.placement.nodes[node].rpc.rsplit(":", 1)[1])

    def epochs(self, indexes: list[int]) -> list[int]:
        return [self.placement.shard_for(rpc_load.key_name(i)).epoch for i in indexes]

    def stop(self) -> None:
        self.child.stop()


@dataclass
class Case:
    label: str
    server: Server
    kind: str  # direct, shared, forwarded
    targets: list[list[Any]]  # [port, key indexes, epochs or None]
    runs: list[dict[str, Any]] = field(default_factory=list)


def _pick_keys(placement: Placement) -> list[int]:
    """The first KEYS key indexes with as many keys in every shard (crc32 spreads the
    names bench-00000..00063 unevenly, 8/4/24/28 over 4 shards: two processes would own
    32 each, or 12 and 52, depending on which shards each got)."""
    per_shard = KEYS // len(placement.shards)
    if per_shard * len(placement.shards) != KEYS:
        raise RuntimeError(f"{KEYS} keys do not split evenly over {len(placement.shards)} shards")
    counts = dict.fromkeys(placement.shards, 0)
    keys = []
    for i in range(100 * KEYS):
        shard = placement.shard_for(rpc_load.key_name(i)).id
        if counts[shard] < per_shard:
            counts[shard] += 1
            keys.append(i)
            if len(keys) == KEYS:
                return keys
    raise RuntimeError(f"no {per_shard} keys in every shard among {100 * KEYS} names")


def _cases(server: Server, keys: list[int]) -> list[Case]:
    owners = server.owners(keys)
    p = f"{server.durability}, --procs {server.procs}"
    direct = [[server.node_port(node), keys, server.epochs(keys)] for node, keys in owners.items()]
    cases = [Case(f"{p}, direct to the owner", server, "direct", direct)]
    if server.procs > 1:
        cases.append(Case(f"{p}, shared port", server, "shared", [[server.port, keys, None]]))
        nodes = list(owners)
        forwarded = [
            [server.node_port(node), owners[nodes[(n + 1) % len(nodes)]], None]
            for n, node in enumerate(nodes)
        ]
        cases.append(Case(f"{p}, all forwarded", server, "forwarded", forwarded))
    return cases


def _connections(server: Server) -> list[int]:
    """Established connections to the shared RPC port, per shard process (/proc/net/tcp*:
    their socket inodes; /proc/PID/fd: which process holds each)."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == server.port:
                inodes.add(f"socket:[{inode}]")
    counts = []
    for node in sorted(server.placement.nodes.values(), key=lambda n: n.id):
        held = 0
        for fd in os.listdir(f"/proc/{node.pid}/fd"):
            try:
                held += os.readlink(f"/proc/{node.pid}/fd/{fd}") in inodes
            except OSError:  # closed meanwhile
                continue
        counts.append(held)
    return counts


def _connection_split(server: Server, proc: subprocess.Popen[str]) -> str:
    """How the kernel spread the generator's connections over the processes, e.g. 3+1."""
    deadline = time.monotonic() + SPLIT_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        counts = _connections(server)
        if sum(counts) >= CONNS:
            return "+".join(str(c) for c in counts)
        time.sleep(0.02)
    return "?"


def _measure(case: Case, seconds: float) -> dict[str, Any]:
    spec = {
        "targets": case.targets,
        "conns": CONNS // len(case.targets),
        "window": WINDOW,
        "seconds": seconds,
    }
    cmd = python_cmd("benchmarks.bench_router", "--spec", json.dumps(spec), cpu=ALL_CPUS)
    cpu0 = case.server.cpu()
    if case.kind == "shared":  # run_json, watching which process gets each connection
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            split = _connection_split(case.server, proc)
            out, err = proc.communicate(timeout=seconds + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
        r = json.loads(out.strip().splitlines()[-1])
        r["split"] = split
    else:
        r = run_json(cmd, timeout=seconds + 120)
    cpu = case.server.cpu() - cpu0
    case.server.check_same_processes()
    r["server_util"] = cpu / r["seconds"]
    r["cpu_ms_per_1k"] = cpu * 1e3 / r["requests"] * 1e3 if r["requests"] else math.nan
    return r


def run(opts: Options) -> SectionResult:
    seconds = 0.5 if opts.quick else 7.0
    warm = 0.3 if opts.quick else 1.5
    servers: list[Server] = []
    cases: list[Case] = []
    splits: dict[str, str] = {}
    keys: list[int] = []
    try:
        for durability in DURABILITIES:
            for procs in (1, 2):
                server = Server(
                    os.path.join(opts.workdir, f"{durability}-procs{procs}"), durability, procs
                )
                servers.append(server)
                if not keys:
                    keys = _pick_keys(server.placement)
                elif server.shard_ranges() != servers[0].shard_ranges():
                    raise RuntimeError("the servers' clusters have different shards")
                server.create_tables(keys)
                cases += _cases(server, keys)
                if procs > 1:
                    splits[durability] = " / ".join(
                        str(len(owned)) for owned in server.owners(keys).values()
                    )
        for case in cases:  # warm-up (untimed)
            _measure(case, warm)
        for round_no in range(opts.runs):
            for case in cases:
                r = _measure(case, seconds)
                case.runs.append(r)
                spread = f" (connections {r['split']})" if "split" in r else ""
                print(
                    f"  router round {round_no + 1}: {case.label}{spread}: {num(r['rps'])} "
                    f"writes/s, {num(r['cpu_ms_per_1k'])} CPU-ms per 1,000 writes",
                    flush=True,
                )
                if not opts.quick:
                    time.sleep(0.3)
        trouble = {
            f"{s.durability}, --procs {s.procs}": [
                line.strip() for line in s.child.output if SERVER_TROUBLE.search(line)
            ]
            for s in servers
        }
    finally:
        for server in servers:
            server.stop()
    return _report(opts, cases, seconds, warm, splits=splits, trouble=trouble)


# ---------------------------------------------------------------- the report


def _col(case: Case, key: str) -> Stat:
    return stat([r[key] for r in case.runs])


def _report(
    opts: Options,
    cases: list[Case],
    seconds: float,
    warm: float,
    *,
    splits: dict[str, str],
    trouble: dict[str, list[str]],
) -> SectionResult:
    rows = []
    by_mode: dict[str, dict[str, Case]] = {}
    for case in cases:
        modes = by_mode.setdefault(case.server.durability, {})
        modes[case.kind if case.server.procs > 1 else "procs1"] = case
    for case in cases:
        base = by_mode[case.server.durability]["procs1"]
        rps, cost = _col(case, "rps"), _col(case, "cpu_ms_per_1k")
        rows.append(
            [
                case.label + (" (baseline)" if case is base else ""),
                fmt(rps),
                ratio(rps, _col(base, "rps")),
                fmt(_col(case, "p50_ms")),
                fmt(_col(case, "p99_ms")),
                fmt(_col(case, "server_util")),
                fmt(cost),
                ratio(cost, _col(base, "cpu_ms_per_1k")),
                fmt(_col(case, "gen_cpu_util")),
                str(sum(r["errors"] for r in case.runs)),
            ]
        )
    table = md_table(
        [
            "case",
            "writes/s",
            "÷ procs 1",
            "p50 ms",
            "p99 ms",
            "server CPU (cores)",
            "server CPU-ms per 1,000 writes",
            "÷ procs 1",
            "generator CPU (cores)",
            "error replies (all runs)",
        ],
        rows,
    )
    fwd_rows = []
    for durability, modes in by_mode.items():
        direct, fwd = modes["direct"], modes["forwarded"]
        extra = _col(fwd, "cpu_ms_per_1k").median - _col(direct, "cpu_ms_per_1k").median
        fwd_rows.append(
            [
                durability,
                ratio(_col(fwd, "rps"), _col(direct, "rps")),
                ratio(_col(fwd, "p50_ms"), _col(direct, "p50_ms")),
                ratio(_col(fwd, "p99_ms"), _col(direct, "p99_ms")),
                ratio(_col(fwd, "cpu_ms_per_1k"), _col(direct, "cpu_ms_per_1k")),
                f"{extra:+.1f}",
            ]
        )
    fwd_table = md_table(
        [
            "durability (--procs 2)",
            "writes/s forwarded ÷ direct",
            "p50 ÷",
            "p99 ÷",
            "server CPU per write ÷",
            "extra server CPU-µs per forwarded write",
        ],
        fwd_rows,
    )
    split = "; ".join(f"`{d}`: {s}" for d, s in splits.items())
    notes = (
        f"Load: {KEYS} keys, {KEYS // 4} in each of the cluster's 4 shards (the first such "
        "names `bench-NNNNN`; each key's table `t` created, and a row written, untimed), each "
        "request's key drawn uniformly at random, a single-row INSERT; "
        f"{CONNS} connections × a window of "
        f"{WINDOW} outstanding frames (a sliding window) in every case, split evenly over the "
        f"ports a case sends to; {seconds:g} s per run after a {warm:g} s warm-up per case, "
        f"{opts.runs} rounds, every case in each round. Servers: `shardlite serve --procs 1` "
        "and `--procs 2` per durability, each on a data directory of its own, the "
        f"cluster's default 4 shards of 4,096 slots (with two processes: two shards each; "
        f"keys per process {split}), `--idle-timeout {IDLE_TIMEOUT_S}` and, for `log`, "
        f"`--log-checkpoint-interval {IDLE_TIMEOUT_S}` (every server runs for the whole "
        "section, idle while the others are measured). `os` leaves writes to the page cache "
        "so that the disk does not dominate; `log` (the default) adds one fdatasync per "
        "shard log round.\n\n"
        "**Nothing is pinned in this section**: two shard processes cannot share one CPU "
        f"fairly, so every server and the load generator (one process) run on all "
        f"{os.cpu_count()} CPUs, for `--procs 1` too, and the generator competes with the "
        "server for them (the generator CPU column). Its figures are not comparable with "
        "the `rpc` and `durable` sections, which pin the server to CPU 0 and the "
        "generator to CPU 1.\n\n"
        "Cases: *direct to the owner*: each request goes to its owner's own RPC port with "
        "its shard's epoch (`[id, key, op, nil, epoch]`), as the routing Python client "
        "sends it (with two processes, half the connections go to each, each with the keys "
        "that process owns); *shared port*: plain `[id, key, op]` frames to the public RPC "
        "port, where the kernel hands each connection to one of the processes, which "
        "forwards the requests for keys it does not own (about half); *all forwarded*: "
        "every request goes to the port of the process that does not own its key, which "
        "forwards it to the owner (one hop).\n\n"
        "Server CPU: utime+stime from /proc/PID/stat of the supervisor and every shard "
        "process (pids from the placement), before and after each run; CPU-ms per 1,000 "
        "writes (= CPU-µs per write) is that ÷ the writes of the run. If the cost per write "
        "does not grow with the number of processes, the direct `--procs 2` row's CPU ratio "
        "stays near 1. Figures: median [min–max] over the rounds; p50/p99 are per-request "
        "latencies from send to reply. Ratios: median ÷ baseline median [min ÷ baseline "
        "median – max ÷ baseline median]; a forwarded request's extra CPU-µs is the "
        "difference of the medians."
    )
    spread = "; ".join(
        f"`{c.server.durability}`: {', '.join(r['split'] for r in c.runs)}"
        for c in cases
        if c.kind == "shared"
    )
    if spread:
        notes += (
            f"\n\nShared port: how the kernel spread the {CONNS} connections over the two "
            f"processes (process 0 + process 1), run by run: {spread}."
        )
    for case in cases:
        first = next((r["first_error"] for r in case.runs if r["errors"]), None)
        if first:
            notes += f"\n\nErrors from {case.label}, the first: `{first}`."
    for label, lines in trouble.items():
        if lines:
            shown = "; ".join(f"`{ln}`" for ln in lines[:3])
            notes += f"\n\nThe {label} server logged {len(lines)} error line(s): {shown}."
    body = (
        header(NAME, opts, DEFAULT_RUNS)
        + "\n\n"
        + table
        + "\n\nForwarded vs direct, both with two shard processes:\n\n"
        + fwd_table
        + "\n\n"
        + notes
    )
    console = [
        f"{r[0]:44} {r[1]:>24} writes/s  {r[6]:>22} CPU-ms/1k writes ({r[7]} procs 1)" for r in rows
    ]
    console += [
        f"forwarded ÷ direct, {r[0]}: writes/s {r[1]}, p50 {r[2]}, CPU per write {r[4]}"
        for r in fwd_rows
    ]
    return SectionResult(NAME, body, console)


if __name__ == "__main__":
    main()
