"""``ops split``: half of a shard's slots go to a new shard on the same process.

Nothing is copied: the files of the keys whose slots move are renamed into the new
shard's directory. The owner does it all, under the shard's fence:

1. fence the shard (hold its requests, finish those in flight) and record the fence;
2. detach it (every actor closed and checkpointed: each file holds all its writes);
3. flip, in one directory transaction iff the fence still stands: the shard keeps the
   lower half at the next epoch, the new shard (epoch 1, same owner) takes the upper;
4. rename the upper half's files, carry the log epoch and the alarm index entries over;
5. serve both shards, release the held requests, delete the split record.

A crash before the flip leaves every file where it was (the restarted process gives the
fence up and serves the whole shard); a crash after it is finished by the restarted
process before it serves either shard (:func:`finish_splits`: renaming is idempotent).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import msgspec
import trio

from shardlite.actor import (
    DAMAGED_SUFFIX,
    EVERY_KEY,
    BadRequest,
    Unavailable,
    next_alarm_of_file,
    raise_log_epoch,
    read_log_epoch,
    resolve_actor_path,
    sync_directory,
)
from shardlite.router import Placement, ShardRecord, slot_of, wire

from ._routing import Node, ShardFence, shard_dir
from ._shardfiles import list_actor_keys, note_alarms

log = logging.getLogger("shardlite.split")

QUIESCE_S = 10.0


def halves(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(lower, upper): the shard's slots cut in two, by count, in slot order."""
    spans = sorted(ranges)
    total = sum(end - start for start, end in spans)
    if total < 2:
        raise BadRequest("a shard of one slot cannot be split")
    keep = total // 2
    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for start, end in spans:
        if keep >= end - start:
            lower.append((start, end))
            keep -= end - start
        elif keep > 0:
            lower.append((start, start + keep))
            upper.append((start + keep, end))
            keep = 0
        else:
            upper.append((start, end))
    return lower, upper


async def split(admin: Any, op: wire.SplitShard) -> wire.Done:
    """The owner's side of ``ops split`` (see the module docstring)."""
    node: Node = admin.node
    directory = node.directory
    source_dir = admin._served_dir(op.shard)
    placement = await directory.load()
    assert placement is not None
    current = placement.shards[op.shard]
    if op.new_shard in placement.shards:
        raise BadRequest(f"{op.new_shard} exists already")
    lower, upper = halves(current.ranges)
    if op.shard in node.fences:
        raise BadRequest(f"{op.shard} is fenced already")
    fence = node.fences[op.shard] = ShardFence(op.shard)
    admin.pool.pause_alarms(source_dir)
    detached = False
    try:
        if not await admin.pool.quiesce(source_dir, QUIESCE_S):
            raise Unavailable(f"{op.shard}: requests in flight did not finish in {QUIESCE_S} s")
        move, mod = await directory.load_move(op.shard)
        if move is None or mod != op.move_mod:
            raise BadRequest(f"the split record of {op.shard} changed; not splitting")
        fenced = msgspec.structs.replace(move, phase="fenced", fenced_by=node.id)
        fence.move_mod = await directory.put_move(fenced, mod)
        if not fence.move_mod:
            raise BadRequest(f"the split record of {op.shard} changed; not splitting")
        log_epoch = admin.pool.durability.log_epoch(source_dir)
        left = await admin.pool.detach_shard(source_dir)
        node.served.pop(op.shard, None)
        detached = True
        if left:  # the upper half's files must hold every write: only this log has them
            raise Unavailable(_not_up_to_the_log(op.shard, left))
        await directory.load()  # the shard's mod revision as of now, for the flip
        kept = ShardRecord(op.shard, lower, current.owner, current.epoch + 1)
        new = ShardRecord(op.new_shard, upper, current.owner, 1)
        done = msgspec.structs.replace(fenced, phase="flipped")
        if not await directory.flip(fenced, fence.move_mod, [(current, kept), (None, new)], done):
            raise BadRequest(f"{op.shard} changed meanwhile; not splitting")
    except BaseException:
        with trio.CancelScope(shield=True):
            await _undo(admin, op.shard, fence, source_dir, detached=detached)
        raise
    admin.splitting.add(op.shard)
    if os.environ.get("SHARDLITE_CRASH_AT") == "split-flipped":  # the crash tests
        os._exit(70)
    try:
        moved = await trio.to_thread.run_sync(
            move_files,
            source_dir,
            shard_dir(admin.data, op.new_shard),
            upper,
            placement.cluster.slots,
            log_epoch,
        )
        _, mod = await directory.load_move(op.shard)
        await directory.end_move(op.shard, mod)
    finally:
        admin.splitting.discard(op.shard)
    reloaded = await directory.load()
    assert reloaded is not None
    # Both shards attach, by this adoption or by the watcher's if it comes first (it may
    # also have come before, while the split still kept the shard from attaching, and no
    # further change would wake it); then the held requests run.
    fence.attach = True
    await node.adopt(reloaded)
    await node.adopt(node.placement)  # the watcher may have adopted a newer one meanwhile
    node.lift(op.shard)
    admin.pool.resume_alarms(source_dir)
    log.info("%s split: %d actors now in %s", op.shard, moved, op.new_shard)
    return wire.Done(moved)


