"""Hardening of every SQLite connection shardlite opens (research/reliability.md §2).

Tenants are untrusted: their SQL runs under an authorizer allow-list, with every
``SQLITE_LIMIT_*`` set, DEFENSIVE on, trusted_schema off, no ATTACH, no extensions, no
temp objects, no transaction control (the actor owns transactions) and no access to
shardlite's own ``_shardlite_*`` tables. The actor's own statements carry a per-process
nonce in a comment, so a tenant can neither submit the same text nor reuse one of their
cached prepared statements: SQLite only consults the authorizer when it prepares.
"""

from __future__ import annotations

import secrets

import apsw

from ._config import ActorConfig

INTERNAL_PREFIX = "_shardlite_"
_NONCE = secrets.token_hex(8)


def internal_sql(sql: str) -> str:
    """Mark one of shardlite's own statements (see the module docstring)."""
    return f"/*shardlite:{_NONCE}*/ {sql}"


# Pragmas a tenant may use. Those in PRAGMAS_ARG take a table, index or count argument
# (a question, not a setting); ``user_version`` and ``application_id`` may be set (they
# are the tenant's own schema-version slots in the file header); the rest are read-only.
PRAGMAS_ARG = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "quick_check",
        "integrity_check",
    }
)
PRAGMAS_WRITE = frozenset({"user_version", "application_id"})
PRAGMAS_READ = (
    PRAGMAS_ARG
    | PRAGMAS_WRITE
    | frozenset({"collation_list", "page_count", "page_size", "freelist_count", "data_version"})
)
VTAB_MODULES = frozenset({"fts5", "fts5vocab", "rtree"})
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "sqlite_offset"})

_OK = apsw.SQLITE_OK
_DENY = apsw.SQLITE_DENY
_NAMES: dict[int, str] = {
    k: str(v) for k, v in apsw.mapping_authorizer_function.items() if isinstance(k, int)
}

# op -> index (0 or 1) of the argument that names a table, for the hidden-table check
_TABLE_ARG = {
    "SQLITE_READ": 0,
    "SQLITE_INSERT": 0,
    "SQLITE_UPDATE": 0,
    "SQLITE_DELETE": 0,
    "SQLITE_CREATE_TABLE": 0,
    "SQLITE_DROP_TABLE": 0,
    "SQLITE_CREATE_VIEW": 0,
    "SQLITE_DROP_VIEW": 0,
    "SQLITE_CREATE_INDEX": 1,
    "SQLITE_DROP_INDEX": 1,
    "SQLITE_CREATE_TRIGGER": 1,
    "SQLITE_DROP_TRIGGER": 1,
    "SQLITE_ALTER_TABLE": 1,
    "SQLITE_CREATE_VTABLE": 0,
    "SQLITE_DROP_VTABLE": 0,
}
_ALWAYS_DENIED = frozenset(
    {
        "SQLITE_ATTACH",
        "SQLITE_DETACH",
        "SQLITE_TRANSACTION",
        "SQLITE_SAVEPOINT",
        "SQLITE_CREATE_TEMP_INDEX",
        "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER",
        "SQLITE_CREATE_TEMP_VIEW",
        "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE",
        "SQLITE_DROP_TEMP_TRIGGER",
        "SQLITE_DROP_TEMP_VIEW",
    }
)


# Writes the row capture of the shard log cannot describe (see _capture.py).
_SCHEMA_OPS = frozenset(
    {
        "SQLITE_CREATE_INDEX",
        "SQLITE_CREATE_TABLE",
        "SQLITE_CREATE_TRIGGER",
        "SQLITE_CREATE_VIEW",
        "SQLITE_CREATE_VTABLE",
        "SQLITE_DROP_INDEX",
        "SQLITE_DROP_TABLE",
        "SQLITE_DROP_TRIGGER",
        "SQLITE_DROP_VIEW",
        "SQLITE_DROP_VTABLE",
        "SQLITE_ALTER_TABLE",
        "SQLITE_ANALYZE",
        "SQLITE_REINDEX",
    }
)


def _is_hidden(name: str | None) -> bool:
    return name is not None and name.lower().startswith(INTERNAL_PREFIX)


