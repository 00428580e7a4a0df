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

import msgspec
import trio

from shardlite.actor import ActorPool, Error, LogCorrupt, Overloaded, Unavailable, WrongShard
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
REFRESH_HOLD_S = 2.0
"""How long a request with a newer epoch than this process knows waits for a directory read."""
REFRESH_EVERY_S = 0.5
HOLD_MAX_S = 5.0
"""How long requests for a fenced shard (a move's cutover) wait before ``unavailable``."""
MAX_HELD = 10_000
"""Requests a fenced shard holds; more are refused with ``overloaded`` meanwhile."""


def shard_dir(data: str, shard: str) -> str:
    return os.path.join(os.path.abspath(data), "shards", shard)


class ShardFence:
    """A shard whose requests are held (a move's cutover): bounded in count and time.

    Held requests resume in arrival order once the fence is lifted: served here again
    (the move gave up) or forwarded to the new owner (it went through).
    """

    def __init__(self, shard: str, hold_s: float = HOLD_MAX_S, max_held: int = MAX_HELD) -> None:
        self.shard = shard
        self.until = trio.current_time() + hold_s
        self.max_held = max_held
        self.held: list[Callable[[bool], None]] = []
        self.move_mod = 0  # the move record's revision this fence wrote
        self.attach = False  # a split is done: placement adoption may attach the shard
        self.started = trio.current_time()

    def hold(self, resume: Callable[[bool], None]) -> Error | None:
        """Keep ``resume`` until the fence lifts (``resume(True)``) or times out
        (``resume(False)``); or the error to answer now."""
        if trio.current_time() > self.until:
            return Unavailable(f"{self.shard} is being moved; retry shortly", retry_after=1.0)
        if len(self.held) >= self.max_held:
            return Overloaded(f"{self.shard} is being moved and holds {len(self.held)} requests")
        self.held.append(resume)
        return None

    def release(self, go: bool) -> None:
        held, self.held = self.held, []
        for resume in held:
            resume(go)

    async def wait(self) -> bool:
        """For one task: until the fence lifts (True) or gives up holding (False)."""
        done = trio.Event()
        outcome: list[bool] = []

        def resume(go: bool) -> None:
            outcome.append(go)
            done.set()

        error = self.hold(resume)
        if error is not None:
            raise error
        await done.wait()
        return outcome[0]


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
        detach: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.record = record
        self.id = record.id
        self.directory = directory
        self.placement = placement
        self.lease = lease
        self.data = data
        self.forwarder = forwarder
        self._attach = attach
        self.detach = detach
        self.prepare: Callable[[Placement], Awaitable[None]] | None = None
        """Run first by every adopt (finishing an interrupted split)."""
        self.served: dict[str, int] = {}  # shard id -> epoch it is served at
        self.unservable: dict[str, str] = {}
        """Shards of this node whose log cannot be replayed (damaged, or a format this
        build does not read), with why: their keys get 503 ``unavailable`` saying so, the
        other shards serve. Not tried again until the process restarts: an operator
        moving segments aside (the remedy) must not have a half-done move replayed."""
        self.fences: dict[str, ShardFence] = {}  # shards whose requests are held
        self.refreshing: dict[str, ShardFence] = {}  # held until the directory is read
        self._refreshed_at: dict[str, float] = {}
        self.nursery: trio.Nursery | None = None  # for directory reads (set by the server)
        self._adopting = trio.Lock()
        self._shard_of: dict[str, ShardRecord] = {}  # key -> its shard, this placement
        self.not_ready: str | None = None
        self.host_record: HostRecord | None = None  # put by the host's first process
        self.auth = Auth({}, required=False)  # tokens (set by the server)
        self.rate_limit: Callable[[str], Error | None] | None = None  # per key, if set
        self.admin: Any = None  # the ops verbs' handler (shards/_admin.py), set by the server

    # ------------------------------------------------------------------ placement

    def locate(self, key: str) -> str:
        """The directory of the shard that holds ``key`` (for the actor pool)."""
        return shard_dir(self.data, self.placement.shard_for(key).id)

    async def adopt(self, placement: Placement) -> None:
        """Serve the shards ``placement`` gives this node; stop serving the others.
        One at a time (the watcher, the lease keeper and admin operations all adopt);
        a placement older than the one adopted last is skipped."""
        async with self._adopting:
            if placement.revision < self.placement.revision:
                return
            await self._adopt(placement)

    async def _adopt(self, placement: Placement) -> None:
        if self.prepare is not None:
            await self.prepare(placement)
        self.placement = placement
        self._shard_of = {}
        mine = {s.id: s.epoch for s in placement.shards.values() if s.owner == self.id}
        for shard_id, epoch in mine.items():
            if shard_id not in self.served:
                if shard_id in self.unservable or not await self._may_serve(placement, shard_id):
                    continue
                try:
                    await self._attach(shard_dir(self.data, shard_id))
                except LogCorrupt as exc:  # the others still serve; this one answers 503
                    log.error("not serving %s: %s", shard_id, exc)
                    self.unservable[shard_id] = str(exc)
                    continue
                log.info("serving %s at epoch %d", shard_id, epoch)
            self.served[shard_id] = epoch
        for shard_id in list(self.unservable):
            if shard_id not in mine:
                del self.unservable[shard_id]
        for shard_id in list(self.served):
            if shard_id not in mine:
                log.warning("%s is no longer ours: not serving it", shard_id)
                del self.served[shard_id]
                fence = self.fences.pop(shard_id, None)
                if fence is not None:  # held requests go to the new owner
                    fence.release(True)
                if self.detach is not None:
                    await self.detach(shard_id)

    async def _may_serve(self, placement: Placement, shard_id: str) -> bool:
        """A shard left fenced by an earlier run of this process (it crashed during a
        move's cutover) is served only once the fence is given up in the directory:
        otherwise the move could still flip it to its target."""
        fence = self.fences.get(shard_id)
        if fence is not None and not fence.attach:
            return False  # this process is splitting it: the split attaches it when done
        for other in placement.moves.values():  # a split of ours not finished yet
            if (
                other.kind == "split"
                and other.phase == "flipped"
                and other.source == self.id
                and shard_id in (other.shard, other.new_shard)
            ):
                return False
        move = placement.moves.get(shard_id)
        if move is None or move.phase != "fenced":
            return True
        mod = self.directory.move_mod.get(shard_id, 0)
        unfenced = msgspec.structs.replace(move, phase="copy", fenced_by="")
        try:
            if await self.directory.put_move(unfenced, mod):
                log.warning("%s: gave up the fence of an interrupted move", shard_id)
                return True
        except DirectoryUnavailable:
            pass  # cannot tell: do not serve yet (the next placement read tries again)
        return False  # the move went on: the next placement says where the shard is

    def held(self) -> int:
        """Requests held now (fences of moves, waits for the directory)."""
        fences = (*self.fences.values(), *self.refreshing.values())
        return sum(len(f.held) for f in fences)

    def lift(self, shard_id: str, go: bool = True) -> None:
        """Stop holding ``shard_id``'s requests; they run (or fail, ``go`` False)."""
        fence = self.fences.pop(shard_id, None)
        if fence is not None:
            fence.release(go)

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

    def route(self, key: str, epoch: int | None) -> ShardRecord | ShardFence | Error | None:
        """None: serve here. A ShardRecord: forward to its owner. An Error: answer it.
        A ShardFence: hold the request until the fence lifts, then route it again."""
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
        if shard.owner == self.id and shard.id in self.unservable:
            reason = self.unservable[shard.id]
            return Unavailable(f"{shard.id} is not served: {reason}")
        if shard.owner == self.id and self.served.get(shard.id) == shard.epoch:
            if not self.lease.valid:
                return Unavailable(
                    f"{shard.id}: this server cannot confirm it still owns the shard "
                    "(its directory lease lapsed)"
                )
            if epoch is None or epoch == shard.epoch:
                if self.fences:
                    return self.fences.get(shard.id)
                return None
            return self._newer(shard, epoch)
        if epoch is not None:  # the sender thought this node owned it: let it re-route
            return self._newer(shard, epoch)
        if shard.owner not in placement.nodes:
            return Unavailable(f"{shard.id} has no live owner (its server is down or starting)")
        return shard

    def _newer(self, shard: ShardRecord, epoch: int) -> ShardFence | WrongShard:
        """The sender saw another epoch. If it saw a newer one (a move just flipped the
        shard to this process, and the watcher has not caught up), read the directory
        now and hold the request meanwhile; else let the sender re-route."""
        if epoch <= shard.epoch or self.nursery is None:
            return self.wrong_shard(shard, epoch)
        fence = self.refreshing.get(shard.id)
        if fence is not None:
            return fence
        now = trio.current_time()
        if now - self._refreshed_at.get(shard.id, -1e9) < REFRESH_EVERY_S:
            return self.wrong_shard(shard, epoch)  # just looked: the directory says so
        self._refreshed_at[shard.id] = now
        fence = self.refreshing[shard.id] = ShardFence(shard.id, hold_s=REFRESH_HOLD_S)
        self.nursery.start_soon(self._refresh, fence)
        return fence

    async def _refresh(self, fence: ShardFence) -> None:
        try:
            with trio.move_on_after(REFRESH_HOLD_S):
                placement = await self.directory.load()
                if placement is not None:
                    await self.adopt(placement)
        except DirectoryUnavailable as exc:
            log.warning("cannot read the directory for %s: %s", fence.shard, exc)
        finally:
            self.refreshing.pop(fence.shard, None)
            fence.release(True)

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
        while isinstance(where, ShardFence):
            if not await where.wait():
                raise Unavailable(f"{where.shard} is being moved; retry shortly", retry_after=1.0)
            epoch = None  # accepted before the flip: forwarded, not bounced, if it moved
            where = self.route(key, epoch)
        if where is None:
            if type(op) is wire.Delete:
                op = pool.delete_call()
            elif type(op) is wire.Export:
                op = pool.export_call(1 << 31)
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
        in_fanout = os.path.dirname(root) == directory  # SHARD/xx/: actor files only
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
            files += in_fanout and name.endswith(".db")
    return files, size


__all__ = ["Node", "ShardFence", "shard_dir"]
