"""The shard log's checkpointer: make actor files durable, then trim the log below them.

A mixin of :class:`~shardlite.actor._logdurability.LogDurability`. Per shard, a task
(``_run_checkpointer``) decides when a pass is due; a pass (``checkpoint_shard``) commits
the files' open transactions (``--log-batches-per-commit``), makes every actor file with
logged writes durable (one ``syncfs(2)`` for many files, else fdatasyncs in chunks spread
over time), records each file's durable LSN in slices with the loop free between them,
and trims whole segments below the oldest LSN not yet durable in its file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import apsw
import trio
import trio.lowlevel

from ._actor import Actor, State
from ._config import ActorConfig
from ._recovery import syncfs

if TYPE_CHECKING:
    from ._logdurability import _Shard

log = logging.getLogger("shardlite.actor")

CHECKPOINT_POLL_S = 0.25
COMMIT_SLICE = 100
"""Actor files the checkpointer commits (log_batches_per_commit) between two yields."""
DURABLE_SLICE = 1000
"""Files whose syncfs bookkeeping runs between two yields to the loop."""
SYNCFS_MIN = 16
"""From this many actor files to sync, the checkpointer calls syncfs(2) once instead."""
SYNCFS_EVERY_S = 2.0
SYNCFS_EVERY_COMMITS = 1024
"""With many files to sync and at least SYNCFS_EVERY_COMMITS actor-file commits since the
last syncfs (each a few WAL frames to write back, so about 8 MiB of 4 KiB pages), the
checkpointer runs (one syncfs) at least every SYNCFS_EVERY_S."""
SYNCFS_SOONEST_S = 0.5
SYNCFS_WRITES_PER_FILE = 4
SYNCFS_MIN_WRITES = 4096
"""A syncfs is due sooner, from SYNCFS_SOONEST_S on, once the actor-file commits since
the last one reach SYNCFS_WRITES_PER_FILE per file it would cover (and SYNCFS_MIN_WRITES).
With log_batches_per_commit 1 every logged write is a commit."""
SYNC_CHUNK = 64
"""Actor files fsynced per worker-thread call by the checkpointer, between yields."""


class LogCheckpointMixin:
    """The checkpointer of :class:`~shardlite.actor._logdurability.LogDurability`."""

    # owned by LogDurability
    config: ActorConfig
    shards: dict[str, _Shard]
    before_trim: Callable[[str], None] | None
    _syncfs_mode: bool
    _sync: Callable[[Actor], None]

    # its own methods this uses
    file_durable: Callable[[Actor, int], None]
    _file_durable: Callable[[_Shard, Actor, int], None]
    _release: Callable[[Actor, int], None]
    file_commit_failed: Callable[[Actor], None]

    async def _run_checkpointer(self, shard: _Shard) -> None:
        """Keep the log bounded: make actor files durable, then trim what they cover.

        A full pass (every ``--log-checkpoint-interval``, or once the log reaches
        ``--log-trim-bytes``) also commits the batches files hold in open transactions.
        A pass run sooner because commits pile up in the page cache (below) only syncs
        what the files have committed: committing every file's open transaction then
        would add the very write-back burst that running sooner is there to avoid.
        """
        poll = min(CHECKPOINT_POLL_S, self.config.log_checkpoint_interval_s / 2)
        last = last_full = trio.current_time()
        while True:
            await trio.sleep(poll)
            now = trio.current_time()
            since = now - last
            full = (
                now - last_full >= self.config.log_checkpoint_interval_s
                or shard.log.size_bytes() >= self.config.log_trim_bytes
            )
            due = False
            if self._syncfs_mode and len(shard.unsynced) >= SYNCFS_MIN:
                # often while files commit: a syncfs's write-back is one burst that the
                # log's own flushes queue behind (30 s of one-write commits at once held
                # them for 100s of ms; 2 s of them at 1,000 keys, 5-25 ms). Sooner when the
                # commits per file it would cover pile up (each is WAL frames to write
                # back); not sooner when they are few per file, since its bookkeeping on
                # the loop is per file. Batches held in files' open transactions
                # (--log-batches-per-commit) are in no page cache yet: they wait for the
                # interval or the log's size, and then commit once per file.
                commits = shard.file_commits_since_syncfs
                many = max(SYNCFS_MIN_WRITES, SYNCFS_WRITES_PER_FILE * len(shard.unsynced))
                due = (since >= SYNCFS_EVERY_S and commits >= SYNCFS_EVERY_COMMITS) or (
                    since >= SYNCFS_SOONEST_S and commits >= many
                )
            if not full and not due:
                continue
            last = trio.current_time()
            if full:
                last_full = last
            await self.checkpoint_shard(shard, commit_open=full)

    async def checkpoint_shard(self, shard: _Shard, *, commit_open: bool = True) -> None:
        """fsync every actor file with logged writes, then trim the log below them.
        ``commit_open``: commit the files' open transactions first (else a file is made
        durable up to its last commit, and its later batches stay in the log)."""
        # open and not in a worker thread, or closed without a sync (Actor.close_quick)
        targets = [a for a in shard.unsynced if a.state is State.OPEN or a.conn is None]
        if self.config.log_batches_per_commit > 1 and commit_open:
            await self._commit_files(targets)
        if len(targets) >= SYNCFS_MIN and self._syncfs_mode:
            # one syncfs instead of thousands of fdatasyncs: the disk does 1.5-3k flushes
            # a second, and the log's own flush must get most of them
            # LSNs in a list of their own: a tuple per file would be thousands of objects
            # that outlive the syncfs into the collector's oldest generation, and bring
            # its full passes (100s of ms with 10,000 actors open) on every few seconds
            lsns = [a.file_lsn_held for a in targets]
            shard.file_commits_since_syncfs = 0
            started = trio.current_time()
            try:
                await trio.to_thread.run_sync(syncfs, shard.directory)
            except OSError as exc:  # nothing is known durable: keep the log, try again later
                log.error("shard %s: syncfs failed: %s", shard.directory, exc)
                return
            await self._files_durable(shard, targets, lsns)
            shard.syncfs_calls += 1
            await trio.sleep(trio.current_time() - started)
            targets = []
        for i in range(0, len(targets), SYNC_CHUNK):
            chunk = [(a, a.file_lsn_held) for a in targets[i : i + SYNC_CHUNK]]
            started = trio.current_time()
            done = await trio.to_thread.run_sync(self._sync_many, chunk)
            for actor, lsn in done:
                self.file_durable(actor, lsn)
            # spread out: as long a pause as the chunk took, so the checkpointer takes at
            # most half of the disk's flushes and the log's own flush is never starved
            await trio.sleep(trio.current_time() - started)
        below = min(shard.unsynced.values(), default=shard.log.next_lsn())
        below = min(below, *shard.unapplied.values()) if shard.unapplied else below
        if shard.replay_floor is not None:  # recovery is not over (_logrecovery.py)
            below = min(below, shard.replay_floor)
        below = min(below, shard.flushed_lsn + 1)
        if self.before_trim is not None:
            # every record below `below` was committed before now, and its alarm change
            # noted in the index inline: sync the index, then drop those records
            await trio.to_thread.run_sync(self.before_trim, shard.directory)
        shard.trimmed_segments += await trio.to_thread.run_sync(shard.log.trim, below)

    async def _commit_files(self, targets: list[Actor]) -> None:
        """Commit the open transactions of ``targets`` (:mod:`._filetxn`), inline, in
        slices: the syncfs that follows then covers their batches."""
        for n, actor in enumerate(targets):
            if n % COMMIT_SLICE == COMMIT_SLICE - 1:
                await trio.lowlevel.checkpoint()
            if actor.txn_open and actor.conn is not None and not actor.busy:
                try:
                    actor.commit_file()
                except apsw.Error as exc:  # kept: the next pass, or the close, tries again
                    log.warning("actor %r: file commit failed: %s", actor.key, exc)
                    self.file_commit_failed(actor)

    async def _files_durable(self, shard: _Shard, targets: list[Actor], lsns: list[int]) -> None:
        """:meth:`file_durable` for every file a syncfs covered, in slices between which
        the loop runs others: with 10,000 files, one pass is 10s of ms of bookkeeping.
        An actor with nothing pending is not handed to :meth:`_release` (nothing to
        deliver, no one waiting on it)."""
        for start in range(0, len(targets), DURABLE_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
                if self.shards.get(shard.directory) is not shard:
                    return  # detached meanwhile: nothing of it to release here
            for actor, lsn in zip(
                targets[start : start + DURABLE_SLICE],
                lsns[start : start + DURABLE_SLICE],
                strict=True,
            ):
                actor.dir_sync_needed = False  # syncfs writes the directories too
                self._file_durable(shard, actor, lsn)
                if actor.pending:
                    self._release(actor, shard.flushed_lsn)

    async def sync_closed_files(self, shard: _Shard) -> None:
        """Sync the files closed without a sync (Actor.close_quick): before the shard's
        log is closed, their writes must stop depending on it (a move deletes it)."""
        closed = [(a, a.last_lsn) for a in shard.unsynced if a.conn is None]
        if len(closed) >= SYNCFS_MIN and self._syncfs_mode:
            await trio.to_thread.run_sync(syncfs, shard.directory)
        elif closed:
            await trio.to_thread.run_sync(self._sync_many, closed)

    def _sync_many(self, targets: list[tuple[Actor, int]]) -> list[tuple[Actor, int]]:
        done = []
        for actor, lsn in targets:
            # no WAL: a close checkpointed and synced the file meanwhile (or it was
            # deleted, and its records no longer apply to any file)
            with contextlib.suppress(FileNotFoundError):
                self._sync(actor)
            done.append((actor, lsn))
        return done