class Authorizer:
    """The tenant allow-list. ``trusted`` is set only while the actor runs its own SQL."""

    __slots__ = ("denied", "schema_op", "trusted")

    def __init__(self) -> None:
        self.trusted = False
        self.denied: str | None = None
        self.schema_op = False
        """A tenant statement just prepared changes the schema or the file header."""

    def __call__(
        self, op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None
    ) -> int:
        if self.trusted:
            return _OK
        name = _NAMES.get(op, "")
        reason = self._check(name, p1, p2, dbname)
        if reason is None:
            if name in _SCHEMA_OPS or (
                name == "SQLITE_PRAGMA" and p2 is not None and (p1 or "").lower() in PRAGMAS_WRITE
            ):
                self.schema_op = True
            return _OK
        self.denied = reason
        return _DENY

    @staticmethod
    def _check(name: str, p1: str | None, p2: str | None, dbname: str | None) -> str | None:
        if name in _ALWAYS_DENIED:
            if name in ("SQLITE_TRANSACTION", "SQLITE_SAVEPOINT"):
                return "transaction control is not allowed: each request is its own transaction"
            if name in ("SQLITE_ATTACH", "SQLITE_DETACH"):
                return "ATTACH, DETACH and VACUUM INTO are not allowed"
            return "temporary tables, views, indexes and triggers are not allowed"
        if dbname == "temp":
            return "the temp schema is not available"
        if name == "SQLITE_PRAGMA":
            pragma = (p1 or "").lower()
            if pragma not in PRAGMAS_READ or (
                p2 is not None and pragma not in PRAGMAS_WRITE and pragma not in PRAGMAS_ARG
            ):
                return f"PRAGMA {pragma} is not allowed"
            return None
        if name == "SQLITE_FUNCTION":
            if (p2 or "").lower() in DENIED_FUNCTIONS:
                return f"function {p2}() is not allowed"
            return None
        if name == "SQLITE_CREATE_VTABLE" and (p2 or "").lower() not in VTAB_MODULES:
            return f"virtual table module {p2!r} is not allowed (allowed: fts5, rtree)"
        idx = _TABLE_ARG.get(name)
        if idx is not None and _is_hidden(p1 if idx == 0 else p2):
            return f"{INTERNAL_PREFIX}* tables belong to shardlite"
        if name in ("SQLITE_CREATE_INDEX", "SQLITE_CREATE_TRIGGER") and _is_hidden(p1):
            return f"{INTERNAL_PREFIX}* names belong to shardlite"
        return None


_DBCONFIG = (
    (apsw.SQLITE_DBCONFIG_DEFENSIVE, 1),
    (apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0),
    (apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0),
    (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, 0),
    (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, 0),
    (apsw.SQLITE_DBCONFIG_DQS_DML, 0),
    (apsw.SQLITE_DBCONFIG_DQS_DDL, 0),
)


def limits_for(config: ActorConfig) -> dict[int, int]:
    """Every ``SQLITE_LIMIT_*``, set explicitly: this apsw build's maxima are not the defaults."""
    return {
        apsw.SQLITE_LIMIT_LENGTH: config.max_value_bytes,
        apsw.SQLITE_LIMIT_SQL_LENGTH: config.max_sql_bytes,
        apsw.SQLITE_LIMIT_COLUMN: 1000,
        apsw.SQLITE_LIMIT_EXPR_DEPTH: 200,
        apsw.SQLITE_LIMIT_PARSER_DEPTH: 200,
        apsw.SQLITE_LIMIT_COMPOUND_SELECT: 50,
        apsw.SQLITE_LIMIT_VDBE_OP: 1_000_000,
        apsw.SQLITE_LIMIT_FUNCTION_ARG: 100,
        apsw.SQLITE_LIMIT_ATTACHED: 0,
        apsw.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1000,
        apsw.SQLITE_LIMIT_VARIABLE_NUMBER: 999,
        apsw.SQLITE_LIMIT_TRIGGER_DEPTH: 10,
        apsw.SQLITE_LIMIT_TRIGGER_STEPS: 10_000,
        apsw.SQLITE_LIMIT_SCHEMA: 1_000_000,
        apsw.SQLITE_LIMIT_WORKER_THREADS: 0,
    }


def harden(conn: apsw.Connection, config: ActorConfig) -> Authorizer:
    """Apply every per-connection control and install the authorizer (last)."""
    for op, value in _DBCONFIG:
        if conn.config(op, value) != value:
            raise RuntimeError(f"SQLite refused db_config {op}={value}")
    conn.enable_load_extension(False)
    for limit, value in limits_for(config).items():
        conn.limit(limit, value)
    conn.drop_modules(list(VTAB_MODULES))
    conn.pragma("cell_size_check", True)
    conn.pragma("mmap_size", 0)
    # temporary storage in memory, where _progress measures it (--max-temp-bytes): a
    # temp file would grow on the disk, bounded by nothing per tenant
    conn.pragma("temp_store", "memory")
    # not stored in the file: set on every open (and denied to tenants)
    page_size = int(conn.pragma("page_size"))
    conn.pragma("max_page_count", max(config.max_db_bytes // page_size, 16))
    authorizer = Authorizer()
    conn.authorizer = authorizer
    return authorizer
