"""The small key-value contract the directory needs, and its embedded SQLite backend.

The contract is etcd's, cut to what placement uses: a revisioned key space, prefix
reads, a transaction that puts keys only if others are as expected (compare on
``mod_revision``; 0 means "absent"), leases that expire keys when their holder stops
renewing them, and waiting for the next revision. ``etcd://`` implements it on a real
etcd (``_etcd.py``); ``sqlite:`` here, on one file shared by the processes of one host.

In the SQLite file every write bumps one revision counter in the same transaction, and
a key remembers the revision that last wrote it; a lease is a row with an expiry time
(wall clock: several processes share it), and reads drop the keys of expired leases
first. Waiting polls the revision (``POLL_INTERVAL_S``): there is no cross-process
notification in SQLite, and placement changes are rare.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import apsw
import msgspec
import trio

POLL_INTERVAL_S = 0.2
BUSY_TIMEOUT_MS = 10_000


class DirectoryUnavailable(Exception):
    """The directory cannot be reached or read (etcd down, the file unreadable)."""


class KvEntry(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


class Put(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    lease: int = 0


class Delete(msgspec.Struct, frozen=True):
    key: str


class KvStore(abc.ABC):
    """What the directory runs on (see the module docstring)."""

    url: str

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> tuple[int, list[KvEntry]]:
        """(the store's revision, every live key under ``prefix``, sorted by key)."""

    @abc.abstractmethod
    async def txn(self, compare: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        """Apply ``ops`` atomically iff each ``(key, mod_revision)`` holds (0: absent)."""

    @abc.abstractmethod
    async def grant(self, ttl_s: float) -> int:
        """A new lease; keys put with it vanish ``ttl_s`` after its last renewal."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> bool:
        """Renew; False if the lease had already expired (its keys are gone)."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End the lease now and delete its keys."""

    @abc.abstractmethod
    async def wait_revision(self, after: int, timeout_s: float) -> int:
        """Until the revision passes ``after`` (or the timeout): the revision then."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
    "mod_revision INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0) STRICT",
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, "
    "expires REAL NOT NULL) STRICT",
    "CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "revision INTEGER NOT NULL) STRICT",
    "INSERT OR IGNORE INTO meta VALUES (1, 1)",
)


@contextlib.contextmanager
def _write(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """One write transaction, taking the write lock up front (no upgrade deadlocks)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteKv(KvStore):
    """The embedded directory: one SQLite file (WAL) shared by one host's processes."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite:{self.path}"
        self._conn: apsw.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)  # one connection: one thread at a time

    async def open(self) -> SqliteKv:
        await self._run(self._open_blocking)
        return self

    def _open_blocking(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            conn = apsw.Connection(self.path)
            conn.set_busy_timeout(BUSY_TIMEOUT_MS)
            conn.pragma("journal_mode", "wal")
            conn.pragma("synchronous", "full")  # placement changes are rare and must last
            with _write(conn):  # the write lock up front: several processes start at once
                for sql in _SCHEMA:
                    conn.execute(sql)
        except (apsw.Error, OSError) as exc:
            raise DirectoryUnavailable(f"{self.url}: {exc}") from exc
        self._conn = conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except apsw.Error as exc:
            raise DirectoryUnavailable(f"{self.url}: {exc}") from exc

    @property
    def conn(self) -> apsw.Connection:
        if self._conn is None:
            raise DirectoryUnavailable(f"{self.url}: not open")
        return self._conn

    def _expire(self, conn: apsw.Connection) -> None:
        """Inside a write transaction: drop expired leases and their keys."""
        now = time.time()
        expired = [
            int(r[0]) for r in conn.execute("SELECT id FROM leases WHERE expires < ?", (now,))
        ]
        if expired:
            marks = ",".join("?" * len(expired))
            conn.execute(f"DELETE FROM leases WHERE id IN ({marks})", expired)
            if conn.execute(
                f"SELECT 1 FROM kv WHERE lease IN ({marks}) LIMIT 1", expired
            ).fetchall():
                conn.execute(f"DELETE FROM kv WHERE lease IN ({marks})", expired)
                self._bump(conn)

    @staticmethod
    def _bump(conn: apsw.Connection) -> int:
        conn.execute("UPDATE meta SET revision = revision + 1")
        return int(conn.execute("SELECT revision FROM meta").fetchall()[0][0])  # type: ignore[arg-type]

    def _get_prefix(self, prefix: str) -> tuple[int, list[KvEntry]]:
        conn = self.conn
        with _write(conn):
            self._expire(conn)
            rev = int(conn.execute("SELECT revision FROM meta").fetchall()[0][0])  # type: ignore[arg-type]
            rows = conn.execute(
                "SELECT key, value, mod_revision, lease FROM kv "
                "WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return rev, [KvEntry(str(k), bytes(v), int(m), int(le)) for k, v, m, le in rows]  # type: ignore[arg-type]

    async def get_prefix(self, prefix: str) -> tuple[int, list[KvEntry]]:
        result: tuple[int, list[KvEntry]] = await self._run(self._get_prefix, prefix)
        return result

    def _txn(self, compare: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        conn = self.conn
        with _write(conn):
            self._expire(conn)
            for key, expected in compare:
                row = conn.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchall()
                if (int(row[0][0]) if row else 0) != expected:  # type: ignore[arg-type]
                    return False
            for op in ops:
                if not (isinstance(op, Put) and op.lease):
                    continue
                if not conn.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchall():
                    raise DirectoryUnavailable(f"{self.url}: lease {op.lease} has expired")
            rev = self._bump(conn)
            for op in ops:
                if isinstance(op, Put):
                    conn.execute(
                        "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)",
                        (op.key, op.value, rev, op.lease),
                    )
                else:
                    conn.execute("DELETE FROM kv WHERE key = ?", (op.key,))
        return True

    async def txn(self, compare: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        ok: bool = await self._run(self._txn, compare, ops)
        return ok

    def _grant(self, ttl_s: float) -> int:
        conn = self.conn
        with _write(conn):
            conn.execute(
                "INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl_s, time.time() + ttl_s)
            )
            return int(conn.last_insert_rowid())

    async def grant(self, ttl_s: float) -> int:
        lease: int = await self._run(self._grant, ttl_s)
        return lease

    def _keepalive(self, lease: int) -> bool:
        conn = self.conn
        with _write(conn):
            self._expire(conn)
            conn.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?", (time.time(), lease))
            return conn.changes() == 1

    async def keepalive(self, lease: int) -> bool:
        ok: bool = await self._run(self._keepalive, lease)
        return ok

    def _revoke(self, lease: int) -> None:
        conn = self.conn
        with _write(conn):
            conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
            if conn.execute("SELECT 1 FROM kv WHERE lease = ? LIMIT 1", (lease,)).fetchall():
                conn.execute("DELETE FROM kv WHERE lease = ?", (lease,))
                self._bump(conn)

    async def revoke(self, lease: int) -> None:
        await self._run(self._revoke, lease)

    def _revision(self) -> int:
        conn = self.conn
        rev, expired = conn.execute(
            "SELECT revision, EXISTS (SELECT 1 FROM leases WHERE expires < ?) FROM meta",
            (time.time(),),
        ).fetchall()[0]
        if expired:  # someone has to expire them: every reader takes part
            with _write(conn):
                self._expire(conn)
                rev = conn.execute("SELECT revision FROM meta").fetchall()[0][0]
        return int(rev)  # type: ignore[arg-type]

    async def wait_revision(self, after: int, timeout_s: float) -> int:
        with trio.move_on_after(timeout_s):
            while True:
                rev: int = await self._run(self._revision)
                if rev > after:
                    return rev
                await trio.sleep(POLL_INTERVAL_S)
        rev = await self._run(self._revision)
        return rev

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)


__all__ = ["Delete", "DirectoryUnavailable", "KvEntry", "KvStore", "Put", "SqliteKv"]
