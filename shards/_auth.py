"""Access tokens: who may call which keys, with which permission.

A token is a JWT signed with HMAC-SHA256 (the algorithm is pinned: ``none`` and every
other algorithm are refused), with the claims ``key`` (a key or a pattern with ``*``),
``perm`` (``read``, ``write``, ``admin``; each includes the ones before it), ``exp``
(required), ``iat``, ``jti`` (for revocation) and the header ``kid`` naming the key it
was signed with. Keys: every ``--auth-secret`` (shared by the hosts of a cluster), and
the ones in ``DATA/auth-keys.json`` (created on first use, 0600). Revoked token ids live
in the directory, so every process of every host learns them within ``REVOKED_POLL_S``.

``read`` runs statements that do not write (enforced inside SQLite, per statement, as it
runs: see ``Actor._exec_trace``), KV reads, exports and workflow inspection; ``write``
adds writes, KV writes, method calls and deletes; ``admin`` adds the ops verbs. A
process forwards a request for a key another process owns over a peer connection that
authenticated with its own host credential (``perm: peer``), carrying whether the
caller may write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections import OrderedDict
from typing import Any

import jwt

from shardlite.actor import (
    Batch,
    CallMethod,
    Forbidden,
    KvDelete,
    KvGet,
    KvList,
    KvPut,
    RateLimited,
    Sql,
    Unauthorized,
    WorkflowGet,
    WorkflowList,
)
from shardlite.router import wire

ALGORITHM = "HS256"
ISSUER = "shardlite"
KEYS_FILE = "auth-keys.json"
PERMS = ("read", "write", "admin")
PEER = "peer"
_RANK = {"read": 1, "write": 2, "admin": 3, PEER: 4}
MAX_TTL_S = 366 * 24 * 3600.0
REVOKED_POLL_S = 2.0
CACHE_TOKENS = 10_000
PEER_TTL_S = 7 * 24 * 3600.0


NEED: dict[type, str] = {
    Sql: "read",  # a read token's statements may not write (checked as each one runs)
    Batch: "read",
    KvGet: "read",
    KvList: "read",
    WorkflowList: "read",
    WorkflowGet: "read",
    wire.Export: "read",
    wire.GetPlacement: "read",
    KvPut: "write",
    KvDelete: "write",
    CallMethod: "write",
    wire.Delete: "write",
    wire.GetStatus: "admin",
    **dict.fromkeys(wire.ADMIN_OPS, "admin"),
}
"""The permission each operation needs."""
KEYLESS = frozenset((wire.GetPlacement, wire.GetStatus, *wire.ADMIN_OPS))
"""Operations about the server, not one key: any key pattern will do."""


class Claims:
    """What a verified token allows."""

    __slots__ = ("_regex", "exp", "jti", "pattern", "perm")

    def __init__(self, pattern: str, perm: str, exp: float, jti: str) -> None:
        self.pattern = pattern
        self.perm = perm
        self.exp = exp
        self.jti = jti
        self._regex = re.compile(
            "".join(".*" if p == "*" else re.escape(p) for p in re.split(r"(\*)", pattern))
        )

    def covers(self, key: str) -> bool:
        return self.perm == PEER or self._regex.fullmatch(key) is not None

    def allows(self, need: str) -> bool:
        return _RANK[self.perm] >= _RANK[need]

    @property
    def readonly(self) -> bool:
        return self.perm == "read"


def key_id(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:12]


def load_keys(data: str, configured: list[str], *, create: bool) -> dict[str, bytes]:
    """kid -> secret: the configured secrets first, then the data directory's keys (created
    if there are none and ``create``)."""
    keys = {key_id(s.encode()): s.encode() for s in configured if s}
    path = os.path.join(data, KEYS_FILE)
    stored = _read_keys(path)
    if not stored and not keys and create:
        stored = [{"kid": "", "secret": secrets.token_hex(32), "created": time.time()}]
        stored[0]["kid"] = key_id(bytes.fromhex(stored[0]["secret"]))
        _write_keys(path, stored, exclusive=True)
        stored = _read_keys(path)  # another process may have won the race
    for entry in stored:
        keys.setdefault(entry["kid"], bytes.fromhex(entry["secret"]))
    return keys


def _read_keys(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            data: list[dict[str, Any]] = json.load(f)
            return data
    except FileNotFoundError:
        return []


def _write_keys(path: str, keys: list[dict[str, Any]], *, exclusive: bool = False) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if exclusive:
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        os.unlink(tmp)
    else:
        os.replace(tmp, path)


def rotate_keys(data: str, *, retire: str | None = None) -> str:
    """Add a new signing key (the newest signs); ``retire``: drop that key id. Returns
    the new key's id (or the retired one)."""
    path = os.path.join(data, KEYS_FILE)
    stored = _read_keys(path)
    if retire is not None:
        kept = [k for k in stored if k["kid"] != retire]
        if len(kept) == len(stored):
            raise ValueError(f"no key {retire!r} in {path}")
        if not kept:
            raise ValueError("refusing to retire the last key")
        _write_keys(path, kept)
        return retire
    secret = secrets.token_hex(32)
    kid = key_id(bytes.fromhex(secret))
    _write_keys(path, [*stored, {"kid": kid, "secret": secret, "created": time.time()}])
    return kid


