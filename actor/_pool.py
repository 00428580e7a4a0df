"""The actor pool of one process: scheduling, lifecycle; residency (the LRU, evictions,
the idle reaper) is its mixin in _residency.py.

Callers hand calls to :meth:`ActorPool.submit_nowait` (no checkpoint, no task switch)
and then call :meth:`ActorPool.run_ready`, which runs every actor with queued calls on
the caller's own task: a batch per actor, inline. An RPC connection that read 500 frames
for 20 keys thus runs 20 transactions and no task switch at all. Work left over after a
time slice goes to the pool's runner task, so one submitter never runs for long.

Everything that blocks (checkpoint, close, export, delete) runs in a worker thread while
the actor is BUSY; calls that arrive meanwhile wait in its mailbox.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import apsw
import trio

from ._actor import Actor, Call, Exclusive, Sink, State
from ._app import App
from ._appruntime import AppRuntime
from ._config import ActorConfig
from ._durability import DurabilityPolicy, make_durability
from ._errors import Error, Internal, Overloaded, Unavailable
from ._exclusive import ExclusiveMixin, Waiter
from ._handoff import HandoffMixin
from ._keys import resolve_actor_path, validate_key
from ._logdurability import LogDurability
from ._ops import Inline, Op
from ._residency import ResidencyMixin
from ._sqlerrors import map_error

log = logging.getLogger("shardlite.actor")

RUN_SLICE_S = 0.005
"""How long one caller of run_ready() runs actors before leaving the rest to the runner."""
DRAIN_TIMEOUT_S = 30.0
HOG_BATCH_S = 0.02
"""A batch that held the event loop longer than this pauses its actor afterwards ..."""
HOG_PAUSE_FACTOR = 4.0
"""... for this many times as long: a tenant whose statements run to their time budget
gets at most a fifth of the loop, and everyone else's requests keep flowing."""
SLOW_LANE_THREADS = 1
"""Worker threads per process running read-only calls that outran the inline slice: long
queries wait for each other there, not the event loop's other tenants."""
SLOW_WATCH_S = 0.002
"""How often the loop checks a slow-lane statement's time budget and temporary storage."""
OPEN_SLACK = 32
"""Actors past --max-open-actors that may hold files while others finish closing: no more
(the process's descriptor reserve covers them), the next opens wait for a close."""
CREATE_THREADS = 4
"""Actor files created (which syncs their header) concurrently in worker threads."""
CLOSE_THREADS = 2
"""Actors closed (checkpoint and sync, then close) concurrently in worker threads."""

_clock = time.monotonic


