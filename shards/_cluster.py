"""Cluster lifecycle on one host: create the cluster on first start, find it again after.

The first ``shardlite serve`` on an empty directory creates the cluster: the slot count
(fixed from then on) and ``--shards`` shards, given round-robin to this host's shard
processes. A restart finds the cluster again and only makes sure every shard this host
owns is owned by one of the processes it now runs (``--procs`` may have changed): such
shards are handed over by compare-and-swap, each with a new epoch, before any process
serves. A data directory from before the router (one ``shard-00`` holding every key)
becomes a cluster of that one shard.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from shardlite.router import Directory, Placement

log = logging.getLogger("shardlite.cluster")

HOST_ID_FILE = "host-id"
LEGACY_SHARD = "shard-00"


def node_id(host_id: str, index: int) -> str:
    return f"{host_id}/{index}"


def host_of(node: str) -> str:
    return node.rpartition("/")[0]


def resolve_host_id(data: str, requested: str) -> str:
    """The host id: ``--host-id``, else the one this data directory was first served as,
    else this machine's hostname. Remembered in DATA/host-id."""
    path = os.path.join(data, HOST_ID_FILE)
    try:
        with open(path) as f:
            stored = f.read().strip()
    except FileNotFoundError:
        stored = ""
    host_id = requested or stored or socket.gethostname() or "host"
    if "/" in host_id or not host_id.isprintable():
        raise ValueError(f"host id {host_id!r}: use letters, digits, '-', '_' or '.'")
    if host_id != stored:
        with open(path + ".tmp", "w") as f:
            f.write(host_id + "\n")
        os.replace(path + ".tmp", path)
    return host_id


def _existing_shards(data: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(os.path.join(data, "shards")) if d.startswith("shard-"))
    except FileNotFoundError:
        return []


async def ensure_cluster(
    directory: Directory, data: str, host_id: str, *, procs: int, shards: int, slots: int
) -> Placement:
    """The placement, with every shard of this host owned by one of its ``procs`` nodes."""
    owners = [node_id(host_id, i) for i in range(procs)]
    placement = await directory.load()
    if placement is None:
        existing = _existing_shards(data)
        count = shards or procs  # one shard log per process: see shards/DESIGN.md
        if existing == [LEGACY_SHARD]:
            count = 1  # every key's file is in shard-00 already
        elif existing:
            raise ValueError(
                f"{data} holds shards {', '.join(existing)} but the directory "
                f"{directory.url} has no cluster: use the directory it was served with"
            )
        if await directory.create_cluster(slots, count, owners):
            log.info("created the cluster: %d slots in %d shards", slots, count)
        placement = await directory.load()
        assert placement is not None
    for _ in range(100):  # compare-and-swap rounds: another host may change shards too
        plan = _balance(placement, host_id, owners)
        if not plan:
            return placement
        for shard, new_owner in plan:
            new = type(shard)(shard.id, shard.ranges, new_owner, shard.epoch + 1)
            if await directory.cas_shard(shard, new):
                log.info("%s: %s -> %s (epoch %d)", shard.id, shard.owner, new_owner, new.epoch)
        reloaded = await directory.load()
        assert reloaded is not None
        placement = reloaded
    raise RuntimeError("could not settle shard owners: the directory keeps changing")


def _balance(placement: Placement, host_id: str, owners: list[str]) -> list[tuple[Any, str]]:
    """Owner changes that give this host's shards (and unowned ones) evenly to ``owners``,
    keeping every shard that may stay where it is."""
    ours = sorted(
        (s for s in placement.shards.values() if s.owner == "" or host_of(s.owner) == host_id),
        key=lambda s: s.id,
    )
    cap = -(-len(ours) // len(owners))  # ceil: no process gets more than its share
    load = dict.fromkeys(owners, 0)
    homeless = []
    for shard in ours:
        if shard.owner in load and load[shard.owner] < cap:
            load[shard.owner] += 1
        else:
            homeless.append(shard)
    plan = []
    for shard in homeless:
        target = min(owners, key=lambda o: (load[o], o))
        load[target] += 1
        plan.append((shard, target))
    return plan


__all__ = ["ensure_cluster", "host_of", "node_id", "resolve_host_id"]