def _not_up_to_the_log(shard: str, left: list[str]) -> str:
    what = (
        "its actor files could not be synced"
        if EVERY_KEY in left
        else f"{len(left)} of its actor files could not be brought up to its log "
        f"({', '.join(map(repr, sorted(left)[:3]))}{', ...' if len(left) > 3 else ''})"
    )
    return (
        f"{shard}: {what} (an I/O error, see the server's log); not splitting. The shard "
        "serves whole and its recovery tries them again; retry the split later"
    )


async def _undo(
    admin: Any, shard: str, fence: ShardFence, source_dir: str, *, detached: bool
) -> None:
    """A split that failed before its flip: give the fence up, serve the shard whole."""
    node: Node = admin.node
    if fence.move_mod:
        move, mod = await node.directory.load_move(shard)
        if move is not None and mod == fence.move_mod:
            await node.directory.put_move(
                msgspec.structs.replace(move, phase="copy", fenced_by=""), mod
            )
    node.fences.pop(shard, None)  # adopt must not see our own fence as a reason to wait
    try:
        if detached:
            reloaded = await node.directory.load()
            if reloaded is not None:
                await node.adopt(reloaded)
    finally:  # the held requests and alarms go on even if the directory is unreachable
        fence.release(True)
        admin.pool.resume_alarms(source_dir)


async def finish_splits(admin: Any, placement: Placement) -> None:
    """Before serving: finish a split this process flipped but did not get to rename."""
    node: Node = admin.node
    data: str = admin.data
    for move in list(placement.moves.values()):
        if move.kind != "split" or move.phase != "flipped" or move.source != node.id:
            continue
        if move.shard in admin.splitting:
            continue  # the split itself is renaming right now
        new = placement.shards.get(move.new_shard)
        if new is None:
            continue
        source_dir = shard_dir(data, move.shard)
        log_epoch = await trio.to_thread.run_sync(read_log_epoch, source_dir)
        moved = await trio.to_thread.run_sync(
            move_files,
            source_dir,
            shard_dir(data, new.id),
            new.ranges,
            placement.cluster.slots,
            log_epoch,
        )
        mod = node.directory.move_mod.get(move.shard, 0)
        await node.directory.end_move(move.shard, mod)
        log.warning(
            "%s: finished an interrupted split (%d actors to %s)", move.shard, moved, new.id
        )


def move_files(
    source: str, target: str, ranges: list[tuple[int, int]], slots: int, log_epoch: int
) -> int:
    """Rename every actor file of ``source`` whose key's slot is in ``ranges`` into
    ``target`` (idempotent); carry the log epoch and alarm index entries. Blocking."""

    def inside(key: str) -> bool:
        slot = slot_of(key, slots)
        return any(start <= slot < end for start, end in ranges)

    raise_log_epoch(target, log_epoch)
    keys = [k for k in list_actor_keys(source, {}) if inside(k)]
    alarms: dict[str, float | None] = {}
    for key in keys:
        old = resolve_actor_path(source, key)
        new = resolve_actor_path(target, key)
        os.makedirs(os.path.dirname(new), mode=0o700, exist_ok=True)
        for suffix in (DAMAGED_SUFFIX, "-wal", "-shm"):  # a damage mark goes first
            with contextlib.suppress(FileNotFoundError):
                os.rename(old + suffix, new + suffix)
        os.rename(old, new)
        sync_directory(os.path.dirname(new))
        sync_directory(os.path.dirname(old))
        alarms[key] = next_alarm_of_file(new)
    sync_directory(target)
    if keys:
        _move_alarm_entries(source, target, alarms)
    return len(keys)


def _move_alarm_entries(source: str, target: str, alarms: dict[str, float | None]) -> None:
    moving = {k: at for k, at in alarms.items() if at is not None}
    if moving:
        note_alarms(target, moving)
        note_alarms(source, dict.fromkeys(moving))  # None: no longer in this shard's index


__all__ = ["finish_splits", "halves", "move_files", "split"]