class ActorPool(ResidencyMixin, ExclusiveMixin, HandoffMixin):
    """All the actors of one process. Open with :func:`open_actor_pool`."""

    def __init__(
        self,
        config: ActorConfig,
        locate: Callable[[str], str],
        durability: DurabilityPolicy | None = None,
        app: App | None = None,
    ) -> None:
        self.config = config
        self._locate = locate
        self.durability = durability if durability is not None else make_durability(config)
        self.durability.on_released = self._on_released
        self.durability.on_recovered_alarms = self._recovered_alarms
        self._actors: OrderedDict[str, Actor] = OrderedDict()
        self._tracked: dict[str, set[str]] = {}  # shard directory -> keys written (moves)
        self._ready: deque[Actor] = deque()
        self._parked: deque[Actor] = deque()  # closed actors waiting for others to close
        self._runner_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._open = 0
        self._closing = 0
        self._open_limiter = trio.CapacityLimiter(CREATE_THREADS)
        self._close_limiter = trio.CapacityLimiter(CLOSE_THREADS)
        self._slow_limiter = trio.CapacityLimiter(SLOW_LANE_THREADS)
        self.closing = False
        self.runtime: AppRuntime | None = None
        if app is not None:
            self.runtime = AppRuntime(app, config)
            self.runtime.pool = self
            self.runtime.scheduler.fire = self.runtime.fire
            if isinstance(self.durability, LogDurability):
                self.durability.before_trim = self.runtime.scheduler.sync_index
        # counters for statistics()
        self.opened = 0
        self.evicted = 0
        self.quick_closes = 0
        self.checkpoints = 0
        self.overloaded = 0
        self.hog_pauses = 0
        self.slow_calls = 0
        self.batches = 0
        self.calls = 0

    # ------------------------------------------------------------------ calls

    def room(self, key: str) -> int:
        """How many more calls ``key``'s mailbox takes before callers get overloaded."""
        actor = self._actors.get(key)
        return self.config.mailbox_size - (len(actor.mailbox) if actor is not None else 0)

    def overload_error(self, key: str) -> Overloaded:
        """The error for calls ``key``'s full mailbox refuses (and count them)."""
        self.overloaded += 1
        actor = self._actors.get(key)
        queued = len(actor.mailbox) if actor is not None else 0
        return Overloaded(
            f"actor {key!r} has {queued} calls queued; retry shortly", retry_after=1.0
        )

    def submit_nowait(self, key: str, calls: list[Call]) -> None:
        """Queue ``calls`` for ``key``'s actor. Raises Overloaded/Unavailable/BadRequest."""
        if self.closing:
            raise Unavailable("the server is shutting down; retry on another server")
        actor = self._actors.get(key)
        queued = len(actor.mailbox) if actor is not None else 0
        if queued + len(calls) > self.config.mailbox_size:
            raise self.overload_error(key)
        if actor is None:
            validate_key(key)
            path = resolve_actor_path(self._locate(key), key)
            actor = Actor(key, path, self.config, self.durability)
            actor.written = self._tracking_set(path)
            if self.runtime is not None:
                self.runtime.bind(actor)
            self._actors[key] = actor
        else:
            self._actors.move_to_end(key)
        if actor.app is not None:
            for call in calls:
                self.runtime.convert(actor, call)  # type: ignore[union-attr]
        actor.mailbox.extend(calls)
        self._schedule(actor)

    def path_of(self, key: str) -> str:
        """Where ``key``'s actor file is (or would be)."""
        actor = self._actors.get(key)
        return actor.path if actor is not None else resolve_actor_path(self._locate(key), key)

    def _schedule(self, actor: Actor) -> None:
        if actor.cooling:
            return  # _cool_down schedules it when its pause is over
        if not actor.scheduled and actor.state is not State.BUSY and not actor.want_checkpoint:
            actor.scheduled = True
            self._ready.append(actor)

    async def attach_shard(self, directory: str) -> None:
        """Serve the shard in ``directory`` (its recovery from its log runs meanwhile)."""
        await self.durability.attach_shard(directory)
        found = self.durability.recovered_alarms.pop(directory, {})
        if self.runtime is not None:
            await self.runtime.scheduler.attach(directory, found)
            self._recovered_alarms(directory)  # found while the index loaded

    def _recovered_alarms(self, directory: str) -> None:
        """Recovery brought files up to the log while the shard serves: their next
        alarms into the shard's alarm index, once it is loaded (attach_shard)."""
        if self.runtime is None:
            self.durability.recovered_alarms.pop(directory, None)
            return
        scheduler = self.runtime.scheduler
        if directory in scheduler.indexes:
            for key, at in self.durability.recovered_alarms.pop(directory, {}).items():
                scheduler.note(key, directory, at)

    def wake_runner(self) -> None:
        """Let the runner task run what is queued, once the current tasks have yielded."""
        if self._ready:
            self._runner_wake.set()

    def run_ready(self) -> None:
        """Run queued batches inline, for up to RUN_SLICE_S; the runner does the rest."""
        ready = self._ready
        now = trio.current_time()
        deadline = _clock() + RUN_SLICE_S
        while ready:
            actor = ready.popleft()
            actor.scheduled = False
            if actor.state is State.BUSY or actor.want_checkpoint or not actor.mailbox:
                continue
            if actor.cooling:
                continue
            if actor.broken:  # reopen from disk before anything else runs
                self._maybe_maintain(actor)
                continue
            actor.last_used = now
            if actor.state is State.CLOSED and self.durability.needs_replay(actor):
                # its file lacks records the shard log held at attach (a restart after
                # a crash): brought up to them first, ahead of the background recovery
                actor.state = State.BUSY
                self._spawn(self._replay_then_run, actor)
                continue
            if type(actor.mailbox[0].op) is Exclusive:
                self._start_exclusive(actor)
                continue
            if actor.state is State.CLOSED:
                if self._open >= self.config.max_open_actors + OPEN_SLACK:
                    self._evict()
                if self._open >= self.config.max_open_actors + OPEN_SLACK:
                    # every descriptor is taken, some by actors still closing (a close
                    # that syncs a file): open this one once a close is over
                    self._parked.append(actor)
                    continue
                if not os.path.exists(actor.path):
                    # creating a file syncs its header: a worker thread does it
                    actor.state = State.BUSY
                    self._spawn(self._create_actor, actor)
                    continue
                # opening an existing file is a few hundred µs of syscalls: inline (a
                # thread hop costs as much, and each opening thread grows a malloc arena)
                if not self._open_inline(actor):
                    continue
            if actor.preempted is not None:
                if actor.mailbox[0] is actor.preempted:
                    self._start_slow(actor)
                    continue
                actor.preempted = None
            before = actor.calls
            started = _clock()
            actor.run_batch()
            spent = _clock() - started
            if spent > HOG_BATCH_S:
                self._cool(actor, spent * HOG_PAUSE_FACTOR)
            self.batches += 1
            self.calls += actor.calls - before
            if actor.needs_file_sync and not actor.broken:  # an unlogged batch (log mode)
                actor.state = State.BUSY
                self._spawn(self._sync_file, actor)
            elif (
                actor.broken or actor.want_checkpoint or actor.wal_pages >= self._ckpt_pages(actor)
            ):
                actor.want_checkpoint = True
                self._maybe_maintain(actor)
            elif actor.mailbox:
                actor.scheduled = True
                ready.append(actor)
            if _clock() > deadline:
                break
        if ready:
            self._runner_wake.set()

    async def call(
        self,
        key: str,
        op: Op | Exclusive | Inline,
        *,
        idempotency_key: str | None = None,
        readonly: bool = False,
    ) -> Any:
        """Run one operation on ``key``'s actor and return its result (or raise).

        With an ``idempotency_key``, a call that already succeeded is not run again: its
        first result is returned.
        """
        waiter = Waiter()
        self.submit_nowait(key, [Call(op, waiter, None, idempotency_key, readonly)])
        self.wake_runner()
        return await waiter.wait()

    # ------------------------------------------------------------------ residency

    async def _replay_then_run(self, actor: Actor) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.durability.replay_actor(actor)
            except Error as exc:
                self._open_failed(actor, exc)
                return
        actor.state = State.CLOSED
        self._after_busy(actor)

    async def _create_actor(self, actor: Actor) -> None:
        with trio.CancelScope(shield=True):
            try:
                open_new = functools.partial(
                    actor.open, initial_lsn=self.durability.creation_lsn(actor)
                )
                await trio.to_thread.run_sync(open_new, limiter=self._open_limiter)
            except (Error, apsw.Error, OSError) as exc:
                self._open_failed(actor, exc)
                return
        self._opened(actor)
        self._after_busy(actor)

    def _open_inline(self, actor: Actor) -> bool:
        try:
            actor.open()
        except (Error, apsw.Error, OSError) as exc:
            self._open_failed(actor, exc)
            return False
        self._opened(actor)
        return True

    def _opened(self, actor: Actor) -> None:
        actor.state = State.OPEN
        self._open += 1
        self.opened += 1
        if self._open - self._closing > self.config.max_open_actors:
            self._evict()

    def _open_failed(self, actor: Actor, exc: BaseException) -> None:
        err = exc if isinstance(exc, Error) else _open_error(actor, exc)
        log.warning("actor %r: cannot open %s: %s", actor.key, actor.path, exc)
        actor.state = State.CLOSED
        while actor.mailbox:
            call = actor.mailbox.popleft()
            call.sink.deliver(call.tag, err)
        self._forget(actor)

    def _ckpt_pages(self, actor: Actor) -> int:
        return self.config.checkpoint_wal_bytes // actor.page_size

    def _on_released(self, actor: Actor) -> None:
        if actor.released is not None:
            actor.released.set()
            actor.released = None
        self._maybe_maintain(actor)

    def _maybe_maintain(self, actor: Actor) -> None:
        """Checkpoint (or reset, if broken) an actor once its replies are all released."""
        if actor.state is not State.OPEN or actor.pending or actor.flushing:
            return
        if actor.broken:
            self._spawn_close(actor)
        elif actor.want_checkpoint:
            actor.state = State.BUSY
            self._spawn(self._checkpoint, actor)

    def _cool(self, actor: Actor, pause: float) -> None:
        """Hold ``actor``'s next batches back for ``pause`` seconds (it hogged the loop)."""
        actor.cooling = True
        self.hog_pauses += 1
        self._spawn(self._cool_down, actor, pause)

    async def _cool_down(self, actor: Actor, pause: float) -> None:
        await trio.sleep(pause)
        actor.cooling = False
        self._schedule(actor)
        self.wake_runner()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _sync_file(self, actor: Actor) -> None:
        with trio.CancelScope(shield=True):
            await self.sync_if_needed(actor)
        actor.state = State.OPEN
        self._maybe_maintain(actor)
        self._after_busy(actor)

    @staticmethod
    def _fail_pending(actor: Actor, exc: BaseException) -> None:
        err = Internal(f"the write could not be made durable ({exc}); it may or may not be applied")
        while actor.pending:
            for call in actor.pending.popleft()[1]:
                call.sink.deliver(call.tag, err)
        actor.needs_file_sync = False

    async def _checkpoint(self, actor: Actor) -> None:
        with trio.CancelScope(shield=True):
            lsn = actor.last_lsn
            try:
                await trio.to_thread.run_sync(actor.checkpoint_blocking)
                self.checkpoints += 1
                self.durability.file_durable(actor, lsn)
            except apsw.Error:
                log.exception("actor %r: checkpoint failed", actor.key)
        actor.state = State.OPEN
        actor.want_checkpoint = False
        self._after_busy(actor)

    def _after_busy(self, actor: Actor) -> None:
        if actor.mailbox:
            self._schedule(actor)
            self.run_ready()
        elif actor.state is State.CLOSED:
            self._forget(actor)
        elif self._open - self._closing > self.config.max_open_actors:
            self._evict()  # the actors it passed over were busy: this one may go now

    # ------------------------------------------------------------------ the slow lane

    def _start_slow(self, actor: Actor) -> None:
        call = actor.mailbox.popleft()
        actor.preempted = None
        actor.state = State.BUSY
        self.slow_calls += 1
        self._spawn(self._run_slow, actor, call)

    async def _run_slow(self, actor: Actor, call: Call) -> None:
        result: Any
        done = trio.Event()
        started = _clock()
        with trio.CancelScope(shield=True):  # bounded by the statement budget
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_slow, actor, done)
                try:
                    result = await trio.to_thread.run_sync(
                        actor.run_slow, call, limiter=self._slow_limiter
                    )
                except Exception as exc:  # a bug (or MemoryError): fail the call, reopen
                    log.exception("actor %r: unexpected failure in the slow lane", actor.key)
                    result = Internal(f"unexpected failure: {type(exc).__name__}")
                    actor.broken = True
                finally:
                    done.set()
        actor.state = State.OPEN
        self.batches += 1
        self.calls += 1
        actor.finish_slow(call, result)
        if self._slow_limiter.statistics().tasks_waiting:
            # others wait for the slow lane: this actor waits 4x as long as it held it
            # (the hog pause's rule), so one tenant's runaway reads get a fifth of it
            self._cool(actor, (_clock() - started) * HOG_PAUSE_FACTOR)
        self._maybe_maintain(actor)
        self._after_busy(actor)

    @staticmethod
    async def _watch_slow(actor: Actor, done: trio.Event) -> None:
        """Stop the slow lane's statement from the loop once it is over its budget (it
        runs with no progress handler: each call of one would take the GIL)."""
        while not done.is_set():
            with trio.move_on_after(SLOW_WATCH_S):
                await done.wait()
            if not done.is_set() and actor.over_budget() and actor.conn is not None:
                actor.conn.interrupt()  # sqlite3_interrupt: safe from another thread
                return

    # ------------------------------------------------------------------ background tasks

    async def _run_runner(self) -> None:
        while True:
            await self._runner_wake.wait()
            self._runner_wake = trio.Event()
            while self._ready:
                self.run_ready()
                await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Stop taking calls, run what is queued, release every reply, close every file."""
        self.closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(DRAIN_TIMEOUT_S) as scope:
                while True:
                    self.run_ready()
                    if not self._ready and all(a.idle for a in self._actors.values()):
                        break
                    await trio.sleep(0.001)
            if scope.cancelled_caught:
                log.error("actor pool: drain did not finish within %.0f s", DRAIN_TIMEOUT_S)
            for actor in list(self._actors.values()):
                self._refuse_all(actor)
                if actor.state is State.OPEN and not actor.flushing:
                    actor.state = State.BUSY
                    self._closing += 1
                    await self._close(actor)

    @staticmethod
    def _refuse_all(actor: Actor) -> None:
        """Answer what could not run or be confirmed before shutdown."""
        while actor.mailbox:
            call = actor.mailbox.popleft()
            call.sink.deliver(call.tag, Unavailable("the server shut down before this call ran"))
        unknown = Unavailable(
            "the server shut down before this write was confirmed durable; "
            "it may or may not be applied"
        )
        while actor.pending:
            for call in actor.pending.popleft()[1]:
                call.sink.deliver(call.tag, unknown)

    def statistics(self) -> dict[str, Any]:
        return {
            "actors_known": len(self._actors),
            "actors_open": self._open,
            "ready": len(self._ready),
            "opened": self.opened,
            "evicted": self.evicted,
            "quick_closes": self.quick_closes,
            "checkpoints": self.checkpoints,
            "overloaded": self.overloaded,
            "hog_pauses": self.hog_pauses,
            "slow_calls": self.slow_calls,
            "batches": self.batches,
            "calls": self.calls,
            "durability": self.durability.statistics(),
            "app": self.runtime.statistics() if self.runtime is not None else None,
        }


def _open_error(actor: Actor, exc: BaseException) -> Error:
    if isinstance(exc, apsw.Error):
        err = map_error(exc, None)
        if err.code == "internal":
            return Internal(f"cannot open actor {actor.key!r}: {exc}")
        return err
    return Internal(f"cannot open actor {actor.key!r}: {exc}")


@asynccontextmanager
async def open_actor_pool(
    config: ActorConfig,
    locate: Callable[[str], str] | str,
    durability: DurabilityPolicy | None = None,
    *,
    shards: Sequence[str] = (),
    app: App | None = None,
) -> AsyncIterator[ActorPool]:
    """Run an :class:`ActorPool` with its background tasks; drain and close it on exit.

    ``locate(key)`` gives the shard directory of a key; every shard directory must be
    attached (``shards`` here, or :meth:`ActorPool.attach_shard`) before it serves. A
    plain directory stands for a single shard holding every key.
    """
    if isinstance(locate, str):
        directory = locate
        shards = (*shards, directory)
        locate = lambda key: directory  # noqa: E731
    pool = ActorPool(config, locate, durability, app)
    async with trio.open_nursery() as nursery:
        pool._nursery = nursery
        await nursery.start(pool.durability.run)
        if pool.runtime is not None:
            await nursery.start(pool.runtime.scheduler.run)
        nursery.start_soon(pool._run_runner)
        nursery.start_soon(pool._run_reaper)
        try:
            for shard in shards:
                await pool.attach_shard(shard)
            yield pool
        finally:
            await pool.aclose()
            if pool.runtime is not None:
                pool.runtime.scheduler.close()
            nursery.cancel_scope.cancel()


__all__ = ["ActorPool", "Sink", "Waiter", "open_actor_pool"]
