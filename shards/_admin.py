"""The ops verbs' side of a shard process: copies, moves, checks and restores.

Admin operations (``router/_wire.py``, "admin operations") arrive over RPC from the ops
CLI, or from another shard process during a move, and run as tasks of the connection.

A move, as this process sees it (the CLI drives the phases, ops/_move.py):

* source: ``TrackWrites`` (note every key written from now on), ``Snapshot`` and
  ``ReadChunk`` for each file the target pulls, ``TakeWritten`` for the re-copies;
  ``Fence``: hold new requests for the shard, finish those in flight, and record the
  fence in the move record (the directory's compare-and-swap then decides between the
  flip and a fence given up, never both); ``Release`` after the flip: forward what was
  held, close the shard's actors and retire its directory.
* target: ``PullActors``: copy files from the source over the peer connection, check
  each one's sha256 and ``quick_check`` before it takes its place; ``Adopt``: read the
  directory and serve.

A fence not resolved within ``FENCE_MAX_S`` is given up by the source itself (in the
directory first: if the flip won, the shard is no longer ours and the held requests are
forwarded instead).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from typing import Any

import msgspec
import trio

from shardlite.actor import (
    EVERY_KEY,
    ActorPool,
    BadRequest,
    NotFound,
    Unavailable,
    check_actor_file,
    raise_log_epoch,
    remove_actor_files,
    resolve_actor_path,
    sha256_file,
    sync_directory,
    verify_log,
)
from shardlite.router import DirectoryUnavailable, ForwardWaiter, wire

from ._routing import Node, ShardFence, shard_dir
from ._shardfiles import (
    RETIRED_DIR,
    append,
    apply_records,
    check_and_place,
    list_actor_keys,
    note_alarms,
    read_at,
    wipe_shard,
    write_new,
)

log = logging.getLogger("shardlite.admin")

CHUNK_BYTES = 4 << 20
"""Bytes per ReadChunk reply between shard processes."""
FIRST_CHUNK_BYTES = 1 << 20
"""Bytes a Snapshot reply carries inline: smaller files need one round trip."""
SNAPSHOT_TTL_S = 600.0
PULL_PARALLEL = 8
"""Files a target copies at once (their snapshots, transfers and syncs overlap)."""
QUIESCE_S = 10.0
"""How long a fence waits for the shard's requests in flight to finish."""
FENCE_MAX_S = 15.0
"""A fence the move does not resolve within this is given up by the source."""
DETACH_DELAY_S = 0.5
TMP_DIR = "tmp"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Admin:
    """Handles the admin operations of one shard process (see the module docstring)."""

    def __init__(self, pool: ActorPool, node: Node, data: str, nursery: trio.Nursery) -> None:
        self.pool = pool
        self.node = node
        self.data = data
        self.nursery = nursery
        self.tmp = os.path.join(data, TMP_DIR, node.id.replace("/", "-"))
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of an earlier run
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)
        self.snapshots: dict[str, tuple[str, int, float]] = {}  # id -> (path, size, expiry)
        self.pulling: set[str] = set()
        self.splitting: set[str] = set()
        self.ready: set[str] = set()  # copies whose shard log is open before they serve
        self.strays_checked = False

    async def handle(self, op: Any) -> Any:
        handler = getattr(self, "_" + type(op).__name__.lower(), None)
        if handler is None:
            raise BadRequest(f"unknown admin operation {type(op).__name__}")
        return await handler(op)

    def _served_dir(self, shard: str) -> str:
        if shard not in self.node.served:
            owner = self.node.placement.shards.get(shard)
            if shard in self.node.unservable:  # ours, but its log stopped it from opening
                where = f"it cannot open: {self.node.unservable[shard]}"
            else:
                where = f"it is served by {owner.owner}" if owner else "no such shard"
            raise BadRequest(f"{shard} is not served by {self.node.id}: {where}")
        return shard_dir(self.data, shard)

    # ------------------------------------------------------------------ source side

    async def _shardkeys(self, op: wire.ShardKeys) -> wire.KeyList:
        directory = shard_dir(self.data, op.shard)
        # recovery after a restart opens files in the background: the listing must not
        # meet one (a hashed name's key is read from inside the file)
        await self.pool.durability.wait_recovered(directory)
        known = self.pool.keys_by_path(directory)
        keys = await trio.to_thread.run_sync(list_actor_keys, directory, known)
        return wire.KeyList(keys, self.pool.durability.log_epoch(directory))

    async def _trackwrites(self, op: wire.TrackWrites) -> wire.Done:
        directory = self._served_dir(op.shard)
        if op.on:
            self.pool.track_writes(directory)
        else:
            self.pool.untrack_writes(directory)
        return wire.Done()

    async def _takewritten(self, op: wire.TakeWritten) -> wire.Written:
        directory = self._served_dir(op.shard)
        records, whole = self.pool.take_written(directory)
        return wire.Written(records, whole)

    async def _snapshot(self, op: wire.Snapshot) -> wire.SnapshotInfo:
        shard = self.node.placement.shard_for(op.key).id
        self._served_dir(shard)
        self._expire_snapshots()
        copy = await self.pool.snapshot(op.key, self.tmp)
        if copy is None:
            return wire.SnapshotInfo(False, "", 0, "", b"")
        path, size, digest = copy
        first = min(op.first, size)
        data = await trio.to_thread.run_sync(read_at, path, 0, first)
        if first >= size:
            os.unlink(path)
            return wire.SnapshotInfo(True, "", size, digest, data)
        snap_id = uuid.uuid4().hex
        self.snapshots[snap_id] = (path, size, time.monotonic() + SNAPSHOT_TTL_S)
        return wire.SnapshotInfo(True, snap_id, size, digest, data)

    async def _readchunk(self, op: wire.ReadChunk) -> wire.Chunk:
        entry = self.snapshots.get(op.id)
        if entry is None:
            raise NotFound(f"no snapshot {op.id!r} (expired or read to the end)")
        path, size, _ = entry
        length = max(0, min(op.length, CHUNK_BYTES, size - op.offset))
        data = await trio.to_thread.run_sync(read_at, path, op.offset, length)
        if op.offset + length >= size:
            del self.snapshots[op.id]
            os.unlink(path)
        return wire.Chunk(data)

    def _expire_snapshots(self) -> None:
        now = time.monotonic()
        for snap_id, (path, _, expiry) in list(self.snapshots.items()):
            if expiry < now:
                del self.snapshots[snap_id]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _fence(self, op: wire.Fence) -> wire.Fenced:
        directory = self._served_dir(op.shard)
        if op.shard in self.node.fences:
            raise BadRequest(f"{op.shard} is fenced already")
        fence = self.node.fences[op.shard] = ShardFence(op.shard)
        self.pool.pause_alarms(directory)
        try:
            if not await self.pool.quiesce(directory, QUIESCE_S):
                raise Unavailable(f"{op.shard}: requests in flight did not finish in {QUIESCE_S} s")
            directory_ = self.node.directory
            move, mod = await directory_.load_move(op.shard)
            if move is None or mod != op.move_mod:
                raise BadRequest(f"the move record of {op.shard} changed; not fencing")
            fenced = msgspec.structs.replace(move, phase="fenced", fenced_by=self.node.id)
            fence.move_mod = await directory_.put_move(fenced, mod)
            if not fence.move_mod:
                raise BadRequest(f"the move record of {op.shard} changed; not fencing")
        except BaseException:
            self.node.lift(op.shard)
            self.pool.resume_alarms(directory)
            raise
        self.nursery.start_soon(self._watch_fence, fence)
        log.info("%s fenced for its move", op.shard)
        return wire.Fenced(fence.move_mod)

    async def _watch_fence(self, fence: ShardFence) -> None:
        """Held requests time out after HOLD_MAX_S; the fence itself after FENCE_MAX_S."""
        await trio.sleep_until(fence.until)
        if self.node.fences.get(fence.shard) is fence:
            fence.release(False)  # the rest get `unavailable` at once (fence.hold)
        await trio.sleep_until(fence.started + FENCE_MAX_S)
        while self.node.fences.get(fence.shard) is fence:
            log.warning("%s: the move did not finish its cutover; giving up the fence", fence.shard)
            try:
                await self.give_up_fence(fence.shard)
            except DirectoryUnavailable as exc:
                log.error(
                    "%s: cannot reach the directory to give up the fence: %s", fence.shard, exc
                )
                await trio.sleep(1.0)

    async def give_up_fence(self, shard: str) -> bool:
        """Serve the shard here again, unless the move flipped it first. True if the
        fence was given up, False if the shard went to the move's target."""
        fence = self.node.fences.get(shard)
        if fence is None:
            return shard in self.node.served
        directory = self.node.directory
        move, mod = await directory.load_move(shard)
        if move is not None and move.phase == "fenced" and mod == fence.move_mod:
            unfenced = msgspec.structs.replace(move, phase="copy", fenced_by="")
            if await directory.put_move(unfenced, mod):
                self.node.lift(shard)
                self.pool.resume_alarms(shard_dir(self.data, shard))
                return True
        placement = await directory.load()  # the flip won (or the record went)
        if placement is not None:
            await self.node.adopt(placement)
        if shard in self.node.fences:  # still ours: the move was abandoned
            self.node.lift(shard)
            self.pool.resume_alarms(shard_dir(self.data, shard))
            return True
        return False

    async def _unfence(self, op: wire.Unfence) -> wire.Done:
        return wire.Done(int(await self.give_up_fence(op.shard)))

    async def _release(self, op: wire.Release) -> wire.Done:
        placement = await self.node.directory.load()
        if placement is not None:
            await self.node.adopt(placement)  # held requests forwarded, shard detached
        return wire.Done(int(op.shard not in self.node.served))

    async def detach(self, shard: str) -> None:
        """The shard is no longer ours: close its actors, then keep its directory aside
        (retired) for inspection; ``--retired-keep`` later deletes it."""
        directory = shard_dir(self.data, shard)
        # first let the requests the fence held go through to the new owner: closing
        # thousands of actors keeps this loop busy for a while
        await trio.sleep(DETACH_DELAY_S)
        if left := await self.pool.detach_shard(directory):
            # the new owner's copies were made through each actor (its file brought up
            # first), so this only keeps the retired log worth a look
            log.error(
                "%s: detached with actor files behind its log (an I/O error: %s); the "
                "retired directory keeps that log",
                shard,
                "syncing them failed" if EVERY_KEY in left else ", ".join(map(repr, left[:5])),
            )
        self.pool.resume_alarms(directory)
        await self._retire(shard)

    async def _retire(self, shard: str) -> None:
        directory = shard_dir(self.data, shard)
        if not os.path.isdir(directory):  # noqa: ASYNC240 (a stat)
            return
        retired = os.path.join(self.data, RETIRED_DIR)
        name = f"{shard}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"

        def retire() -> None:
            os.makedirs(retired, mode=0o700, exist_ok=True)
            os.rename(directory, os.path.join(retired, name))
            os.utime(os.path.join(retired, name))  # its grace period starts now
            sync_directory(os.path.dirname(directory))

        await trio.to_thread.run_sync(retire)
        log.info("%s: retired its files to %s", shard, os.path.join(retired, name))

    async def _splitshard(self, op: wire.SplitShard) -> wire.Done:
        from ._split import split

        return await split(self, op)

    async def prepare(self, placement: Any) -> None:
        from ._split import finish_splits

        await finish_splits(self, placement)
        if not self.strays_checked:
            self.strays_checked = True
            await self._retire_strays(placement)

    async def _retire_strays(self, placement: Any) -> None:
        """Once, on start: copies of shards another host owns, which no move is bringing
        here (a source that died before its release, a target whose move was aborted
        while it was down), are retired like any shard that left."""
        host = self.node.record.host
        coming = {m.shard for m in placement.moves.values() if m.target.rpartition("/")[0] == host}
        try:
            names = os.listdir(os.path.join(self.data, "shards"))
        except FileNotFoundError:
            return
        for name in names:
            shard = placement.shards.get(name)
            if shard is None or not shard.owner or name in coming:
                continue
            if shard.owner.rpartition("/")[0] == host:
                continue
            if self.node.record.id.endswith("/0"):  # one process of the host does it
                log.warning("%s belongs to %s: retiring the copy left here", name, shard.owner)
                await self._retire(name)

    # ------------------------------------------------------------------ target side

    async def _pullactors(self, op: wire.PullActors) -> wire.Pulled:
        if op.shard in self.node.served:
            raise BadRequest(f"{op.shard} is served by this process already")
        if op.shard in self.pulling:
            raise BadRequest(f"{op.shard} is being copied here already")
        directory = shard_dir(self.data, op.shard)
        self.pulling.add(op.shard)
        try:
            if op.fresh:
                await self._unready(op.shard)
                await trio.to_thread.run_sync(wipe_shard, directory, op.log_epoch)
            else:
                await trio.to_thread.run_sync(raise_log_epoch, directory, op.log_epoch)
            pulled = wire.Pulled(0, 0, 0, {})
            alarms: dict[str, float | None] = {}
            await self._pull_many(op.source, directory, op.keys, pulled, alarms)
            await trio.to_thread.run_sync(note_alarms, directory, alarms)
            return pulled
        finally:
            self.pulling.discard(op.shard)

    async def _pullchanges(self, op: wire.PullChanges) -> wire.Pulled:
        if op.shard in self.node.served or op.shard in self.pulling:
            raise BadRequest(f"{op.shard} is served or being copied here already")
        directory = shard_dir(self.data, op.shard)
        self.pulling.add(op.shard)
        try:
            written = await self._ask(op.source, wire.TakeWritten(op.shard))
            await trio.to_thread.run_sync(raise_log_epoch, directory, op.log_epoch)
            pulled = wire.Pulled(0, 0, 0, {})
            alarms: dict[str, float | None] = {}
            failed = await self._apply_parallel(directory, written.records, alarms)
            pulled.replayed = len(written.records) - len(failed)
            pulled.records = sum(map(len, written.records.values()))
            await self._pull_many(
                op.source, directory, sorted({*written.whole, *failed}), pulled, alarms
            )
            await trio.to_thread.run_sync(note_alarms, directory, alarms)
            if op.ready and op.shard not in self.ready:
                await self.pool.durability.attach_shard(directory)
                self.ready.add(op.shard)
            return pulled
        finally:
            self.pulling.discard(op.shard)

    async def _apply_parallel(
        self,
        directory: str,
        records: dict[str, list[tuple[int, bytes]]],
        alarms: dict[str, float | None],
    ) -> list[str]:
        """apply_records in PULL_PARALLEL worker threads (each file's sync overlaps)."""
        keys = sorted(records)
        groups = [keys[i::PULL_PARALLEL] for i in range(min(PULL_PARALLEL, len(keys)))]
        failed: list[str] = []

        async def one(group: list[str]) -> None:
            part = {k: records[k] for k in group}
            replay = functools.partial(apply_records, directory, part, self.pool.config, alarms)
            failed.extend(await trio.to_thread.run_sync(replay))

        async with trio.open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(one, group)
        return failed

    async def _pull_many(
        self,
        source: str,
        directory: str,
        keys: list[str],
        pulled: wire.Pulled,
        alarms: dict[str, float | None],
    ) -> None:
        """Copy ``keys`` from ``source``, ``PULL_PARALLEL`` at a time."""
        limiter = trio.CapacityLimiter(PULL_PARALLEL)

        async def one(key: str) -> None:
            async with limiter:
                await self._pull_one(source, directory, key, pulled, alarms)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    async def _pull_one(
        self,
        source: str,
        directory: str,
        key: str,
        pulled: wire.Pulled,
        alarms: dict[str, float | None],
    ) -> None:
        path = resolve_actor_path(directory, key)
        info = await self._ask(source, wire.Snapshot(key, FIRST_CHUNK_BYTES))
        if not info.exists:  # deleted since it was listed: so is its copy
            removed = await trio.to_thread.run_sync(remove_actor_files, path)
            pulled.removed += int(removed)
            alarms[key] = None
            return
        staged = path + ".pull"
        digest = hashlib.sha256(info.data)
        await trio.to_thread.run_sync(write_new, staged, info.data)
        offset = len(info.data)
        try:
            while offset < info.size:
                chunk = await self._ask(source, wire.ReadChunk(info.id, offset, CHUNK_BYTES))
                if not chunk.data:
                    raise Unavailable(f"the copy of {key!r} ended early at {offset} bytes")
                digest.update(chunk.data)
                await trio.to_thread.run_sync(append, staged, chunk.data)
                offset += len(chunk.data)
            if digest.hexdigest() != info.sha256:
                raise Unavailable(f"the copy of {key!r} does not match its checksum")
            problem, at = await trio.to_thread.run_sync(check_and_place, staged, path, key)
            if problem:
                raise Unavailable(f"the copy of {key!r} is damaged: {problem}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise
        alarms[key] = at
        pulled.copied += 1
        pulled.bytes += info.size
        pulled.checksums[key] = info.sha256

    async def _ask(self, address: str, op: Any) -> Any:
        waiter = ForwardWaiter()
        self.node.forwarder.forward(address, "", op, waiter, None, idempotency_key=None, epoch=0)
        return await waiter.wait(op)

    async def _adopt(self, op: wire.Adopt) -> wire.Done:
        placement = await self.node.directory.load()
        if placement is not None:
            await self.node.adopt(placement)
        return wire.Done(len(self.node.served))

    async def _dropcopy(self, op: wire.DropCopy) -> wire.Done:
        if op.shard in self.node.served or op.shard in self.pulling:
            raise BadRequest(f"{op.shard} is in use here; not deleting it")
        directory = shard_dir(self.data, op.shard)
        await self._unready(op.shard)
        existed = await trio.to_thread.run_sync(wipe_shard, directory, 0)
        return wire.Done(int(existed))

    async def _unready(self, shard: str) -> None:
        if shard in self.ready and shard not in self.node.served:
            self.ready.discard(shard)
            await self.pool.durability.detach_shard(shard_dir(self.data, shard))

    # ------------------------------------------------------------------ checks, restores

    async def _verifyshard(self, op: wire.VerifyShard) -> wire.Verified:
        directory = self._served_dir(op.shard)
        keys = op.keys
        if keys is None:
            keys = (await self._shardkeys(wire.ShardKeys(op.shard))).keys
        problems = {}
        for key in keys:
            problem = await self.pool.verify(key)
            if problem:
                problems[key] = problem
        log_problems = await trio.to_thread.run_sync(verify_log, directory)
        return wire.Verified(op.shard, len(keys), problems, log_problems)

    async def _upload(self, op: wire.Upload) -> wire.Done:
        path = self._upload_path(op.id)

        def write() -> int:
            if op.offset == 0:
                write_new(path, op.data)
            else:
                size = os.path.getsize(path)
                if size != op.offset:
                    raise BadRequest(f"upload {op.id}: at {size} bytes, not {op.offset}")
                append(path, op.data)
            return op.offset + len(op.data)

        try:
            return wire.Done(await trio.to_thread.run_sync(write))
        except FileNotFoundError:
            raise BadRequest(f"upload {op.id}: start it at offset 0") from None

    async def _restoreactor(self, op: wire.RestoreActor) -> wire.Done:
        where = self.node.route(op.key, None)
        if where is not None:
            raise BadRequest(f"actor {op.key!r} is not served by this process")
        path = self._upload_path(op.id)
        try:

            def check() -> str:
                if os.path.getsize(path) != op.size:
                    return f"{os.path.getsize(path)} bytes uploaded, {op.size} expected"
                if sha256_file(path) != op.sha256:
                    return "the upload does not match its sha256"
                return check_actor_file(path, op.key, quick=False)

            try:
                problem = await trio.to_thread.run_sync(check)
            except FileNotFoundError:
                raise BadRequest(f"no upload {op.id!r}") from None
            if problem:
                raise BadRequest(f"refusing to restore {op.key!r}: {problem}")
            await self.pool.restore(op.key, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return wire.Done(1)

    def _upload_path(self, upload_id: str) -> str:
        if not _ID.fullmatch(upload_id):
            raise BadRequest("an upload id is 1 to 64 letters, digits, '-' or '_'")
        return os.path.join(self.tmp, f"upload-{upload_id}.db")


__all__ = ["Admin"]
