"""``durability=log``: the shard log makes many keys' writes durable with one flush.

Per batch (on the event loop, inside the batch's transaction, before COMMIT): reserve an
LSN from the shard's log, read back the row images the batch changed (``RowCapture``),
write the LSN into the actor file's ``_shardlite_lsn`` row (not part of the record:
replay writes it) and append the images to the shard's log buffer as one record. After COMMIT the replies wait until the shard's flusher has
written and fdatasync'ed a round that covers that LSN: one flush per round for every
key of the shard. Reads wait for the LSN of the actor's last write.

A batch the capture cannot describe (a schema change, ``PRAGMA user_version``, a huge
transaction) is *unlogged*: it is made durable in the actor's own file (fdatasync of its
WAL) before its replies leave and before the actor runs anything else.

The log is trimmed once the actor files it covers are durable themselves: a
checkpointer per shard fsyncs the WALs of actors with logged writes (spread over time),
closes and checkpoints do it anyway, and then whole segments below the oldest LSN not
yet durable in its file are deleted (the checkpointer: _logcheckpoint.py).

Recovery runs while the shard serves (_logrecovery.py): attaching a shard only reads
its log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import apsw
import trio
import trio.lowlevel

from ._actor import Actor, Call, deliver, sync_directory
from ._config import ActorConfig
from ._errors import ActorDamaged, Error, Internal, Unavailable
from ._keys import shard_of_path
from ._logcheckpoint import LogCheckpointMixin
from ._logrecovery import EVERY_KEY, LogRecoveryMixin, queued
from ._ops import Result
from ._recovery import HAVE_SYNCFS
from ._shardlog import LOG_DIR, LogCorrupt, Record, ShardLog, encode_record, read_log_epoch

log = logging.getLogger("shardlite.actor")

SHIP_MAX_BYTES = 64 << 20
"""Records kept for a shard being moved before its written keys are copied whole instead."""
SPARE_RETRY_S = 1.0
"""After a failed zero-fill of the next log segment (init_zero), wait this long."""


def sync_wal(actor: Actor) -> None:
    """fdatasync the actor's WAL with a descriptor of our own, opened and closed here (with
    locking_mode=EXCLUSIVE SQLite holds no lock on the WAL that closing it could drop).
    Raises FileNotFoundError if the WAL is gone: the file was checkpointed and closed."""
    fd = os.open(actor.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if actor.dir_sync_needed:  # the WAL was created since the actor was opened
        sync_directory(os.path.dirname(actor.path))
        actor.dir_sync_needed = False


class _Shard:
    """The log of one shard and who waits on it."""

    def __init__(self, directory: str, shard_log: ShardLog) -> None:
        self.directory = directory
        self.log = shard_log
        self.buffer: list[bytes] = []
        self.buffered_lsn = 0
        self.flushed_lsn = 0
        self.waiting: set[Actor] = set()
        self.unsynced: dict[Actor, int] = {}  # actor -> its oldest LSN not durable in its file
        self.wake = trio.Event()
        self.spare_wanted = trio.Event()
        self.scope = trio.CancelScope()  # its flusher and checkpointer
        self.limiter = trio.CapacityLimiter(1)
        self.rounds = 0
        self.bytes = 0
        self.file_commits_since_syncfs = 0
        """Actor-file commits since the last syncfs: each writes the pages it changed to
        its WAL, write-back the next syncfs flushes. One per logged write with
        log_batches_per_commit 1; with more, one per file commit (every N batches, a
        close, an exclusive call), while the batches in between stay in SQLite's cache."""
        self.trimmed_segments = 0
        self.failures = 0
        self.syncfs_calls = 0
        self.shipping: dict[str, list[tuple[int, bytes]] | None] | None = None
        """While the shard is being moved: each key's records since tracking began (None:
        a change no record describes; the key must be copied whole)."""
        self.shipping_bytes = 0
        self.to_replay: dict[str, list[Record]] = {}
        """Keys the log held records of when the shard was attached whose files have not
        been brought up to them yet (the background recovery's queue)."""
        self.replaying: dict[str, trio.Event] = {}
        """Keys being brought up to the log now; each event is set when that is over."""
        self.replay_floor: int | None = None
        """While recovery runs: its oldest record, below which the log is not trimmed."""
        self.recovered = trio.Event()
        """Set once every file holds, durably, what the log held when it was attached."""
        self.unapplied: dict[str, int] = {}
        """Keys closed with batches their files lack (their transaction could not be put
        back, _filetxn.py): the oldest such LSN. The log is kept from there, and the key
        is not opened again until a restart's recovery applies them."""


