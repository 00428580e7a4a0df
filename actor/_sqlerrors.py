"""Translating SQLite's exceptions into the shardlite errors users see."""

from __future__ import annotations

import apsw

from ._errors import (
    BadRequest,
    Constraint,
    Error,
    Forbidden,
    Internal,
    Overloaded,
    QuotaExceeded,
    SqlError,
    Timeout,
    TooLarge,
)
from ._sandbox import Authorizer


def map_error(exc: apsw.Error, auth: Authorizer | None) -> Error:
    """Translate an apsw exception into the shardlite error a user should see."""
    message = str(exc)
    if isinstance(exc, apsw.AuthError):
        reason = auth.denied if auth is not None and auth.denied else message
        if auth is not None:
            auth.denied = None
        return Forbidden(f"not allowed by the sandbox: {reason}")
    if isinstance(exc, (apsw.ConstraintError, apsw.MismatchError)):
        return Constraint(message)
    if isinstance(exc, apsw.InterruptError):
        return Timeout(
            "the statement ran past its time budget and was interrupted; nothing was written"
        )
    if isinstance(exc, apsw.TooBigError):
        return TooLarge(f"{message} (a string, blob or statement is over the configured limit)")
    if isinstance(exc, apsw.FullError):
        return QuotaExceeded(
            "no room to write: the actor's database reached its size quota (delete data to "
            "write again), or the server's disk is full"
        )
    if isinstance(exc, (apsw.BindingsError, apsw.RangeError)):
        return BadRequest(f"bad parameters: {message}")
    if isinstance(exc, apsw.NoMemError):
        return Overloaded("the server is out of SQLite memory; retry later")
    if isinstance(exc, (apsw.SQLError, apsw.ReadOnlyError)):
        return SqlError(message)
    return Internal(f"{type(exc).__name__}: {message}")


__all__ = ["map_error"]
