"""The one exception hierarchy of shardlite.

Every error a user can see is an :class:`Error` subclass; each maps to exactly one
error code and one HTTP status (``CONTRACT.md``). The server turns them into
``{"error": {"code", "message", "retryable", ...}}``; the client turns that shape back
into the same class, so ``except shardlite.Constraint`` works on both sides.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Error(Exception):
    """Base of every shardlite error: carries ``code``, ``message`` and ``retryable``."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The error in the wire shape (the inner object of ``{"error": ...}``)."""
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        out.update(self.details)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(Error):
    """The request is malformed: bad JSON/msgpack, unknown fields, wrong types, bad key."""

    code = "bad_request"
    status = 400


class Unauthorized(Error):
    """No credential, or one that is not valid."""

    code = "unauthorized"
    status = 401


class Forbidden(Error):
    """The credential is valid but does not allow this operation."""

    code = "forbidden"
    status = 403


class NotFound(Error):
    """No such path, actor or KV entry."""

    code = "not_found"
    status = 404


class MethodNotAllowed(Error):
    """The path exists but not with this HTTP method."""

    code = "method_not_allowed"
    status = 405


class SqlError(Error):
    """SQLite rejected the statement (syntax, unknown table, denied by the sandbox, ...)."""

    code = "sql_error"
    status = 400


class Constraint(Error):
    """A constraint failed (UNIQUE, NOT NULL, CHECK, FOREIGN KEY); nothing was written."""

    code = "constraint"
    status = 409


class TooLarge(Error):
    """The request or its result is larger than the configured limit."""

    code = "too_large"
    status = 413


class QuotaExceeded(Error):
    """The actor's file reached its size quota; reads and deletes still work."""

    code = "quota_exceeded"
    status = 507


class Timeout(Error):
    """The statement ran past its time budget and was interrupted; nothing was written."""

    code = "timeout"
    status = 504


class Overloaded(Error):
    """The actor's mailbox is full; retry after ``retry_after`` seconds."""

    code = "overloaded"
    status = 503
    retryable = True

    def __init__(self, message: str, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """The key sent more requests than its rate limit allows; retry after ``retry_after``."""

    code = "rate_limited"
    status = 429


class Unavailable(Error):
    """The server is shutting down or the actor is temporarily unavailable; retry."""

    code = "unavailable"
    status = 503
    retryable = True


class ActorDamaged(Unavailable):
    """The actor's file lacks acknowledged writes, or holds what its log records cannot
    apply to (found by recovery): not served until an operator restores it or accepts
    what it holds. Not retryable: retrying cannot help."""

    retryable = False


class Moved(Error):
    """The key now lives elsewhere; ``location`` says where. Retry there."""

    code = "moved"
    status = 421
    retryable = True


class WrongShard(Error):
    """The request reached a server that does not own the key's shard at this epoch."""

    code = "wrong_shard"
    status = 421
    retryable = True


class Internal(Error):
    """A bug or an unexpected failure inside shardlite; the details are in the server log."""

    code = "internal"
    status = 500


class MethodError(Error):
    """An actor-class method (or alarm handler) raised an exception of its own; the
    message names the exception. Its writes were rolled back."""

    code = "method_error"
    status = 500


class StepFailed(Error):
    """A workflow step failed after its retries (raised into the workflow body)."""

    code = "step_failed"
    status = 500


def no_class_error(key: str, op: Any) -> NotFound:
    """The error for a class operation (a method call) on a key no actor class serves."""
    method = getattr(op, "method", None)
    has = f", so it has no method {method!r}" if isinstance(method, str) else ""
    return NotFound(
        f"no actor class serves {key!r}{has} (actor classes are configured with "
        "`shardlite serve --app MODULE:CLASS`)"
    )


ERRORS_BY_CODE: dict[str, type[Error]] = {
    cls.code: cls
    for cls in (
        Error,
        MethodError,
        StepFailed,
        RateLimited,
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        SqlError,
        Constraint,
        TooLarge,
        QuotaExceeded,
        Timeout,
        Overloaded,
        Unavailable,
        Moved,
        WrongShard,
        Internal,
    )
}


def error_from_dict(data: dict[str, Any]) -> Error:
    """Rebuild an :class:`Error` from its wire shape (unknown codes become ``Error``)."""
    code = str(data.get("code", "internal"))
    message = str(data.get("message", ""))
    details = {k: v for k, v in data.items() if k not in ("code", "message", "retryable")}
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = Error(message, **details)
        err.code = code  # type: ignore[misc]
        return err
    if issubclass(cls, Overloaded):
        retry_after = float(details.pop("retry_after", 1.0))
        err = cls(message, retry_after=retry_after, **details)
    else:
        err = cls(message, **details)
    if "retryable" in data and bool(data["retryable"]) != err.retryable:
        err.retryable = bool(data["retryable"])  # type: ignore[misc]  # (ActorDamaged, say)
    return err
