"""Durability policies: when a committed batch's replies may leave (the output gate).

The actor commits every batch inline with ``synchronous=NORMAL`` and hands the batch's
replies to its policy through :meth:`DurabilityPolicy.committed`; this is the seam where
the shard log (``durability=log``) plugs in.

* :class:`OsDurability` releases them at once: the WAL write is in the OS page cache, so
  the write survives a crash of the process, not a power cut.
* :class:`FsyncDurability` releases them after an ``fdatasync`` of the actor's WAL file,
  run in a worker thread by one flusher task. The actor goes on running its next batches
  meanwhile; their replies wait for the next round (Durable Objects' input/output gates).
  Reads wait too when they follow an unsynced write, so no reply ever reveals data that
  a power cut could still take back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ._actor import Actor, Call, deliver, sync_directory
from ._config import ActorConfig, Durability
from ._errors import Error, Internal
from ._logdurability import LogDurability
from ._ops import Result
from ._recovery import drain_shard_log
from ._shardlog import read_log_epoch

log = logging.getLogger("shardlite.actor")

SyncFn = Callable[[Actor], None]


class DurabilityPolicy(Protocol):
    """What the actor and the pool ask of a durability mode (the seam of the shard log)."""

    on_released: Callable[[Actor], None]
    recovered_alarms: dict[str, dict[str, float | None]]
    """Per shard attached: next alarm times recovery found in the files it opened."""
    on_recovered_alarms: Callable[[str], None]
    """Called when recovery added to ``recovered_alarms`` after the shard was attached."""

    async def attach_shard(self, directory: str) -> None:
        """Before a shard serves: read its log (or, os/fsync, apply what it holds)."""

    def needs_replay(self, actor: Actor) -> bool:
        """Whether the actor's file lacks records its shard's log held at attach."""

    async def replay_actor(self, actor: Actor) -> None:
        """Bring the actor's file up to its shard's log, before it is opened."""

    async def wait_recovered(self, directory: str | None = None) -> None:
        """Until the shard's files (every shard's) hold what its log held at attach."""

    async def detach_shard(self, directory: str) -> list[str]:
        """The shard stopped serving here; every actor of it is closed. Returns the keys
        whose files may lack writes only the shard's log holds (an I/O error)."""

    def log_epoch(self, directory: str) -> int:
        """The shard log's epoch (0: none): a copy of the shard starts its log above it."""

    def ship_records(self, directory: str, on: bool) -> None:
        """Keep (or stop keeping) the records of the shard's commits, for a move."""

    def take_records(
        self, directory: str, keys: list[str]
    ) -> tuple[dict[str, list[tuple[int, bytes]]], list[str]]:
        """The kept records of ``keys``, and the keys that must be copied whole."""

    def replaced(self, actor: Actor) -> None:
        """The actor's file was deleted or replaced whole (its records no longer apply)."""

    def creation_lsn(self, actor: Actor) -> int:
        """The log position a new actor file starts at."""

    def opened(self, actor: Actor) -> None:
        """The actor's file was opened (in whichever thread opened it)."""

    def before_commit(self, actor: Actor) -> None:
        """Inside the batch's transaction, just before COMMIT."""

    def commit_failed(self, actor: Actor) -> None:
        """COMMIT failed after :meth:`before_commit` (a full disk, an I/O error): the
        transaction is not in the file, and the client is told so."""

    def rolled_back(self, actor: Actor) -> None:
        """The open transaction was rolled back."""

    def file_committed(self, actor: Actor) -> None:
        """The file committed the batches it held for the log (durability=log with
        log_batches_per_commit > 1 only)."""

    def file_commit_failed(self, actor: Actor) -> None:
        """The file's COMMIT of batches it holds for the log failed; they stay kept
        for its next one (durability=log with log_batches_per_commit > 1 only)."""

    def reapplied(self, actor: Actor, batches: int) -> None:
        """SQLite rolled the file's transaction back, and its kept batches were
        applied again (durability=log with log_batches_per_commit > 1 only)."""

    def committed(
        self, actor: Actor, calls: list[Call], results: list[Result | Error], wrote: bool
    ) -> None:
        """A batch committed; deliver ``results`` to ``calls`` once it is durable."""

    def file_durable(self, actor: Actor, lsn: int) -> None:
        """The actor's file is durable on its own up to ``lsn`` (checkpoint, sync)."""

    def forget(self, actor: Actor) -> None:
        """The actor left memory."""

    def unapplied(self, actor: Actor) -> None:
        """The actor closes with batches its file lacks (durability=log only)."""

    def sync_file(self, actor: Actor) -> None:
        """Make the actor's own file durable (blocking: a worker thread)."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background work of the policy (the flusher), until cancelled."""

    def statistics(self) -> dict[str, Any]: ...