def signing_key(data: str, configured: list[str]) -> tuple[str, bytes]:
    """The key new tokens are signed with: the first configured secret, else the data
    directory's newest key (created if there is none)."""
    if configured and configured[0]:
        secret = configured[0].encode()
        return key_id(secret), secret
    load_keys(data, [], create=True)
    stored = _read_keys(os.path.join(data, KEYS_FILE))
    newest = max(stored, key=lambda k: k["created"])
    return newest["kid"], bytes.fromhex(newest["secret"])


def create_token(
    kid: str, secret: bytes, *, pattern: str, perm: str, ttl_s: float, now: float | None = None
) -> tuple[str, dict[str, Any]]:
    """A signed token and its claims."""
    if perm not in (*PERMS, PEER):
        raise ValueError(f"perm must be one of {', '.join(PERMS)}")
    if not pattern:
        raise ValueError("a token needs a key or a key pattern")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"a token's lifetime must be between 1 s and {MAX_TTL_S / 86400:.0f} days")
    now = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "key": pattern,
        "perm": perm,
        "iat": int(now),
        "exp": int(now + ttl_s),
        "jti": secrets.token_hex(12),
    }
    token = jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": kid})
    return token, claims


class Auth:
    """The server's view: verification keys, revoked ids, a cache of verified tokens."""

    def __init__(self, keys: dict[str, bytes], *, required: bool) -> None:
        self.keys = keys
        self.required = required
        self.revoked: set[str] = set()
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self.verified = 0
        self.refused = 0

    def verify(self, token: str | None) -> Claims:
        """The token's claims, or Unauthorized (missing, malformed, forged, expired, revoked)."""
        if not token:
            raise Unauthorized("this server requires a token (Authorization: Bearer ...)")
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            self._cache[token] = claims
            if len(self._cache) > CACHE_TOKENS:
                self._cache.popitem(last=False)
        if claims.exp <= time.time():
            self._cache.pop(token, None)
            self.refused += 1
            raise Unauthorized("the token has expired")
        if claims.jti in self.revoked:
            self.refused += 1
            raise Unauthorized("the token has been revoked")
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            secret = self.keys.get(str(header.get("kid", "")))
            if secret is None:
                raise jwt.InvalidTokenError("it is signed with a key this server does not know")
            data = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "key", "perm"]},
            )
            perm = data["perm"]
            if perm not in _RANK or not isinstance(data["key"], str):
                raise jwt.InvalidTokenError("its claims are not valid")
        except jwt.ExpiredSignatureError:
            self.refused += 1
            raise Unauthorized("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            self.refused += 1
            raise Unauthorized(f"the token is not valid: {exc}") from None
        self.verified += 1
        return Claims(data["key"], perm, float(data["exp"]), str(data["jti"]))

    def check(self, claims: Claims | None, key: str | None, need: str) -> None:
        """Forbidden unless ``claims`` (already verified) allow ``need`` on ``key``."""
        if not self.required:
            return
        if claims is None:
            raise Unauthorized("this server requires a token; send it first on the connection")
        if claims.exp <= time.time():
            raise Unauthorized("the token has expired")
        if claims.jti in self.revoked:
            raise Unauthorized("the token has been revoked")
        if key is not None and not claims.covers(key):
            raise Forbidden(f"the token does not cover actor {key!r}")
        if not claims.allows(need):
            raise Forbidden(f"the token allows {claims.perm}, this needs {need}")


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.limited = 0

    def __call__(self, key: str) -> RateLimited | None:
        """None if ``key`` may send a request now (and count it), else the error."""
        now = time.monotonic()
        buckets = self._buckets
        tokens, last = buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            self.limited += 1
            wait = (1.0 - tokens) / self.rate
            return RateLimited(
                f"actor {key!r} is over its rate limit of {self.rate:g} requests/s",
                retry_after=wait,
            )
        buckets[key] = (tokens - 1.0, now)
        if len(buckets) > self.max_keys:
            buckets.popitem(last=False)  # the least recently seen key starts over, full
        return None


__all__ = [
    "KEYLESS",
    "NEED",
    "PEER",
    "PERMS",
    "Auth",
    "Claims",
    "RateLimiter",
    "create_token",
    "key_id",
    "load_keys",
    "rotate_keys",
    "signing_key",
]
