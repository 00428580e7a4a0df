"""Alarms: one scheduler per process, one small index per shard.

An alarm lives in its actor's own file (``_shardlite_alarms``, written in the same
transaction as the code that set it). The scheduler must also wake actors that are
closed, without opening a million files to find out when: each shard keeps an index,
``alarms.db``, of the next alarm time of every actor that has one. It is a hint: when
a key is due the scheduler submits a fire call, and the actor reads its own table (a
stale entry costs one open; the actor then reports its real next time).

Keeping the index in step with the files (every change is noted inline, right after
the COMMIT that made it, before any await):

* ``durability=os``: the index is ``synchronous=NORMAL`` like the files.
* ``durability=fsync``: the index commits with ``synchronous=FULL``.
* ``durability=log``: ``NORMAL``; the shard's checkpointer fsyncs the index before it
  trims the log, and recovery (which opens every file the log still has records of)
  reports those files' alarms again. A change is thus in the synced index or in the log.

The scheduler is one task with a heap of (time, key); entries are checked against the
current time of the key (``next_at``) when popped, so moving an alarm is a push.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import apsw
import trio

log = logging.getLogger("shardlite.alarms")

INDEX_FILE = "alarms.db"
MAX_FIRING = 1024
"""Fire calls in flight at once; more due keys wait their turn."""
IDLE_WAIT_S = 30.0
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 3600.0
PAUSED_RETRY_S = 0.5


class AlarmIndex:
    """``SHARD/alarms.db``: key -> the time of its next alarm."""

    def __init__(self, directory: str, *, full_sync: bool) -> None:
        self.path = os.path.join(directory, INDEX_FILE)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        new = not os.path.exists(self.path)
        self.conn = apsw.Connection(self.path)
        self.conn.pragma("locking_mode", "exclusive")
        self.conn.pragma("journal_mode", "wal")
        self.conn.pragma("synchronous", "full" if full_sync else "normal")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS alarms (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID"
        )
        if new:
            self.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            _sync_dir(directory)
        self.writes = 0

    def load(self) -> list[tuple[str, float]]:
        return [(str(k), float(a)) for k, a in self.conn.execute("SELECT key, at FROM alarms")]

    def put(self, key: str, at: float | None) -> None:
        if at is None:
            self.conn.execute("DELETE FROM alarms WHERE key = ?", (key,))
        else:
            self.conn.execute("INSERT OR REPLACE INTO alarms (key, at) VALUES (?, ?)", (key, at))
        self.writes += 1

    def sync(self) -> None:
        """Make every write so far durable. Blocking: a worker thread."""
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        _sync_dir(os.path.dirname(self.path))

    def close(self) -> None:
        self.conn.close()


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AlarmScheduler:
    """Wakes actors whose alarms are due (see the module docstring)."""

    def __init__(self, *, full_sync: bool) -> None:
        self.full_sync = full_sync
        self.indexes: dict[str, AlarmIndex] = {}
        self.next_at: dict[str, float] = {}
        self.shard_of: dict[str, str] = {}
        self._heap: list[tuple[float, str]] = []
        self.firing: set[str] = set()
        self._retries: dict[str, int] = {}
        self._wake = trio.Event()
        self.fire: Callable[[str], None] = lambda key: None
        """Submit a fire call for ``key`` (set by the runtime); raises if it cannot."""
        self.fired = 0
        self.paused: set[str] = set()
        """Shards whose alarms wait (a move's cutover holds their requests)."""

    # ------------------------------------------------------------------ the index

    async def attach(self, directory: str, refresh: dict[str, float | None]) -> None:
        """Load the shard's index; apply what recovery found in actor files."""
        if directory in self.indexes:
            return

        def load() -> tuple[AlarmIndex, list[tuple[str, float]]]:
            index = AlarmIndex(directory, full_sync=self.full_sync)
            for key, at in refresh.items():
                index.put(key, at)
            if refresh:
                index.sync()
            return index, index.load()

        index, rows = await trio.to_thread.run_sync(load)
        self.indexes[directory] = index
        for key, at in rows:
            self.shard_of[key] = directory
            self.next_at[key] = at
            self._heap.append((at, key))
        heapq.heapify(self._heap)
        self._wake.set()
        if rows:
            log.info("shard %s: %d actors with alarms", directory, len(rows))

    def detach(self, directory: str) -> None:
        """The shard no longer serves here: forget its index and its keys' alarms."""
        index = self.indexes.pop(directory, None)
        if index is not None:
            index.close()
        for key in [k for k, d in self.shard_of.items() if d == directory]:
            del self.shard_of[key]
            self.next_at.pop(key, None)
            self._retries.pop(key, None)

    def note(self, key: str, directory: str, at: float | None) -> None:
        """``key``'s next alarm is now ``at`` (None: it has none). Inline, after COMMIT."""
        if self.next_at.get(key) == at:
            return
        index = self.indexes.get(directory)
        if index is None:
            log.error("alarm for %r in shard %s, which has no index", key, directory)
            return
        index.put(key, at)
        self._retries.pop(key, None)
        if at is None:
            self.next_at.pop(key, None)
            self.shard_of.pop(key, None)
            return
        old = self.next_at.get(key)
        self.next_at[key] = at
        self.shard_of[key] = directory
        heapq.heappush(self._heap, (at, key))
        if old is None or at < old:
            self._wake.set()
        if len(self._heap) > 2 * len(self.next_at) + 1024:
            self._heap = [(a, k) for k, a in self.next_at.items()]
            heapq.heapify(self._heap)

    def sync_index(self, directory: str) -> None:
        """fsync the shard's index (blocking: the log checkpointer's thread)."""
        index = self.indexes.get(directory)
        if index is not None:
            index.sync()

    def fired_ok(self, key: str) -> None:
        self.firing.discard(key)
        self._retries.pop(key, None)
        self._wake.set()

    def fired_failed(self, key: str, why: str) -> None:
        """The fire call failed (the actor could not open, no class, ...): retry later,
        with exponential backoff, without touching the index."""
        self.firing.discard(key)
        n = self._retries.get(key, 0) + 1
        self._retries[key] = n
        delay = min(RETRY_FIRST_S * 2 ** (n - 1), RETRY_MAX_S)
        log.warning("alarms of %r could not run (%s); retrying in %.0f s", key, why, delay)
        at = time.time() + delay
        if key in self.next_at:
            self.next_at[key] = at
            heapq.heappush(self._heap, (at, key))
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        heap = self._heap
        while True:
            self._wake = trio.Event()
            now = time.time()
            heap = self._heap
            while heap and heap[0][0] <= now and len(self.firing) < MAX_FIRING:
                at, key = heapq.heappop(heap)
                if self.next_at.get(key) != at or key in self.firing:
                    continue
                if self.paused and self.shard_of.get(key) in self.paused:
                    self.next_at[key] = later = now + PAUSED_RETRY_S
                    heapq.heappush(heap, (later, key))  # after now: not popped again here
                    continue
                self.firing.add(key)
                self.fired += 1
                try:
                    self.fire(key)
                except Exception as exc:  # overloaded, shutting down, not ours
                    self.fired_failed(key, str(exc))
            wait = IDLE_WAIT_S
            if heap and len(self.firing) < MAX_FIRING:
                wait = min(wait, max(0.0, heap[0][0] - time.time()))
            with trio.move_on_after(wait):
                await self._wake.wait()

    def close(self) -> None:
        for index in self.indexes.values():
            index.close()
        self.indexes.clear()

    def statistics(self) -> dict[str, Any]:
        return {
            "actors_with_alarms": len(self.next_at),
            "firing": len(self.firing),
            "fired": self.fired,
            "index_writes": sum(i.writes for i in self.indexes.values()),
        }


__all__ = ["INDEX_FILE", "AlarmIndex", "AlarmScheduler"]