class _PerFileDurability:
    """What ``os`` and ``fsync`` share: each actor's file is durable on its own."""

    def __init__(self, config: ActorConfig) -> None:
        self.config = config
        self.on_released: Callable[[Actor], None] = lambda actor: None
        self.recovered_alarms: dict[str, dict[str, float | None]] = {}
        self.on_recovered_alarms: Callable[[str], None] = lambda directory: None

    async def attach_shard(self, directory: str) -> None:
        # a shard that ran with durability=log may hold records its files lack
        self.recovered_alarms[directory] = await trio.to_thread.run_sync(
            drain_shard_log, directory, self.config
        )

    async def detach_shard(self, directory: str) -> list[str]:
        return []  # no log: each closed actor's file holds everything already

    def needs_replay(self, actor: Actor) -> bool:
        return False  # attach_shard applied all its log held before the shard served

    async def replay_actor(self, actor: Actor) -> None:
        return None  # (never asked: needs_replay is False)

    async def wait_recovered(self, directory: str | None = None) -> None:
        return None  # attach_shard applied all its log held before the shard served

    def log_epoch(self, directory: str) -> int:
        return read_log_epoch(directory)

    def ship_records(self, directory: str, on: bool) -> None:
        pass  # no records: every written key is copied whole

    def replaced(self, actor: Actor) -> None:
        pass  # no records kept (see ship_records)

    def take_records(
        self, directory: str, keys: list[str]
    ) -> tuple[dict[str, list[tuple[int, bytes]]], list[str]]:
        return {}, keys

    def creation_lsn(self, actor: Actor) -> int:
        return 0

    def opened(self, actor: Actor) -> None:
        pass

    def before_commit(self, actor: Actor) -> None:
        pass

    def commit_failed(self, actor: Actor) -> None:
        pass

    def rolled_back(self, actor: Actor) -> None:
        pass

    def file_committed(self, actor: Actor) -> None:
        pass  # never called: each batch commits its own file here (no kept batches)

    def file_commit_failed(self, actor: Actor) -> None:
        pass  # never called: as above

    def reapplied(self, actor: Actor, batches: int) -> None:
        pass  # never called: as above

    def file_durable(self, actor: Actor, lsn: int) -> None:
        pass

    def forget(self, actor: Actor) -> None:
        pass

    def unapplied(self, actor: Actor) -> None:
        pass  # only durability=log holds a file's transaction open

    def sync_file(self, actor: Actor) -> None:
        pass  # only durability=log asks for it


class OsDurability(_PerFileDurability):
    """Acknowledge after COMMIT: survives a process crash, not a power cut."""

    mode = "os"

    def committed(
        self, actor: Actor, calls: list[Call], results: list[Result | Error], wrote: bool
    ) -> None:
        deliver(calls, results)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def statistics(self) -> dict[str, Any]:
        return {"mode": "os"}


