"""Opening an actor's SQLite file: flags, pragmas, sandbox, and the key stored inside."""

from __future__ import annotations

import os

import apsw

from ._config import ACTOR_VFS, ActorConfig
from ._errors import ActorDamaged, Internal, NotFound
from ._idempotency import IDEM_DDL
from ._sandbox import Authorizer, harden, internal_sql

FORMAT_VERSION = 1
_OPEN_FLAGS = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW | apsw.SQLITE_OPEN_EXRESCODE

META_DDL = internal_sql(
    "CREATE TABLE IF NOT EXISTS _shardlite_meta (name TEXT PRIMARY KEY, value ANY) STRICT, WITHOUT ROWID"
)
KV_DDL = internal_sql(
    "CREATE TABLE IF NOT EXISTS _shardlite_kv (name TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT, WITHOUT ROWID"
)
LSN_DDL = internal_sql(
    "CREATE TABLE IF NOT EXISTS _shardlite_lsn "
    "(id INTEGER PRIMARY KEY CHECK (id = 1), lsn INTEGER NOT NULL) STRICT"
)
_LSN_INIT = internal_sql("INSERT OR IGNORE INTO _shardlite_lsn (id, lsn) VALUES (1, ?)")
LSN_GET = internal_sql("SELECT lsn FROM _shardlite_lsn WHERE id = 1")
LSN_SET = internal_sql("UPDATE _shardlite_lsn SET lsn = ? WHERE id = 1")
"""The shard-log position the file holds (durability=log), written with each batch."""
LSN_NUDGE = internal_sql("UPDATE _shardlite_lsn SET lsn = lsn + ? WHERE id = 1")
"""By +1 then -1 in one transaction: a write that leaves the file as it was and still
fills a WAL frame (SQLite writes no page for an UPDATE that rewrites the same bytes)."""
META_GET = internal_sql("SELECT value FROM _shardlite_meta WHERE name = ?")
META_PUT = internal_sql("INSERT OR REPLACE INTO _shardlite_meta (name, value) VALUES (?, ?)")
DAMAGED_SUFFIX = ".damaged"
"""Beside an actor file: why recovery could not bring it up to its log (UTF-8 text).
While it is there the actor is not opened (``ActorDamaged``)."""
_HAS_META = internal_sql(
    "SELECT count(*) FILTER (WHERE name = '_shardlite_meta'), count(*) FROM sqlite_schema WHERE type = 'table'"
)


def open_actor_db(
    path: str, key: str, config: ActorConfig, *, create: bool, initial_lsn: int = 0
) -> tuple[apsw.Connection, Authorizer]:
    """Open (or create) the actor file at ``path`` for ``key``, hardened and checked.

    WAL with ``locking_mode=EXCLUSIVE`` (one connection per file: no shared-memory
    locking, half the cost of a small transaction), ``synchronous=NORMAL`` (durability is
    the actor's job, see DESIGN.md), no autocheckpoint (checkpoints run off the loop),
    and a WAL kept for reuse after a checkpoint, trimmed to twice ``checkpoint_wal_bytes``.
    """
    damage = read_damage(path)
    if damage is not None:
        raise ActorDamaged(f"actor {key!r} is not served: {damage}")
    exists = os.path.lexists(path)
    if not exists and not create:
        raise NotFound(f"actor {key!r} does not exist")
    if not exists:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    flags = _OPEN_FLAGS | (apsw.SQLITE_OPEN_CREATE if create else 0)
    conn = apsw.Connection(path, flags=flags, vfs=config.vfs or ACTOR_VFS)
    try:
        conn.pragma("locking_mode", "exclusive")
        if not exists:  # takes effect with the first write, the WAL switch below
            conn.pragma("page_size", config.page_size)
        # a new file: the header change is synced under the default synchronous=FULL
        if conn.pragma("journal_mode") != "wal" and conn.pragma("journal_mode", "wal") != "wal":
            raise Internal(f"could not put {path} in WAL mode")
        conn.pragma("synchronous", "normal")
        conn.wal_autocheckpoint(0)
        # the WAL is reused after each checkpoint (Actor.checkpoint_blocking), not
        # truncated: this bounds what a large batch leaves of it
        conn.pragma("journal_size_limit", 2 * config.checkpoint_wal_bytes)
        authorizer = harden(conn, config)
        _check_or_init_meta(conn, authorizer, key, path, initial_lsn)
        conn.set_last_insert_rowid(0)  # the tenant sees only its own inserts' rowids
    except BaseException:
        conn.close()
        raise
    return conn, authorizer


def read_damage(path: str) -> str | None:
    """Why the actor file at ``path`` is not served (None: it is)."""
    try:
        with open(path + DAMAGED_SUFFIX, encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "recovery found it damaged"
    except FileNotFoundError:
        return None


def _check_or_init_meta(
    conn: apsw.Connection, auth: Authorizer, key: str, path: str, initial_lsn: int
) -> None:
    auth.trusted = True
    try:
        has_meta, tables = conn.execute(_HAS_META).fetchall()[0]
        if has_meta:
            rows = conn.execute(META_GET, ("key",)).fetchall()
            if rows and rows[0][0] == key:
                if not conn.table_exists("main", "_shardlite_idem"):
                    with conn:  # a file from an earlier version of shardlite
                        conn.execute(LSN_DDL)
                        conn.execute(_LSN_INIT, (0,))
                        conn.execute(IDEM_DDL)
                return
            if rows:
                raise Internal(
                    f"{path} belongs to actor {rows[0][0]!r}, not {key!r}; refusing to serve it"
                )
        elif tables:
            raise Internal(f"{path} is not a shardlite actor file (no _shardlite_meta table)")
        # new, or a creation interrupted by a crash before its first commit
        with conn:
            conn.execute(META_DDL)
            conn.execute(KV_DDL)
            conn.execute(LSN_DDL)
            conn.execute(_LSN_INIT, (initial_lsn,))
            conn.execute(IDEM_DDL)
            conn.execute(META_PUT, ("key", key))
            conn.execute(META_PUT, ("format", FORMAT_VERSION))
    finally:
        auth.trusted = False