class LogDurability(LogCheckpointMixin, LogRecoveryMixin):
    """The shard-log durability policy. Shards must be attached before they serve."""

    mode = "log"

    def __init__(self, config: ActorConfig, sync: Callable[[Actor], None] = sync_wal) -> None:
        self.config = config
        self._sync = sync  # the fault-injection seam of the power-cut tests
        self._syncfs_mode = sync is sync_wal and HAVE_SYNCFS
        self.shards: dict[str, _Shard] = {}
        self.on_released: Callable[[Actor], None] = lambda actor: None
        self._nursery: trio.Nursery | None = None
        self.recovered_records = 0
        self.log_read_s = 0.0  # reading the logs of attached shards (their records)
        self.recovered_actors = 0
        self.damaged_actors = 0  # found by recovery, marked now or before
        self.file_commit_failures = 0
        self.reapplied_batches = 0
        self.recovered_alarms: dict[str, dict[str, float | None]] = {}
        """Per shard: the next alarm of every file recovery opened (for the alarm index)."""
        self.on_recovered_alarms: Callable[[str], None] = lambda directory: None
        """Called on the loop when recovery added to ``recovered_alarms[directory]``."""
        self.before_trim: Callable[[str], None] | None = None
        """Blocking, before the log of a shard is trimmed (the alarm index's sync)."""
        self._appended: tuple[Actor, int, int, int, bool] | None = None
        """What the last before_commit changed: (actor, its LSN, the actor's last LSN and
        the shard's buffered LSN before it, whether it made the actor unsynced)."""
        self.observe_flush: Callable[[float], None] | None = None
        """Given each flush round's seconds, from its start until its records are durable
        (the shard server's histogram)."""

    # ------------------------------------------------------------------ shards

    async def attach_shard(self, directory: str) -> None:
        """Open the shard's log and start its flusher, checkpointer and recovery: the
        files of the keys it holds records of are brought up to them while it serves."""
        if directory in self.shards:
            return
        shard_log = ShardLog(
            os.path.join(directory, LOG_DIR),
            self.config.log_segment_bytes,
            init_zero=self.config.log_init_zero,
        )
        began = time.perf_counter()
        recovered = await trio.to_thread.run_sync(shard_log.open)
        self.log_read_s += time.perf_counter() - began
        self.recovered_records += recovered.count
        for torn in recovered.torn_segments:
            log.info(
                "shard log %s: records end at byte %d with an incomplete record (a crash "
                "during a write, never acknowledged); %d bytes after it ignored",
                torn.path,
                torn.offset,
                torn.ignored_bytes,
            )
        shard = _Shard(directory, shard_log)
        shard.flushed_lsn = shard.buffered_lsn = shard_log.next_lsn() - 1
        shard.to_replay = recovered.records
        if recovered.records:
            shard.replay_floor = min(r[0].lsn for r in recovered.records.values())
            log.info(
                "shard %s: %d log records of %d keys; their files are brought up to them "
                "while the shard serves",
                directory,
                recovered.count,
                len(recovered.records),
            )
        else:
            shard.recovered.set()
        self.shards[directory] = shard
        assert self._nursery is not None, "run() must be started before attach_shard()"
        self._nursery.start_soon(self._run_shard, shard)

    async def _run_shard(self, shard: _Shard) -> None:
        with shard.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_flusher, shard)
                nursery.start_soon(self._run_checkpointer, shard)
                nursery.start_soon(self._run_spare_maker, shard)
                nursery.start_soon(self._run_recovery, shard)

    async def detach_shard(self, directory: str) -> list[str]:
        """The shard no longer serves here and every actor of it is closed (so its files
        hold all its writes): stop its flusher and checkpointer, close its log. Returns
        the keys whose files may still lack, or hold only in the page cache, records the
        log holds (``EVERY_KEY``: any of them): an I/O error kept them from being written
        or synced. The log is kept, so the shard's next attach brings them up; a split
        must not carry such a shard's files away from it."""
        shard = self.shards.pop(directory, None)
        if shard is None:
            return []
        if shard.buffer or shard.waiting:
            log.error("shard %s detached with %d records unflushed", directory, len(shard.buffer))
        with trio.CancelScope(shield=True):
            try:
                # its files must hold its log; a key they cannot goes in shard.unapplied
                left = await self._recover(shard, retry=False)
                left += shard.unapplied  # and those closed with batches their files lack
                try:
                    await self.sync_closed_files(shard)
                except OSError as exc:
                    log.error("shard %s: syncing the closed files failed: %s", directory, exc)
                    left.append(EVERY_KEY)
                async with shard.limiter:  # not while the flusher writes
                    shard.scope.cancel()
                    shard.log.close()
            finally:
                shard.recovered.set()  # no waiter stays on a shard no longer here
        return list(dict.fromkeys(left))

    def log_epoch(self, directory: str) -> int:
        shard = self.shards.get(directory)
        return shard.log.epoch if shard is not None else read_log_epoch(directory)

    def shard_of(self, actor: Actor) -> _Shard:
        shard: _Shard | None = actor.log_shard
        if shard is None:  # once per open actor: a shard stays attached while it has any
            directory = shard_of_path(actor.path)
            shard = self.shards.get(directory)
            if shard is None:
                raise Internal(f"shard {directory} is not attached to this server")
            actor.log_shard = shard
        return shard

    # ------------------------------------------------------------------ the actor's seam

    def creation_lsn(self, actor: Actor) -> int:
        """The LSN a new actor file starts at: above every record of an earlier actor
        with the same key (which a delete left in the log)."""
        return self.shard_of(actor).log.reserve()

    def opened(self, actor: Actor) -> None:
        shard = self.shard_of(actor)
        if shard.replay_floor is not None and queued(shard, actor.key):
            actor.close()  # the pool awaits replay_actor first: this is a safety net
            raise Unavailable(f"actor {actor.key!r} is being recovered from the shard log; retry")
        if actor.key in shard.unapplied:
            actor.close()
            raise ActorDamaged(
                f"actor {actor.key!r} is not served: writes the shard log holds could not be "
                "put in its file; restart the server (its recovery applies them)"
            )
        actor.start_capture()
        actor.committed_lsn = actor.last_lsn
        actor.defer_commits = self.config.log_batches_per_commit > 1

    def unapplied(self, actor: Actor) -> None:
        """The actor closes with batches its file lacks (:mod:`._filetxn`)."""
        shard = self.shard_of(actor)
        first = actor.txn_records[0][0] if actor.txn_records else actor.committed_lsn + 1
        shard.unapplied.setdefault(actor.key, first)
        log.error(
            "actor %r closed with %d batches its file lacks (from LSN %#x); the shard log "
            "keeps them, and the key is served again after a restart",
            actor.key,
            len(actor.txn_records),
            first,
        )

    def before_commit(self, actor: Actor) -> None:
        """Inside the transaction: give the batch an LSN and its record."""
        capture = actor.capture
        assert capture is not None
        if capture.empty and not actor.schema_changed:
            return  # nothing written
        shard = self.shard_of(actor)
        lsn = shard.log.reserve()
        if lsn <= actor.last_lsn:  # the file is ahead of this log: see _behind_the_file
            lsn = self._behind_the_file(shard, actor)
        record = None if actor.schema_changed else actor.take_record()
        if record is None or not actor.defer_commits:
            actor.write_lsn(lsn)  # not captured: replay writes the LSN of the last record
        else:
            actor.txn_records.append((lsn, record))  # the file's commit writes the LSN
        prev = actor.last_lsn  # what the file holds before this batch: the record names it
        self._appended = (
            actor,
            lsn,
            prev,
            shard.buffered_lsn,
            actor not in shard.unsynced,
        )
        actor.last_lsn = lsn
        if record is None:
            capture.reset()
            actor.needs_file_sync = True
            if shard.shipping is not None:
                shard.shipping[actor.key] = None
            return
        shard.buffer.append(encode_record(lsn, actor.key, record, prev=prev))
        shard.buffered_lsn = lsn
        if not actor.defer_commits:  # it commits its file now (else: file_committed)
            shard.file_commits_since_syncfs += 1
        if shard.shipping is not None:
            self._ship(shard, actor.key, lsn, record)
        shard.unsynced.setdefault(actor, lsn)
        shard.wake.set()

    @staticmethod
    def _behind_the_file(shard: _Shard, actor: Actor) -> int:
        """An actor file holds an LSN this shard's log has not given out yet: the log
        directory was lost or replaced since the file was written. A record below the
        file's LSN would be skipped by recovery and its reply released as if the file
        held it, so the log's LSNs jump past the file's first."""
        try:
            epoch = shard.log.advance_epoch(actor.last_lsn)
        except (OSError, LogCorrupt) as exc:  # the batch fails (rolled back), nothing else
            raise apsw.IOError(f"shard log {shard.directory}: {exc}") from exc
        log.error(
            "shard log %s is behind actor %r (its file holds LSN %#x): the log directory was "
            "lost or replaced, and writes only the old log held are gone (restore the shard "
            "from a backup if it was not shut down cleanly); its LSNs now start at epoch %d",
            shard.directory,
            actor.key,
            actor.last_lsn,
            epoch,
        )
        return shard.log.reserve()

    def commit_failed(self, actor: Actor) -> None:
        """Take back the record :meth:`before_commit` buffered: recovery would apply a
        write the client was told had failed. It is still the buffer's last (COMMIT
        follows at once, and the flusher takes the buffer only between batches)."""
        appended, self._appended = self._appended, None
        shard = actor.log_shard
        if appended is None or appended[0] is not actor or shard is None:
            return
        _, lsn, last_lsn, buffered_lsn, new_unsynced = appended
        actor.last_lsn = last_lsn  # its replies (errors) wait for nothing of it
        actor.take_back_record(lsn)
        if shard.shipping is not None:
            shard.shipping[actor.key] = None  # copied whole instead
        if shard.buffer and shard.buffered_lsn == lsn:
            shard.buffer.pop()
            shard.buffered_lsn = buffered_lsn
            if not actor.defer_commits:
                shard.file_commits_since_syncfs -= 1
            if new_unsynced:
                shard.unsynced.pop(actor, None)

    def committed(
        self, actor: Actor, calls: list[Call], results: list[Result | Error], wrote: bool
    ) -> None:
        shard = self.shard_of(actor)
        if actor.needs_file_sync:
            # not in the log: only the file's own sync (the pool runs it before the actor
            # runs again) may release these, never a log flush of later records
            actor.pending.append((actor.last_lsn, calls, results, False))
            return
        if actor.last_lsn <= max(shard.flushed_lsn, actor.file_lsn):
            deliver(calls, results)
            return
        actor.pending.append((actor.last_lsn, calls, results, True))
        shard.waiting.add(actor)

    def file_committed(self, actor: Actor) -> None:
        shard = actor.log_shard
        if shard is not None:
            shard.file_commits_since_syncfs += 1

    def file_commit_failed(self, actor: Actor) -> None:
        self.file_commit_failures += 1

    def reapplied(self, actor: Actor, batches: int) -> None:
        self.reapplied_batches += batches

    def rolled_back(self, actor: Actor) -> None:
        """The transaction whose record was being built is gone: forget its keys."""
        if actor.capture is not None:
            actor.capture.reset()
        shard = actor.log_shard
        if shard is not None and shard.shipping is not None:
            shard.shipping[actor.key] = None  # a record may have been taken: copy it whole

    # ------------------------------------------------------------------ shipping (moves)

    def ship_records(self, directory: str, on: bool) -> None:
        """Start (anew) or stop keeping the records of the shard's commits for a move."""
        shard = self.shards.get(directory)
        if shard is not None:
            shard.shipping = {} if on else None
            shard.shipping_bytes = 0

    def replaced(self, actor: Actor) -> None:
        """The actor's file was deleted or replaced whole: no record describes that."""
        shard = self.shards.get(shard_of_path(actor.path))
        if shard is not None and shard.shipping is not None:
            shard.shipping[actor.key] = None

    def take_records(
        self, directory: str, keys: list[str]
    ) -> tuple[dict[str, list[tuple[int, bytes]]], list[str]]:
        """For ``keys`` written since the last take: the records that replay their
        changes, and the keys that must be copied whole instead."""
        shard = self.shards.get(directory)
        shipping = shard.shipping if shard is not None else None
        if shard is None or shipping is None:
            return {}, keys
        records: dict[str, list[tuple[int, bytes]]] = {}
        whole = []
        for key in keys:
            kept = shipping.pop(key, None)
            if kept:
                records[key] = kept
            else:
                whole.append(key)
        shard.shipping_bytes = sum(len(p) for v in shipping.values() if v for _, p in v)
        return records, whole

    def _ship(self, shard: _Shard, key: str, lsn: int, record: bytes) -> None:
        shipping = shard.shipping
        assert shipping is not None
        if key in shipping and shipping[key] is None:
            return  # copied whole anyway
        if shard.shipping_bytes + len(record) > SHIP_MAX_BYTES:
            for k in shipping:
                shipping[k] = None  # too much to keep: the keys are copied whole
            shipping[key] = None
            shard.shipping_bytes = 0
            return
        shipping.setdefault(key, []).append((lsn, record))  # type: ignore[union-attr]
        shard.shipping_bytes += len(record)

    def file_durable(self, actor: Actor, lsn: int) -> None:
        """The actor's file holds everything up to ``lsn`` durably (sync, checkpoint,
        close): release what waited on it and let the log be trimmed past it."""
        shard = actor.log_shard
        if shard is None or self.shards.get(shard.directory) is not shard:
            shard = self.shards.get(shard_of_path(actor.path))
        self._file_durable(shard, actor, lsn)
        if shard is not None:
            self._release(actor, shard.flushed_lsn)

    def _file_durable(self, shard: _Shard | None, actor: Actor, lsn: int) -> None:
        actor.file_lsn = max(actor.file_lsn, lsn)
        if lsn >= actor.last_lsn:
            # not for a sync that started before the actor's unlogged batch committed (a
            # checkpointer pass): that batch's own sync must still run before the actor
            # runs again, or its next record would name a write neither the file (after
            # a crash) nor the log holds
            actor.needs_file_sync = False
        if shard is not None and shard.unsynced.get(actor, lsn + 1) <= lsn:
            if actor.last_lsn <= lsn:
                del shard.unsynced[actor]
            else:
                shard.unsynced[actor] = lsn + 1

    def forget(self, actor: Actor) -> None:
        """The actor left memory (closed or deleted) with nothing pending. One closed
        without a sync (Actor.close_quick) stays among the shard's unsynced files: the
        log keeps its records until the checkpointer has synced its file."""
        for shard in self.shards.values():
            if not actor.closed_unsynced:
                shard.unsynced.pop(actor, None)
            shard.waiting.discard(actor)

    # ------------------------------------------------------------------ background work

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _run_flusher(self, shard: _Shard) -> None:
        while True:
            await shard.wake.wait()
            shard.wake = trio.Event()
            while shard.buffer:
                data = b"".join(shard.buffer)
                last = shard.buffered_lsn
                shard.buffer.clear()
                started = trio.current_time()
                try:
                    await trio.to_thread.run_sync(
                        shard.log.write, data, last, limiter=shard.limiter
                    )
                except OSError as exc:
                    self._write_failed(shard, last, exc)
                    continue
                if self.observe_flush is not None:
                    self.observe_flush(trio.current_time() - started)
                shard.rounds += 1
                shard.bytes += len(data)
                shard.flushed_lsn = last
                for actor in list(shard.waiting):
                    self._release(actor, last)
                if shard.log.wants_spare():
                    shard.spare_wanted.set()

    async def _run_spare_maker(self, shard: _Shard) -> None:
        """Zero-fill the log's next segment while the active one fills (init_zero), in a
        thread beside the flusher's, so that switching to it costs the flusher only the
        write of its header."""
        while True:
            await shard.spare_wanted.wait()
            shard.spare_wanted = trio.Event()
            if not shard.log.wants_spare():
                continue
            try:
                await trio.to_thread.run_sync(shard.log.prepare_spare)
            except OSError as exc:
                # not fatal: the next segment is then a new file that records are
                # appended to (each flush also commits its growth)
                log.warning(
                    "shard log %s: cannot prepare the next segment (%s); retrying in %.0f s",
                    shard.directory,
                    exc,
                    SPARE_RETRY_S,
                )
                await trio.sleep(SPARE_RETRY_S)

    def _release(self, actor: Actor, flushed: int) -> None:
        """Deliver, in order, every pending batch that is durable: in the actor's own
        file, or (logged batches only) in the log up to ``flushed``."""
        pending = actor.pending
        file_lsn = actor.file_lsn
        while pending:
            lsn, calls, results, logged = pending[0]
            if not (lsn <= file_lsn or (logged and lsn <= flushed)):
                break
            pending.popleft()
            deliver(calls, results)
        if not pending:
            for shard in self.shards.values():
                shard.waiting.discard(actor)
            self.on_released(actor)

    def _write_failed(self, shard: _Shard, last: int, exc: OSError) -> None:
        # The records may or may not be on disk (fsyncgate): fail their replies, reset
        # their actors (the close syncs their files, which hold the writes) and go on in
        # a new segment. The batches those actors committed since, whose records wait
        # in the buffer, build on the failed ones: their replies fail too, and their
        # records are dropped. Every record in the log then follows one that is in the
        # log or durable in its file (its ``prev``), which recovery checks.
        shard.failures += 1
        log.error(
            "shard log %s: write failed (%s); failing the replies it held", shard.directory, exc
        )
        err = Internal(f"the write could not be made durable ({exc}); it may or may not be applied")
        for actor in list(shard.waiting):
            while actor.pending:
                for call in actor.pending.popleft()[1]:
                    call.sink.deliver(call.tag, err)
            actor.broken = True
            self._release(actor, 0)
        # every record in the buffer is of an actor that was waiting (its reply waits on
        # the log) or whose file already holds it durably
        shard.buffer.clear()
        try:
            shard.log.start_segment()
        except OSError:
            log.exception("shard log %s: cannot start a new segment", shard.directory)

    def sync_file(self, actor: Actor) -> None:
        """Make the actor's file durable up to its last commit. Blocking: worker thread."""
        self._sync(actor)

    def statistics(self) -> dict[str, Any]:
        shards = list(self.shards.values())
        return {
            "mode": "log",
            "rounds": sum(s.rounds for s in shards),
            "log_bytes_written": sum(s.bytes for s in shards),
            "trimmed_segments": sum(s.trimmed_segments for s in shards),
            "zero_filled_segments": sum(s.log.spares_used for s in shards),
            "syncfs_calls": sum(s.syncfs_calls for s in shards),
            "failures": sum(s.failures for s in shards),
            "unsynced_actors": sum(len(s.unsynced) for s in shards),
            "log_bytes": sum(s.log.size_bytes() for s in shards),
            "recovered_records": self.recovered_records,
            "log_read_s": self.log_read_s,
            "recovered_actors": self.recovered_actors,
            "recovering_actors": sum(len(s.to_replay) + len(s.replaying) for s in shards),
            "damaged_actors": self.damaged_actors,
            "file_commit_failures": self.file_commit_failures,
            "reapplied_batches": self.reapplied_batches,
        }


__all__ = ["LogDurability", "sync_wal"]
