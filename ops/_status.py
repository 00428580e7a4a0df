"""``shardlite ops status``: the cluster as the directory holds it, and each process's view.

The directory gives hosts, shard processes (nodes, alive while their lease is), shards
with their slot ranges, owners and epochs. Each live node is then asked over RPC for its
own figures (actor files and bytes of the shards it serves, open actors); a node that
does not answer is shown as such, not hidden.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio
from rich.console import Console
from rich.table import Table

from shardlite.router import Placement, open_directory, wire
from shardlite.router._client import RpcTransport
from shardlite.router._protocol import split_address

NODE_TIMEOUT_S = 3.0


def _ask(address: str, token: str | None = None) -> wire.NodeStatus | str:
    transport = RpcTransport(split_address(address), NODE_TIMEOUT_S, token)
    try:
        status: wire.NodeStatus = transport.request("", wire.GetStatus())
        return status
    except Exception as exc:  # any failure is shown in the table, not raised
        return f"unreachable: {exc}"
    finally:
        transport.close()


async def gather_status(directory_url: str, data: str, token: str | None = None) -> dict[str, Any]:
    async with open_directory(directory_url, data) as directory:
        placement = await directory.load()
        url = directory.url
    if placement is None:
        raise LookupError(f"the directory {url} holds no cluster yet (start `shardlite serve`)")
    statuses = {
        node.id: await trio.to_thread.run_sync(_ask, node.rpc, token)
        for node in placement.nodes.values()
    }
    return _report(url, placement, statuses)


def _report(
    url: str, placement: Placement, statuses: dict[str, wire.NodeStatus | str]
) -> dict[str, Any]:
    shard_stats: dict[str, wire.ShardStatus] = {}
    for answer in statuses.values():
        if isinstance(answer, wire.NodeStatus):
            shard_stats.update(answer.shards)
    hosts: dict[str, dict[str, Any]] = {}
    for host in placement.hosts.values():
        hosts[host.id] = {"id": host.id, "rpc": host.rpc, "http": host.http, "alive": True}
    for node in placement.nodes.values():
        hosts.setdefault(node.host, {"id": node.host, "rpc": "", "http": "", "alive": True})
    for shard in placement.shards.values():
        owner_host = shard.owner.rpartition("/")[0]
        hosts.setdefault(owner_host, {"id": owner_host, "rpc": "", "http": "", "alive": False})
    nodes = []
    for node in sorted(placement.nodes.values(), key=lambda n: n.id):
        status: wire.NodeStatus | str | None = statuses.get(node.id)
        entry: dict[str, Any] = {
            "id": node.id,
            "host": node.host,
            "rpc": node.rpc,
            "http": node.http,
            "pid": node.pid,
        }
        if isinstance(status, wire.NodeStatus):
            entry.update(status="ok", actors_open=status.actors_open, uptime_s=status.uptime_s)
        else:
            entry.update(status=status or "unknown")
        nodes.append(entry)
    shards = []
    for shard in sorted(placement.shards.values(), key=lambda s: s.id):
        stats = shard_stats.get(shard.id)
        shards.append(
            {
                "id": shard.id,
                "owner": shard.owner,
                "alive": shard.owner in placement.nodes,
                "epoch": shard.epoch,
                "slots": [list(r) for r in shard.ranges],
                "slot_count": sum(end - start for start, end in shard.ranges),
                "actor_files": stats.files if stats else None,
                "bytes": stats.bytes if stats else None,
            }
        )
    moves = [
        msgspec.to_builtins(m) for m in sorted(placement.moves.values(), key=lambda m: m.shard)
    ]
    return {
        "moves": moves,
        "directory": url,
        "cluster": msgspec.to_builtins(placement.cluster),
        "revision": placement.revision,
        "hosts": sorted(hosts.values(), key=lambda h: h["id"]),
        "nodes": nodes,
        "shards": shards,
    }


def print_status(report: dict[str, Any]) -> None:
    console = Console()
    cluster = report["cluster"]
    console.print(
        f"cluster {cluster['id']}: {cluster['slots']} slots, {len(report['shards'])} shards; "
        f"directory {report['directory']} (revision {report['revision']})"
    )
    hosts = Table("host", "rpc", "http", "alive", title="hosts")
    for h in report["hosts"]:
        hosts.add_row(h["id"], h["rpc"], h["http"], "yes" if h["alive"] else "no")
    console.print(hosts)
    nodes = Table(
        "process", "rpc", "http (its own)", "pid", "open actors", "status", title="shard processes"
    )
    for n in report["nodes"]:
        nodes.add_row(
            n["id"],
            n["rpc"],
            n["http"],
            str(n["pid"]),
            str(n.get("actors_open", "-")),
            n["status"],
        )
    console.print(nodes)
    shards = Table("shard", "owner", "epoch", "slots", "actor files", "bytes", title="shards")
    for s in report["shards"]:
        ranges = ", ".join(f"{a}-{b - 1}" for a, b in s["slots"])
        owner = s["owner"] + ("" if s["alive"] else " (down)")
        shards.add_row(
            s["id"],
            owner,
            str(s["epoch"]),
            ranges,
            "-" if s["actor_files"] is None else str(s["actor_files"]),
            "-" if s["bytes"] is None else _size(s["bytes"]),
        )
    console.print(shards)
    if report["moves"]:
        moves = Table("shard", "kind", "from", "to", "phase", "since", title="moves in progress")
        for m in report["moves"]:
            since = time.strftime("%H:%M:%S", time.localtime(m["started"]))
            to = m["new_shard"] if m["kind"] == "split" else m["target"]
            moves.add_row(m["shard"], m["kind"], m["source"], to, m["phase"], since)
        console.print(moves)
        console.print("finish or undo one with `shardlite ops move SHARD --resume` / `--abort`")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


__all__ = ["gather_status", "print_status"]
