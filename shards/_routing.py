"""This process's place in the cluster: which shards it serves, and where the rest go.

A :class:`Node` holds the placement it last read from the directory, the shards it has
attached at their epochs, and its lease. For each request it decides (``route``): serve
here, forward to the owner (one hop), or answer ``wrong_shard`` / ``unavailable``.

Fencing: a shard is served here only while the directory (as last read) names this node
its owner at the epoch it attached, and this node's lease is valid. A request that
carries an epoch (a routing client, or a forwarding peer) must match that epoch: an
older one is answered ``wrong_shard`` with the current location; a newer one means this
process's view is stale, so it refreshes and answers ``wrong_shard`` meanwhile.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from shardlite.actor import ActorPool, Error, Unavailable, WrongShard
from shardlite.router import (
    Directory,
    DirectoryUnavailable,
    Forwarder,
    ForwardWaiter,
    HostRecord,
    Lease,
    NodeRecord,
    Placement,
    ShardRecord,
    open_lease,
    wire,
)

from ._auth import Auth

log = logging.getLogger("shardlite.node")

WATCH_TIMEOUT_S = 5.0
RETRY_DIRECTORY_S = 1.0
PEER_POLL_S = 0.05
ROUTE_CACHE_KEYS = 100_000


def shard_dir(data: str, shard: str) -> str:
    return os.path.join(os.path.abspath(data), "shards", shard)


class Node:
    """One shard process in the cluster (see the module docstring)."""

    def __init__(
        self,
        *,
        record: NodeRecord,
        directory: Directory,
        placement: Placement,
        lease: Lease,
        data: str,
        forwarder: Forwarder,
        attach: Callable[[str], Awaitable[None]],
    ) -> None:
        self.record = record
        self.id = record.id
        self.directory = directory
        self.placement = placement
        self.lease = lease
        self.data = data
        self.forwarder = forwarder
        self._attach = attach
        self.served: dict[str, int] = {}  # shard id -> epoch it is served at
        self._shard_of: dict[str, ShardRecord] = {}  # key -> its shard, this placement
        self.not_ready: str | None = None
        self.host_record: HostRecord | None = None  # put by the host's first process
        self.auth = Auth({}, required=False)  # tokens (set by the server)
        self.rate_limit: Callable[[str], Error | None] | None = None  # per key, if set

    # ------------------------------------------------------------------ placement

    def locate(self, key: str) -> str:
        """The directory of the shard that holds ``key`` (for the actor pool)."""
        return shard_dir(self.data, self.placement.shard_for(key).id)

    async def adopt(self, placement: Placement) -> None:
        """Serve the shards ``placement`` gives this node; stop serving the others."""
        self.placement = placement
        self._shard_of = {}
        mine = {s.id: s.epoch for s in placement.shards.values() if s.owner == self.id}
        for shard_id, epoch in mine.items():
            if shard_id not in self.served:
                await self._attach(shard_dir(self.data, shard_id))
                log.info("serving %s at epoch %d", shard_id, epoch)
            self.served[shard_id] = epoch
        for shard_id in list(self.served):
            if shard_id not in mine:
                log.warning("%s is no longer ours: not serving it", shard_id)
                del self.served[shard_id]

    async def register(self) -> None:
        """Put this process (and its host) in the directory, bound to the lease."""
        await self.directory.put_node(self.record, self.lease.id)
        if self.host_record is not None:
            await self.directory.put_host(self.host_record, self.lease.id)

    async def run_lease(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the lease; if it lapses (directory unreachable too long), stop serving
        (``route`` checks ``lease.valid``) until a new lease and registration succeed."""
        task_status.started()
        while True:
            await self.lease.run()  # returns once the lease is lost
            log.error("directory lease lost: not serving shards until the directory is back")
            while True:
                try:
                    lease = await open_lease(self.directory, self.lease.ttl_s)
                    self.lease = lease
                    await self.register()
                    placement = await self.directory.load()
                except DirectoryUnavailable as exc:
                    self.not_ready = f"directory lease lost; directory unreachable: {exc}"
                    await trio.sleep(RETRY_DIRECTORY_S)
                    continue
                if placement is not None:
                    await self.adopt(placement)
                self.not_ready = None
                log.info("directory back: registered again with a new lease")
                break

    async def run_watcher(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the directory: adopt each new placement; say when it cannot be read."""
        task_status.started()
        revision = self.placement.revision
        while True:
            try:
                with trio.move_on_after(WATCH_TIMEOUT_S):
                    await self.directory.wait_change(revision, WATCH_TIMEOUT_S)
                placement = await self.directory.load()
                self.not_ready = None
            except DirectoryUnavailable as exc:
                self.not_ready = f"directory unreachable: {exc}"
                await trio.sleep(RETRY_DIRECTORY_S)
                continue
            if placement is not None and placement.revision != revision:
                revision = placement.revision
                await self.adopt(placement)

    async def wait_for_peers(self, procs: int, since: float) -> None:
        """Until the placement lists this host's ``procs`` processes, each registered
        since ``since``: then every forward goes to a live peer from the start."""
        host = self.record.host
        while True:
            nodes = self.placement.nodes
            fresh = [nodes.get(f"{host}/{i}") for i in range(procs)]
            if all(n is not None and n.started >= since for n in fresh):
                return
            placement = await self.directory.load()
            if placement is not None:
                await self.adopt(placement)
            await trio.sleep(PEER_POLL_S)

    # ------------------------------------------------------------------ per request

    def route(self, key: str, epoch: int | None) -> ShardRecord | Error | None:
        """None: serve here. A ShardRecord: forward to its owner. An Error: answer it."""
        placement = self.placement
        shard = self._shard_of.get(key)
        if shard is None:  # a hash and a bisect: cached per key (the hot path is ~5 µs)
            try:
                shard = placement.shard_for(key)
            except LookupError as exc:
                return Unavailable(str(exc))
            if len(self._shard_of) >= ROUTE_CACHE_KEYS:
                self._shard_of.clear()
            self._shard_of[key] = shard
        if shard.owner == self.id and self.served.get(shard.id) == shard.epoch:
            if not self.lease.valid:
                return Unavailable(
                    f"{shard.id}: this server cannot confirm it still owns the shard "
                    "(its directory lease lapsed)"
                )
            if epoch is None or epoch == shard.epoch:
                return None
            return self.wrong_shard(shard, epoch)  # newer: the watcher catches up soon
        if epoch is not None:  # the sender thought this node owned it: let it re-route
            return self.wrong_shard(shard, epoch)
        if shard.owner not in placement.nodes:
            return Unavailable(f"{shard.id} has no live owner (its server is down or starting)")
        return shard

    def wrong_shard(self, shard: ShardRecord, epoch: int | None) -> WrongShard:
        where = self.placement.location(shard)
        return WrongShard(
            f"{shard.id} is served by {where.owner or 'nobody'} at epoch {shard.epoch} "
            f"(the request saw epoch {epoch})",
            shard=shard.id,
            epoch=shard.epoch,
            owner=where.owner,
            location=where.rpc,
        )

    def forward_address(self, shard: ShardRecord) -> str:
        return self.placement.nodes[shard.owner].rpc

    async def call(
        self,
        pool: ActorPool,
        key: str,
        op: Any,
        *,
        idempotency_key: str | None = None,
        epoch: int | None = None,
        readonly: bool = False,
    ) -> Any:
        """Run ``op`` on ``key``'s actor: here, or on the process that owns it (one hop)."""
        where = self.route(key, epoch)
        if where is None:
            return await pool.call(key, op, idempotency_key=idempotency_key, readonly=readonly)
        if isinstance(where, Error):
            raise where
        waiter = ForwardWaiter()
        self.forwarder.forward(
            self.forward_address(where),
            key,
            op,
            waiter,
            None,
            idempotency_key=idempotency_key,
            epoch=where.epoch,
            readonly=readonly,
        )
        return await waiter.wait(op)

    async def status(self, actors_open: int) -> wire.NodeStatus:
        """What ``shardlite ops status`` shows of this process (files counted in a thread)."""
        shards = {}
        for shard_id, epoch in sorted(self.served.items()):
            files, size = await trio.to_thread.run_sync(_du, shard_dir(self.data, shard_id))
            shards[shard_id] = wire.ShardStatus(epoch, files, size)
        return wire.NodeStatus(
            self.id, os.getpid(), time.time() - self.record.started, actors_open, shards
        )


def _du(directory: str) -> tuple[int, int]:
    """(actor files, bytes of everything) under a shard directory."""
    files = size = 0
    for root, _, names in os.walk(directory):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
            files += name.endswith(".db")
    return files, size


__all__ = ["Node", "shard_dir"]
