"""Residency: which actors hold open files. The LRU's evictions, closes, and the reaper
that passivates idle actors under pressure.

A mixin of :class:`~shardlite.actor._pool.ActorPool`. ``_actors`` is the LRU (least
recently used first); past ``max_open_actors`` open files the least recently used idle
actors are evicted: inline with no checkpoint while their WAL is short
(:meth:`ResidencyMixin._close_quick`), else checkpointed and closed in a worker thread
(:meth:`ResidencyMixin._close`). ``_open`` counts actors holding files, ``_closing`` those
of them being closed.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable

import apsw
import trio

from ._actor import Actor, State
from ._config import ActorConfig
from ._durability import DurabilityPolicy

log = logging.getLogger("shardlite.actor")

REAP_INTERVAL_MAX_S = 5.0
"""The reaper looks for idle actors at least this often (and every idle_timeout / 2)."""
QUICK_CLOSE_WAL_BYTES = 64 << 10
"""An evicted actor whose WAL holds at most this much closes inline, leaving its WAL
(ResidencyMixin._close_quick). It stays on the disk beside the closed file until a reopen:
this bounds what a tenant that is not coming back leaves there."""


class ResidencyMixin:
    """The pool's residency (see the module docstring)."""

    # owned by ActorPool
    config: ActorConfig
    durability: DurabilityPolicy
    evicted: int
    quick_closes: int
    _actors: OrderedDict[str, Actor]
    _parked: deque[Actor]
    _open: int
    _closing: int
    _close_limiter: trio.CapacityLimiter

    # the pool's own methods this uses
    wake_runner: Callable[[], None]
    _schedule: Callable[[Actor], None]
    _spawn: Callable[..., None]
    _after_busy: Callable[[Actor], None]

    def _evict(self) -> None:
        # actors already closing still hold their files but must not be counted twice
        excess = self._open - self._closing - self.config.max_open_actors
        victims: list[Actor] = []
        for actor in self._actors.values():  # least recently used first
            if len(victims) >= excess:
                break
            if actor.state is State.OPEN and actor.idle:
                victims.append(actor)
        for actor in victims:
            self.evicted += 1
            if not self._close_quick(actor):
                self._spawn_close(actor, keep_wal=True)

    def _close_quick(self, actor: Actor) -> bool:
        """Evict inline, with no checkpoint and no sync (Actor.close_quick), if the WAL is
        short: the LRU is likely to reopen the file, and the reopened actor reads that
        WAL back (then appends to it) in about the time a close's checkpoint would take
        on an idle disk, where the checkpoint's syncs (three per close) compete with the
        log's own flushes on a busy one. Whether it closed."""
        if (
            actor.broken
            or actor.needs_file_sync
            or actor.want_checkpoint
            or actor.wal_pages * actor.page_size > QUICK_CLOSE_WAL_BYTES
        ):
            return False
        try:
            actor.close_quick()
        except apsw.Error as exc:  # the commit failed: the checkpointing close deals with it
            log.warning("actor %r: quick close failed: %s", actor.key, exc)
            return False
        actor.state = State.CLOSED
        self.quick_closes += 1
        self._closed_one()
        self._forget(actor)
        return True

    def _forget(self, actor: Actor) -> None:
        if self._actors.get(actor.key) is actor and actor.idle and actor.state is State.CLOSED:
            del self._actors[actor.key]
            self.durability.forget(actor)

    def _spawn_close(self, actor: Actor, *, keep_wal: bool = False) -> None:
        actor.state = State.BUSY
        self._closing += 1
        self._spawn(self._close, actor, keep_wal)

    async def _close(self, actor: Actor, keep_wal: bool = False) -> None:
        """Checkpoint in a worker thread, then close. ``keep_wal`` (evictions, which
        the LRU is likely to reopen soon): leave a started WAL beside the file, so that
        the reopened actor's first commit does not sync a new WAL's header on the loop
        (Actor.checkpoint_before_close, Actor._start_wal)."""
        with trio.CancelScope(shield=True):
            lsn = actor.last_lsn
            try:
                # at most CLOSE_THREADS at once: each close syncs a file, and a reaper pass
                # that closes thousands of idle actors must not starve the log's flushes
                await trio.to_thread.run_sync(
                    functools.partial(actor.checkpoint_before_close, keep_wal=keep_wal),
                    limiter=self._close_limiter,
                )
                if not actor.broken:
                    self.durability.file_durable(actor, lsn)
            except apsw.Error:
                log.exception("actor %r: checkpoint before close failed", actor.key)
            try:
                actor.close()
            except apsw.Error:
                log.exception("actor %r: close failed", actor.key)
        actor.state = State.CLOSED
        self._closing -= 1
        self._closed_one()
        actor.broken = False
        actor.want_checkpoint = False
        self._after_busy(actor)

    def _closed_one(self) -> None:
        """An actor's files are closed: an actor waiting for descriptors may open."""
        self._open -= 1
        if self._parked:
            self._schedule(self._parked.popleft())
            self.wake_runner()

    async def _run_reaper(self) -> None:
        """Passivate under pressure: once more than half of ``max_open_actors`` are open,
        close the ones idle past ``idle_timeout`` (below that, an open file costs two
        descriptors and its page cache, and closing it would cost two syncs now and a
        reopen on its next request)."""
        interval = min(self.config.idle_timeout_s / 2, REAP_INTERVAL_MAX_S)
        while True:
            await trio.sleep(interval)
            if self._open - self._closing <= self.config.max_open_actors // 2:
                for actor in [a for a in self._actors.values() if a.state is State.CLOSED]:
                    self._forget(actor)
                continue
            cutoff = trio.current_time() - self.config.idle_timeout_s
            for actor in list(self._actors.values()):
                if actor.last_used > cutoff:
                    break
                if actor.state is State.OPEN and actor.idle:
                    self._spawn_close(actor)
                elif actor.state is State.CLOSED:
                    self._forget(actor)
