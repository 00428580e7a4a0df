"""Actor keys and the file names derived from them.

A key is the user's name for an actor: any UTF-8 string of 1 to ``MAX_KEY_BYTES`` bytes
without control characters, slashes or backslashes, and not ``.`` or ``..``. The key is
never used raw as a path: its file name is a reversible escape of it (``tenant-1`` ->
``tenant-1.db``, ``Acme Corp`` -> ``~41cme~20~43orp.db``), under a two-hex-digit fan-out
directory taken from a hash of the key, so no directory holds more than 1/256 of a
shard's files. Names too long for the file system end in a hash instead; the key itself
is also stored inside the file and checked on open, so the file name is never trusted.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata

from ._errors import BadRequest

MAX_KEY_BYTES = 256
# ext4 and most file systems allow 255 bytes per name; leave room for ".db-wal".
_MAX_STEM_BYTES = 200
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
DB_SUFFIX = ".db"


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid actor key, else raise :class:`BadRequest`."""
    if not isinstance(key, str):
        raise BadRequest(f"actor key must be a string, got {type(key).__name__}")
    if not key:
        raise BadRequest("actor key is empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("actor key is not valid UTF-8 (lone surrogate)") from None
    if len(raw) > MAX_KEY_BYTES:
        raise BadRequest(f"actor key is {len(raw)} bytes long; the limit is {MAX_KEY_BYTES}")
    for i, ch in enumerate(key):
        if ch in "/\\":
            raise BadRequest(f"actor key {key!r} contains {ch!r} at {i}; keys are not paths")
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            raise BadRequest(f"actor key {key!r} contains control character U+{ord(ch):04X} at {i}")
    if key in (".", ".."):
        raise BadRequest(f"actor key {key!r} is not allowed; keys are not paths")
    return key


def key_hash(key: str) -> bytes:
    """A stable 16-byte hash of the key (also used for slots and fan-out)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def _escape(key: str) -> str:
    out = []
    for i, ch in enumerate(key):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def key_to_relpath(key: str) -> str:
    """The actor file's path relative to its shard directory: ``<fan-out>/<name>.db``."""
    digest = key_hash(key)
    stem = _escape(key)
    if len(stem) > _MAX_STEM_BYTES:
        stem = f"{stem[:120]}~~{digest.hex()}"
    return f"{digest[0]:02x}{os.sep}{stem}{DB_SUFFIX}"


def relpath_to_key(relpath: str) -> str | None:
    """Invert :func:`key_to_relpath` for names that are not hashed; ``None`` otherwise."""
    name = os.path.basename(relpath)
    if not name.endswith(DB_SUFFIX):
        return None
    stem = name[: -len(DB_SUFFIX)]
    if "~~" in stem:
        return None
    out = bytearray()
    i = 0
    while i < len(stem):
        if stem[i] == "~":
            out.append(int(stem[i + 1 : i + 3], 16))
            i += 3
        else:
            out.extend(stem[i].encode())
            i += 1
    return out.decode("utf-8")


def shard_of_path(path: str) -> str:
    """The shard directory of an actor file (``SHARD/xx/name.db``)."""
    return os.path.dirname(os.path.dirname(path))


def resolve_actor_path(shard_dir: str, key: str) -> str:
    """The absolute actor file path for ``key``, checked to stay inside ``shard_dir``."""
    base = os.path.realpath(shard_dir)
    path = os.path.join(base, key_to_relpath(key))
    parent = os.path.realpath(os.path.dirname(path))
    if parent != os.path.dirname(path) or not parent.startswith(base + os.sep):
        # a symlinked fan-out directory, or anything else that would leave the shard
        raise BadRequest(f"actor key {key!r} does not resolve inside its shard directory")
    return path