def fdatasync_wal(actor: Actor) -> None:
    """Make the actor's committed WAL frames durable. Runs in a worker thread.

    The WAL file's directory entry is synced too after each open, since the WAL is
    created (and, on close, deleted) by SQLite, which under synchronous=NORMAL never
    syncs the directory itself. The main database file is never opened here: closing a
    second descriptor of it would drop SQLite's POSIX locks (howtocorrupt.html §2.2).
    """
    if actor.wal_fd is None:
        actor.wal_fd = os.open(actor.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
    os.fdatasync(actor.wal_fd)
    if actor.dir_sync_needed:
        sync_directory(os.path.dirname(actor.path))
        actor.dir_sync_needed = False


class FsyncDurability(_PerFileDurability):
    """Acknowledge after an fdatasync of the actor's WAL, run off the event loop."""

    mode = "fsync"

    def __init__(self, config: ActorConfig, sync: SyncFn = fdatasync_wal) -> None:
        super().__init__(config)
        self._sync = sync
        self._threads = max(1, config.fsync_threads)
        self._limiter = trio.CapacityLimiter(self._threads)
        self._dirty: list[Actor] = []
        self._queued: set[Actor] = set()
        self._wake = trio.Event()
        self.rounds = 0
        self.syncs = 0
        self.failures = 0

    def committed(
        self, actor: Actor, calls: list[Call], results: list[Result | Error], wrote: bool
    ) -> None:
        if wrote:
            actor.written_gen += 1
        if actor.written_gen == actor.synced_gen:
            deliver(calls, results)
            return
        actor.pending.append((actor.written_gen, calls, results, False))
        if wrote and not actor.flushing and actor not in self._queued:
            self._queued.add(actor)
            self._dirty.append(actor)
            self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._dirty:
                await self._round()

    async def _round(self) -> None:
        actors, self._dirty = self._dirty, []
        self._queued.clear()
        targets = []
        for actor in actors:
            actor.flushing = True
            targets.append(actor.written_gen)
        failed: dict[Actor, BaseException] = {}
        # spread the fdatasyncs over a few threads: the disk serves them concurrently
        chunks = [actors[i :: self._threads] for i in range(min(self._threads, len(actors)))]
        async with trio.open_nursery() as nursery:
            for chunk in chunks:
                nursery.start_soon(self._sync_chunk, chunk, failed)
        self.rounds += 1
        self.syncs += len(actors)
        for actor, target in zip(actors, targets, strict=True):
            actor.flushing = False
            exc = failed.get(actor)
            if exc is not None:
                self._fail(actor, exc)
                continue
            actor.synced_gen = target
            while actor.pending and actor.pending[0][0] <= target:
                _, calls, results, _ = actor.pending.popleft()
                deliver(calls, results)
            if actor.written_gen > actor.synced_gen and actor not in self._queued:
                self._queued.add(actor)
                self._dirty.append(actor)
            elif not actor.pending:
                self.on_released(actor)

    async def _sync_chunk(self, chunk: list[Actor], failed: dict[Actor, BaseException]) -> None:
        def work() -> None:
            for actor in chunk:
                try:
                    self._sync(actor)
                except OSError as exc:
                    failed[actor] = exc

        await trio.to_thread.run_sync(work, limiter=self._limiter)

    def _fail(self, actor: Actor, exc: BaseException) -> None:
        # After a failed fsync the kernel may have dropped the dirty pages (fsyncgate):
        # nothing pending can be acknowledged, and the actor must reopen from disk.
        self.failures += 1
        log.error("fdatasync of %s failed: %s; failing its pending replies", actor.path, exc)
        err = Internal(f"the write could not be made durable ({exc}); it may or may not be applied")
        while actor.pending:
            for call in actor.pending.popleft()[1]:
                call.sink.deliver(call.tag, err)
        actor.synced_gen = actor.written_gen
        actor.broken = True
        self.on_released(actor)

    def statistics(self) -> dict[str, Any]:
        return {
            "mode": "fsync",
            "rounds": self.rounds,
            "syncs": self.syncs,
            "failures": self.failures,
            "dirty": len(self._dirty),
        }


def make_durability(config: ActorConfig) -> DurabilityPolicy:
    if config.durability is Durability.LOG:
        return LogDurability(config)
    if config.durability is Durability.FSYNC:
        return FsyncDurability(config)
    return OsDurability(config)
