"""``shardlite ops move`` and ``ops drain``: move shards between hosts while they serve.

The phases (after Vitess MoveTables and Akka handoff; DESIGN.md "Moving a shard"), each
recorded in the shard's move record in the directory so that ``--resume`` and
``--abort`` can finish a move whose CLI, source or target died:

1. ``copy``: the source notes every key written from now on (and, with
   ``durability=log``, keeps the shard-log records of those writes); the target pulls
   every actor file (backup API copies, sha256 and quick_check verified); then, round
   after round, the records are replayed into the copies (a key no record describes,
   such as a schema change, is copied again whole).
2. ``fenced``: the source holds new requests for the shard (bounded in count and time),
   finishes those in flight and records the fence; the last changes are applied;
   both sides must list the same keys.
3. ``flipped``: one directory transaction, iff the fence still stands, gives the shard
   to the target at the next epoch (the point of no return). The target serves; the
   source forwards what it held and retires its copy.

``SHARDLITE_CRASH_AT=<phase>`` makes the CLI exit right after that phase (tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from shardlite.router import Directory, MoveRecord, Placement, ShardRecord, shard_name, wire

from ._nodes import Nodes, OpsError, find_shard, host_of

PULL_BATCH = 256
"""Actor files per PullActors request (progress is printed between them)."""
CATCH_UP_ROUNDS = 10
SMALL_ENOUGH = 8
"""Files left to copy again below which the cutover starts ..."""
SMALL_RECORDS = 2000
"""... and log records left to replay (each is microseconds)."""
CRASH_ENV = "SHARDLITE_CRASH_AT"

Echo = Callable[[str], None]


def _crash_point(phase: str) -> None:
    if os.environ.get(CRASH_ENV) == phase:
        os._exit(70)


async def _load(directory: Directory) -> Placement:
    placement = await directory.load()
    if placement is None:
        raise OpsError(f"the directory {directory.url} holds no cluster yet")
    return placement


def pick_node(placement: Placement, host: str) -> str:
    """The live process of ``host`` that owns the fewest shards."""
    nodes = [n.id for n in placement.nodes.values() if n.host == host]
    if not nodes:
        hosts = sorted({n.host for n in placement.nodes.values()})
        raise OpsError(f"host {host!r} has no live shard process (live hosts: {', '.join(hosts)})")
    owned = {n: 0 for n in nodes}
    for shard in placement.shards.values():
        if shard.owner in owned:
            owned[shard.owner] += 1
    return min(nodes, key=lambda n: (owned[n], n))


class Mover:
    """One move, driven phase by phase (see the module docstring)."""

    def __init__(self, directory: Directory, nodes: Nodes, echo: Echo) -> None:
        self.directory = directory
        self.nodes = nodes
        self.echo = echo
        self.report: dict[str, Any] = {}

    async def start(self, shard_id: str, to_host: str) -> tuple[MoveRecord, int]:
        placement = await _load(self.directory)
        shard = find_shard(placement, shard_id)
        move, mod = await self.directory.load_move(shard_id)
        if move is not None:
            raise OpsError(
                f"a {move.kind} of {shard_id} to {move.target} is in progress (phase "
                f"{move.phase}): finish it with --resume or undo it with --abort"
            )
        if host_of(shard.owner) == to_host:
            raise OpsError(f"{shard_id} is on {to_host} already ({shard.owner})")
        if shard.owner not in placement.nodes:
            raise OpsError(f"{shard_id}'s owner {shard.owner} is down: it cannot be copied")
        target = pick_node(placement, to_host)
        move = MoveRecord(shard_id, shard.owner, target, "copy", time.time(), shard.epoch)
        mod = await self.directory.put_move(move, 0)
        if not mod:
            raise OpsError(f"another move of {shard_id} started just now")
        return move, mod

    async def existing(self, shard_id: str) -> tuple[MoveRecord, int]:
        find_shard(await _load(self.directory), shard_id)
        move, mod = await self.directory.load_move(shard_id)
        if move is None:
            raise OpsError(f"no move of {shard_id} is in progress")
        return move, mod

    async def run(self, move: MoveRecord, mod: int) -> dict[str, Any]:
        started = time.monotonic()
        placement = await _load(self.directory)
        self.report = {"shard": move.shard, "source": move.source, "target": move.target}
        if move.phase == "fenced":  # an interrupted cutover: the source serves again first
            self.echo(f"{move.shard}: the last run stopped during the cutover; starting over")
            await self._unfence(placement, move)
            move, mod = await self.existing(move.shard)
        if move.phase == "copy":
            move, mod = await self._copy_and_cut_over(placement, move, mod)
        if move.phase == "flipped":
            await self._finish(move, mod)
        self.report["seconds"] = round(time.monotonic() - started, 3)
        return self.report

    async def _copy_and_cut_over(
        self, placement: Placement, move: MoveRecord, mod: int
    ) -> tuple[MoveRecord, int]:
        source = _address(placement, move.source, "source")
        target = _address(placement, move.target, "target")
        shard = move.shard
        await self.nodes.ask(source, wire.TrackWrites(shard, True))
        listing = await self.nodes.ask(source, wire.ShardKeys(shard))
        epoch = listing.log_epoch
        self.echo(f"{shard}: copying {len(listing.keys)} actors {move.source} -> {move.target}")
        copied = await self._pull(source, target, shard, listing.keys, epoch, fresh=True)
        self.report.update(actors=len(listing.keys), bytes=copied["bytes"])
        _crash_point("copy")
        rounds = 0
        for _ in range(CATCH_UP_ROUNDS):
            pulled = await self.nodes.ask(target, wire.PullChanges(shard, source, epoch))
            rounds += 1
            whole = pulled.copied + pulled.removed
            self.echo(
                f"{shard}: catch-up round {rounds}: {pulled.replayed} actors brought up to "
                f"date by {pulled.records} log records, {whole} copied again"
            )
            if whole <= SMALL_ENOUGH and pulled.records <= SMALL_RECORDS:
                break
        await self.nodes.ask(target, wire.PullChanges(shard, source, epoch, ready=True))
        self.report["catch_up_rounds"] = rounds
        fenced_at = time.monotonic()
        self.report["fenced_at"] = time.time()
        mod = (await self.nodes.ask(source, wire.Fence(shard, mod))).move_mod
        try:
            return await self._cut_over(
                source, target, move, mod=mod, epoch=epoch, fenced_at=fenced_at
            )
        except BaseException:
            with trio.CancelScope(shield=True):  # let the source serve again at once
                try:
                    await self.nodes.ask(source, wire.Unfence(shard))
                except Exception as exc:
                    self.echo(f"{shard}: could not give up the fence ({exc}); it lapses in 15 s")
            raise

    async def _cut_over(
        self, source: str, target: str, move: MoveRecord, *, mod: int, epoch: int, fenced_at: float
    ) -> tuple[MoveRecord, int]:
        shard = move.shard
        _crash_point("fenced")
        steps = self.report["cutover_steps_ms"] = {"fence": _ms(fenced_at)}
        got: dict[str, Any] = {}

        async def get(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
            got[name] = await fn()

        async with trio.open_nursery() as nursery:  # the source is fenced: all at once
            nursery.start_soon(
                get, "last", lambda: self.nodes.ask(target, wire.PullChanges(shard, source, epoch))
            )
            nursery.start_soon(get, "theirs", lambda: self.nodes.ask(source, wire.ShardKeys(shard)))
            nursery.start_soon(get, "placement", lambda: _load(self.directory))
            nursery.start_soon(get, "fenced", lambda: self.directory.load_move(shard))
        steps["last_changes"] = _ms(fenced_at) - sum(steps.values())
        last = got["last"]
        self.report["cutover_records"] = last.records
        self.report["cutover_copies"] = last.copied + last.removed
        theirs = got["theirs"].keys
        ours = (await self.nodes.ask(target, wire.ShardKeys(shard))).keys
        if theirs != ours:
            missing = sorted(set(theirs) ^ set(ours))[:5]
            raise OpsError(f"{shard}: the copy differs from the source (e.g. {missing}); retry")
        current = got["placement"].shards[shard]
        if current.owner != move.source or current.epoch != move.epoch:
            raise OpsError(f"{shard} changed owner or epoch during the move; not flipping")
        new = ShardRecord(shard, current.ranges, move.target, current.epoch + 1)
        fenced = got["fenced"][0]
        flipped = msgspec.structs.replace(fenced or move, phase="flipped")
        if not await self.directory.flip(move, mod, [(current, new)], flipped):
            raise OpsError(
                f"{shard}: the source gave up its fence (the cutover took too long) or the "
                "directory changed; nothing was flipped: run the move again with --resume"
            )
        steps["verify_and_flip"] = _ms(fenced_at) - sum(steps.values())
        self.report["cutover_ms"] = _ms(fenced_at)
        self.report["epoch"] = new.epoch
        self.echo(f"{shard}: now owned by {move.target} at epoch {new.epoch}")
        _crash_point("flipped")
        return await self.existing(shard)

    async def _pull(
        self,
        source: str,
        target: str,
        shard: str,
        keys: list[str],
        epoch: int,
        *,
        fresh: bool = False,
    ) -> dict[str, int]:
        total = {"copied": 0, "removed": 0, "bytes": 0}
        batches = [keys[i : i + PULL_BATCH] for i in range(0, len(keys), PULL_BATCH)] or [[]]
        for i, batch in enumerate(batches):
            op = wire.PullActors(shard, source, batch, epoch, fresh and i == 0)
            pulled = await self.nodes.ask(target, op)
            total["copied"] += pulled.copied
            total["removed"] += pulled.removed
            total["bytes"] += pulled.bytes
            if len(batches) > 1:
                done = min(len(keys), (i + 1) * PULL_BATCH)
                self.echo(f"  {done}/{len(keys)} actors, {total['bytes'] / 1e6:.1f} MB")
        return total

    async def _finish(self, move: MoveRecord, mod: int) -> None:
        placement = await _load(self.directory)
        target = _address(placement, move.target, "target")
        await self.nodes.ask(target, wire.Adopt())
        source_node = placement.nodes.get(move.source)
        try:
            if source_node is None:
                raise OpsError(f"{move.source} is not in the directory")
            await self.nodes.ask(source_node.rpc, wire.Release(move.shard))
        except OpsError as exc:  # its restart retires the copy (shards/_admin.py)
            self.echo(
                f"{move.shard}: the source is down ({exc}); it retires its copy when it restarts"
            )
        self.report["released_at"] = time.time()
        await self.directory.end_move(move.shard, mod)
        self.echo(f"{move.shard}: moved to {move.target}")

    async def abort(self, move: MoveRecord, mod: int) -> None:
        if move.phase == "flipped":
            raise OpsError(
                f"{move.shard} is past the point of no return: {move.target} serves it. Move it "
                f"back with `shardlite ops move {move.shard} --to {host_of(move.source)}`, or "
                "finish this move with --resume"
            )
        placement = await _load(self.directory)
        if move.phase == "fenced":
            await self._unfence(placement, move)
        source = placement.nodes.get(move.source)
        if source is not None:
            try:
                await self.nodes.ask(source.rpc, wire.TrackWrites(move.shard, False))
            except Exception as exc:  # it may not serve the shard any more: say so
                self.echo(f"{move.shard}: the source did not stop tracking writes: {exc}")
        target = placement.nodes.get(move.target)
        if target is not None:
            await self.nodes.ask(target.rpc, wire.DropCopy(move.shard))
        else:
            self.echo(f"{move.shard}: the target is down; its partial copy stays until a move")
        current, mod = await self.directory.load_move(move.shard)
        if current is not None and not await self.directory.end_move(move.shard, mod):
            raise OpsError(f"the move record of {move.shard} changed meanwhile; look again")
        self.echo(f"{move.shard}: move aborted; {move.source} serves it")

    async def split(self, shard_id: str) -> dict[str, Any]:
        """Half of the shard's slots to a new shard on the same process (files renamed)."""
        started = time.monotonic()
        placement = await _load(self.directory)
        shard = find_shard(placement, shard_id)
        move, mod = await self.directory.load_move(shard_id)
        if move is not None:
            raise OpsError(
                f"a {move.kind} of {shard_id} is in progress (phase {move.phase}): "
                f"{'`ops move --resume` or --abort' if move.kind == 'move' else 'restart its owner'}"
            )
        owner = _address(placement, shard.owner, "owner")
        numbers = [
            int(s.rpartition("-")[2]) for s in placement.shards if s.rpartition("-")[2].isdigit()
        ]
        new_id = shard_name(max(numbers, default=-1) + 1)
        record = MoveRecord(
            shard_id, shard.owner, shard.owner, "copy", time.time(), shard.epoch,
            kind="split", new_shard=new_id,
        )  # fmt: skip
        mod = await self.directory.put_move(record, 0)
        if not mod:
            raise OpsError(f"another move or split of {shard_id} started just now")
        try:
            moved = (await self.nodes.ask(owner, wire.SplitShard(shard_id, new_id, mod))).count
        except BaseException:
            with trio.CancelScope(shield=True):
                current, mod = await self.directory.load_move(shard_id)
                if current is not None and current.phase == "copy":
                    await self.directory.end_move(shard_id, mod)
            raise
        placement = await _load(self.directory)
        return {
            "shard": shard_id,
            "new_shard": new_id,
            "slots": [list(r) for r in placement.shards[new_id].ranges],
            "actors_moved": moved,
            "seconds": round(time.monotonic() - started, 3),
        }

    async def _unfence(self, placement: Placement, move: MoveRecord) -> None:
        source = placement.nodes.get(move.source)
        if source is None:
            # a source that restarts gives the fence up itself before it serves
            raise OpsError(f"the source {move.source} is down; start it, then run this again")
        await self.nodes.ask(source.rpc, wire.Unfence(move.shard))


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)


def _address(placement: Placement, node: str, role: str) -> str:
    record = placement.nodes.get(node)
    if record is None:
        raise OpsError(f"the {role} {node} is down (not in the directory): start it, then --resume")
    return record.rpc


async def drain_plan(directory: Directory, host: str) -> list[tuple[str, str]]:
    """(shard, target host) for every shard of ``host``, spread over the other hosts."""
    placement = await _load(directory)
    live = {n.host for n in placement.nodes.values()}
    owners = {host_of(s.owner) for s in placement.shards.values()}
    if host not in live | owners:
        raise OpsError(f"unknown host {host!r} (hosts: {', '.join(sorted(live | owners))})")
    others = sorted(live - {host})
    if not others:
        raise OpsError(f"no other host is live to take {host}'s shards")
    load = dict.fromkeys(others, 0)
    for shard in placement.shards.values():
        if host_of(shard.owner) in load:
            load[host_of(shard.owner)] += 1
    plan = []
    for shard in sorted(placement.shards.values(), key=lambda s: s.id):
        if host_of(shard.owner) == host:
            to = min(others, key=lambda h: (load[h], h))
            load[to] += 1
            plan.append((shard.id, to))
    return plan


__all__ = ["Mover", "drain_plan", "pick_node"]
