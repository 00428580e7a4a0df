"""What the pool does for the ops verbs: copies, write tracking, detaching, checks, restores.

A shard move copies each actor file with the backup API (:meth:`snapshot`) while the
actor keeps serving, and re-copies the files written since (:meth:`track_writes` makes
every commit of the shard's actors note its key). At the cutover the source detaches the
shard (:meth:`detach_shard`): every actor of it is closed (checkpointed, durable on its
own), then its log and alarm index go. :meth:`verify` runs ``integrity_check`` on one
file through its actor; :meth:`restore` replaces one file by a checked copy.

Each operation that touches a file is an :class:`Exclusive` call of that actor, so it runs
between batches, never beside one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import apsw
import trio

from ._actor import Actor, Exclusive, State, sync_directory
from ._config import ActorConfig
from ._connection import DAMAGED_SUFFIX, LSN_SET, META_GET
from ._durability import DurabilityPolicy
from ._errors import BadRequest, Error, NotFound
from ._keys import shard_of_path

log = logging.getLogger("shardlite.actor")

QUIESCE_POLL_S = 0.001
HASH_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def integrity_problems(conn: apsw.Connection, *, quick: bool = False) -> str:
    """'' if ``PRAGMA integrity_check`` (or ``quick_check``) finds nothing, else what it
    found (the first lines)."""
    pragma = "quick_check" if quick else "integrity_check"
    rows = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(20)")]
    return "" if rows == ["ok"] else "; ".join(rows)


def _open_immutable(path: str) -> apsw.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?immutable=1"
    return apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)


def remove_actor_files(path: str) -> bool:
    """Delete an actor's file, WAL and shm (and a damage mark), durably; whether the file
    existed. Blocking."""
    removed = set()
    for suffix in ("", "-wal", "-shm", DAMAGED_SUFFIX):
        try:
            os.unlink(path + suffix)
            removed.add(suffix)
        except FileNotFoundError:
            pass  # not there: nothing to delete
    if removed:
        sync_directory(os.path.dirname(path))
    return "" in removed


def next_alarm_of_file(path: str) -> float | None:
    """The time of the next alarm a closed actor file holds (None: none, or unreadable).

    A WAL beside it is read too (an immutable open ignores it): a file closed without a
    checkpoint (after crash recovery, or a crash) may hold its last writes only there.
    Nothing is written, and the close leaves the WAL as it is; without a WAL (a staged
    copy) the open is immutable, and makes no file beside it. Blocking."""
    try:
        if not os.path.exists(path + "-wal"):
            conn = _open_immutable(path)
        else:
            conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            conn.pragma("locking_mode", "EXCLUSIVE")  # as the actor opens it: no -shm file
    except apsw.Error:
        return None
    try:
        if not conn.table_exists("main", "_shardlite_alarms"):
            return None
        at = conn.execute("SELECT min(at) FROM _shardlite_alarms").fetchall()[0][0]
        return None if at is None else float(at)
    except apsw.Error:
        return None
    finally:
        conn.close()


def check_actor_file(path: str, key: str, *, quick: bool = False) -> str:
    """'' if ``path`` is a sound actor file of ``key``, else why not. Blocking. The file
    must be a copy nobody writes (a backup, a move's copy): it is opened immutable, which
    also leaves no -wal/-shm beside it."""
    try:
        conn = _open_immutable(path)
    except apsw.Error as exc:
        return f"cannot open: {exc}"
    try:
        problems = integrity_problems(conn, quick=quick)
        if problems:
            return problems
        try:
            rows = conn.execute(META_GET, ("key",)).fetchall()
        except apsw.SQLError:
            return "not a shardlite actor file (no _shardlite_meta table)"
        if not rows or rows[0][0] != key:
            found = rows[0][0] if rows else None
            return f"the file belongs to actor {found!r}, not {key!r}"
        return ""
    except apsw.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


class HandoffMixin:
    """The ops verbs' side of :class:`~shardlite.actor.ActorPool` (see the module docstring)."""

    config: ActorConfig
    durability: DurabilityPolicy
    runtime: Any
    _actors: OrderedDict[str, Actor]
    _tracked: dict[str, set[str]]
    _open: int
    _closing: int

    # the pool's own methods this uses
    call: Callable[..., Awaitable[Any]]
    _close: Callable[[Actor], Awaitable[None]]
    _forget: Callable[[Actor], None]

    # ------------------------------------------------------------------ write tracking

    def track_writes(self, directory: str) -> None:
        """From now on, note the key of every actor of this shard that commits a write
        (a new set: what was noted before is dropped)."""
        written: set[str] = set()
        self._tracked[directory] = written
        for actor in self._actors.values():
            if shard_of_path(actor.path) == directory:
                actor.written = written
        self.durability.ship_records(directory, True)

    def take_written(self, directory: str) -> tuple[dict[str, list[tuple[int, bytes]]], list[str]]:
        """What was written since tracking began or since the last take: per key, the
        shard-log records that replay it (durability=log), or else the key alone (its
        file must be copied again)."""
        written = self._tracked.get(directory)
        if written is None:
            raise BadRequest(f"writes of {os.path.basename(directory)} are not being tracked")
        keys = sorted(written)
        written.clear()
        return self.durability.take_records(directory, keys)

    def untrack_writes(self, directory: str) -> None:
        self.durability.ship_records(directory, False)
        written = self._tracked.pop(directory, None)
        for actor in self._actors.values():
            if actor.written is written:
                actor.written = None

    def keys_by_path(self, directory: str) -> dict[str, str]:
        """Path -> key of the actors of a shard this pool knows."""
        return {a.path: a.key for a in self._actors.values() if shard_of_path(a.path) == directory}

    def pause_alarms(self, directory: str) -> None:
        """No alarm of the shard fires (its requests are held for a move's cutover)."""
        if self.runtime is not None:
            self.runtime.scheduler.paused.add(directory)

    def resume_alarms(self, directory: str) -> None:
        if self.runtime is not None:
            self.runtime.scheduler.paused.discard(directory)

    def _tracking_set(self, path: str) -> set[str] | None:
        return self._tracked.get(shard_of_path(path)) if self._tracked else None

    # ------------------------------------------------------------------ copies

    async def snapshot(self, key: str, into: str) -> tuple[str, int, str] | None:
        """A consistent copy of ``key``'s file in a new file under ``into``: (path, size,
        sha256), or None if the actor has no file. The caller removes the copy."""
        try:
            path: str = await self.call(key, Exclusive(functools.partial(copy_to, into)))
        except NotFound:
            return None

        def measure() -> tuple[int, str]:
            return os.path.getsize(path), sha256_file(path)

        try:
            size, digest = await trio.to_thread.run_sync(measure)
        except BaseException:
            os.unlink(path)
            raise
        return path, size, digest

    async def verify(self, key: str) -> str:
        """'' if ``key``'s file passes ``integrity_check``, else what is wrong."""
        try:
            result: str = await self.call(key, Exclusive(_verify))
        except NotFound:
            return "the file is gone"
        except Error as exc:
            return exc.message
        return result

    async def restore(self, key: str, source: str) -> None:
        """Replace ``key``'s file by ``source`` (a checked copy: see ``check_actor_file``),
        atomically: a crash leaves the old file or the new one, durable."""
        restore = functools.partial(self._replace_file, source)
        await self.call(key, Exclusive(restore))

    async def _replace_file(self, source: str, actor: Actor) -> Any:
        if actor.conn is not None:  # close first: everything it wrote is in its file
            await trio.to_thread.run_sync(actor.checkpoint_before_close)
            self.durability.file_durable(actor, actor.last_lsn)
            actor.close()  # (the pool counts it closed when this call returns)
        lsn = self.durability.creation_lsn(actor)
        staged = actor.path + ".restore"

        def place() -> float | None:
            os.makedirs(os.path.dirname(actor.path), mode=0o700, exist_ok=True)
            shutil.copyfile(source, staged)
            conn = apsw.Connection(staged)
            try:
                # above every record the log may still hold for an earlier file of this
                # key: replay must never apply those to the restored file
                conn.pragma("journal_mode", "delete")
                conn.execute(LSN_SET, (lsn,))
                alarms = conn.table_exists("main", "_shardlite_alarms")
                at = (
                    conn.execute("SELECT min(at) FROM _shardlite_alarms").fetchall()[0][0]
                    if alarms
                    else None
                )
            finally:
                conn.close()
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(actor.path + suffix)
            os.replace(staged, actor.path)
            with contextlib.suppress(FileNotFoundError):  # the restore is the remedy
                os.unlink(actor.path + DAMAGED_SUFFIX)
            sync_directory(os.path.dirname(actor.path))
            return None if at is None else float(at)

        try:
            at = await trio.to_thread.run_sync(place)
        finally:
            if os.path.exists(staged):  # noqa: ASYNC240 (cleanup of a failed copy)
                os.unlink(staged)
        if actor.written is not None:
            actor.written.add(actor.key)
            self.durability.replaced(actor)
        if self.runtime is not None:
            self.runtime.scheduler.note(actor.key, shard_of_path(actor.path), at)
        actor.last_lsn = actor.file_lsn = 0
        return None

    # ------------------------------------------------------------------ detaching

    async def quiesce(self, directory: str, timeout_s: float) -> bool:
        """Until no actor of the shard has a call queued, running or awaiting its output
        gate (the caller has stopped new calls from arriving). False on timeout."""
        with trio.move_on_after(timeout_s):
            while True:
                if all(a.idle for a in self._actors.values() if shard_of_path(a.path) == directory):
                    return True
                await trio.sleep(QUIESCE_POLL_S)
        return False

    async def detach_shard(self, directory: str) -> list[str]:
        """Stop serving a shard that no calls reach any more: close every actor of it
        (checkpointed: each file then holds all its writes), drop its log and alarms.
        Returns the keys whose files an I/O error left lacking writes the shard's log
        holds (``durability=log``; ``EVERY_KEY``: any key); the log keeps them."""
        self.untrack_writes(directory)
        await self.quiesce(directory, timeout_s=30.0)
        actors = [a for a in self._actors.values() if shard_of_path(a.path) == directory]
        async with trio.open_nursery() as nursery:
            for actor in actors:
                if actor.state is State.OPEN and actor.idle:
                    actor.state = State.BUSY
                    self._closing += 1
                    nursery.start_soon(self._close, actor)
        for actor in actors:
            if actor.mailbox or actor.pending:
                log.error("actor %r: calls left while detaching its shard", actor.key)
            self._forget(actor)
        left = await self.durability.detach_shard(directory)
        if self.runtime is not None:
            self.runtime.scheduler.detach(directory)
        return left


async def copy_to(into: str, actor: Actor) -> str:
    """A consistent copy of the actor's file (backup API) in a new file under ``into``."""
    if actor.conn is None:
        await trio.to_thread.run_sync(functools.partial(actor.open, create=False))
    fd, dest = tempfile.mkstemp(prefix="shardlite-copy-", suffix=".db", dir=into)
    os.close(fd)
    try:
        await trio.to_thread.run_sync(actor.export_blocking, dest)
    except BaseException:
        os.unlink(dest)
        raise
    return dest


async def _verify(actor: Actor) -> str:
    if actor.conn is None:
        try:
            await trio.to_thread.run_sync(functools.partial(actor.open, create=False))
        except NotFound:
            raise
        except (apsw.Error, Error, OSError) as exc:
            return f"cannot open: {exc}"
    conn = actor.conn
    assert conn is not None and actor._auth is not None
    actor._auth.trusted = True
    actor._deadline = float("inf")  # a check of a big file takes as long as it takes
    try:
        return await trio.to_thread.run_sync(integrity_problems, conn)
    except apsw.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        actor._auth.trusted = False


__all__ = [
    "HandoffMixin",
    "check_actor_file",
    "copy_to",
    "next_alarm_of_file",
    "remove_actor_files",
    "sha256_file",
    "shard_of_path",
]
