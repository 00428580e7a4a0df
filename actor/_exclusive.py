"""Exclusive calls: operations that need an actor to themselves (delete, export,
async methods, the ops verbs' copies and checks), run between its batches.

A mixin of :class:`~shardlite.actor._pool.ActorPool`: an :class:`Exclusive` entry waits
in the mailbox like any call; when it reaches the head, the pool marks the actor BUSY,
waits for its earlier replies to be released, and awaits the entry's function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import apsw
import trio

from ._actor import Actor, Call, Exclusive, State
from ._appruntime import DELIVERED
from ._durability import DurabilityPolicy
from ._errors import Error, Internal, TooLarge
from ._handoff import copy_to, remove_actor_files
from ._ops import Deleted, ExportResult

if TYPE_CHECKING:
    from ._appruntime import AppRuntime

log = logging.getLogger("shardlite.actor")


class Waiter:
    """A sink for one call awaited by one task (HTTP handlers, in-process callers)."""

    __slots__ = ("_discard", "_event", "_result")

    def __init__(self) -> None:
        self._result: Any = None
        self._event: trio.Event | None = None
        self._discard: Callable[[Any], None] | None = None

    def deliver(self, tag: Any, result: Any) -> None:
        if self._discard is not None:
            self._discard(result)
            return
        self._result = (result,)
        if self._event is not None:
            self._event.set()

    def abandon(self, discard: Callable[[Any], None]) -> None:
        """The waiting task is gone: hand the result, now or later, to ``discard``."""
        if self._result is not None:
            discard(self._result[0])
        else:
            self._discard = discard

    async def wait(self) -> Any:
        if self._result is None:
            self._event = trio.Event()
            await self._event.wait()
        result = self._result[0]
        if isinstance(result, Error):
            raise result
        return result


class ExclusiveMixin:
    """The pool's exclusive calls (see the module docstring)."""

    # owned by ActorPool
    durability: DurabilityPolicy
    runtime: AppRuntime | None
    _open: int
    _open_limiter: trio.CapacityLimiter

    # the pool's own methods this uses
    call: Callable[..., Awaitable[Any]]
    submit_nowait: Callable[[str, list[Call]], None]
    wake_runner: Callable[[], None]
    _spawn: Callable[..., None]
    _after_busy: Callable[[Actor], None]
    _closed_one: Callable[[], None]
    _fail_pending: Callable[[Actor, BaseException], None]

    async def delete(self, key: str) -> bool:
        """Remove ``key``'s actor and its file, after the calls queued before this one."""
        result: Deleted = await self.call(key, self.delete_call())
        return result.deleted

    async def export(self, key: str) -> str:
        """A consistent copy of the actor's file in a new temporary file; caller removes it."""
        waiter = Waiter()
        self.submit_nowait(key, [Call(Exclusive(self._export_file), waiter)])
        self.wake_runner()
        try:
            path: str = await waiter.wait()
        except trio.Cancelled:
            waiter.abandon(_remove_file)  # nobody will stream the copy: do not leak it
            raise
        return path

    def delete_call(self) -> Exclusive:
        """An operation that removes the actor and its file (result: :class:`Deleted`)."""
        return Exclusive(self._delete_files)

    def export_call(self, max_bytes: int) -> Exclusive:
        """An operation returning the actor's file as bytes (:class:`ExportResult`);
        files over ``max_bytes`` are refused with TooLarge before any copy is made."""
        return Exclusive(functools.partial(self._export_bytes, max_bytes=max_bytes))

    # ------------------------------------------------------------------ exclusive calls

    def _start_exclusive(self, actor: Actor) -> None:
        call = actor.mailbox.popleft()
        assert isinstance(call.op, Exclusive)
        was_open = actor.state is State.OPEN
        actor.state = State.BUSY
        self._spawn(self._run_exclusive, actor, call, was_open)

    async def _run_exclusive(self, actor: Actor, call: Call, was_open: bool) -> None:
        assert isinstance(call.op, Exclusive)
        with trio.CancelScope(shield=True):
            while actor.pending or actor.flushing:
                actor.released = trio.Event()
                await actor.released.wait()
            if actor.conn is None and was_open:
                was_open = False
            if actor.broken and actor.conn is not None:
                # a failed fsync: what the connection caches may not be on disk; reopen
                await self._reset(actor)
                was_open = False
            try:
                actor.commit_file()  # what it reads or copies holds every batch before it
                result: Any = await call.op.fn(actor)
            except Error as exc:
                result = exc
            except (apsw.Error, OSError) as exc:
                log.exception("actor %r: exclusive operation failed", actor.key)
                result = exc if isinstance(exc, Error) else Internal(str(exc))
                if actor.conn is not None and not actor.conn.get_autocommit():
                    actor._rollback()  # an async method's transaction
                    actor.broken = True
        if actor.conn is None:
            if was_open:
                self._closed_one()
            actor.state = State.CLOSED
        else:
            if not was_open:
                self._open += 1
            actor.state = State.OPEN
        if result is not DELIVERED:  # an async method delivers through the output gate
            call.sink.deliver(call.tag, result)
        self._after_busy(actor)

    async def _reset(self, actor: Actor) -> None:
        try:
            await trio.to_thread.run_sync(actor.checkpoint_before_close)
        except apsw.Error:
            log.exception("actor %r: checkpoint before reset failed", actor.key)
        actor.close()
        actor.broken = False
        self._closed_one()

    async def _delete_files(self, actor: Actor) -> Deleted:
        if actor.conn is not None:
            await trio.to_thread.run_sync(actor.checkpoint_before_close)
            actor.close()

        existed = await trio.to_thread.run_sync(remove_actor_files, actor.path)
        if actor.written is not None:
            actor.written.add(actor.key)
            self.durability.replaced(actor)
        if self.runtime is not None:
            self.runtime.deleted(actor.key, actor.path)
        return Deleted(existed)

    async def open_exclusive(self, actor: Actor) -> None:
        """Open the file of an actor that runs an exclusive call (create it if new)."""
        if os.path.exists(actor.path):  # noqa: ASYNC240 (a stat, like run_ready's inline open)
            actor.open()
        else:
            open_new = functools.partial(
                actor.open, initial_lsn=self.durability.creation_lsn(actor)
            )
            await trio.to_thread.run_sync(open_new, limiter=self._open_limiter)

    async def sync_if_needed(self, actor: Actor) -> None:
        """After an exclusive call's commit: an unlogged batch (log mode) is made durable
        in the actor's own file before anything else runs."""
        if not actor.needs_file_sync:
            return
        lsn = actor.last_lsn
        try:
            await trio.to_thread.run_sync(self.durability.sync_file, actor)
        except OSError as exc:
            log.error("actor %r: fdatasync failed: %s", actor.key, exc)
            self._fail_pending(actor, exc)
            actor.broken = True
            return
        self.durability.file_durable(actor, lsn)

    async def _export_bytes(self, actor: Actor, max_bytes: int) -> ExportResult:
        if actor.conn is None:
            await trio.to_thread.run_sync(functools.partial(actor.open, create=False))
        size = actor.size_bytes()
        if size > max_bytes:
            raise TooLarge(
                f"the actor's file is about {size} bytes, over the limit of {max_bytes}; "
                "use GET /v1/actors/{key}/export over HTTP"
            )
        path = await self._export_file(actor)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            finally:
                os.unlink(path)

        return ExportResult(await trio.to_thread.run_sync(read))

    async def _export_file(self, actor: Actor) -> str:
        return await copy_to(tempfile.gettempdir(), actor)


def _remove_file(result: Any) -> None:
    """Remove an export's temporary copy that nobody will stream (gone already: fine)."""
    if isinstance(result, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(result)
