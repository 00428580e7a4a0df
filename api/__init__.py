"""shardlite: Durable Objects for Python, on SQLite.

    import shardlite
    with shardlite.connect("rpc://127.0.0.1:7070") as client:
        client.actor("tenant-1").sql("SELECT 1").rows

Errors raised by the client and the server are :class:`shardlite.Error` subclasses with
``code``, ``message`` and ``retryable``.
"""

from shardlite.actor import (
    ActorBase as Actor,
)
from shardlite.actor import (
    App,
    BadRequest,
    Constraint,
    Error,
    Forbidden,
    Internal,
    MethodError,
    MethodNotAllowed,
    Moved,
    NotFound,
    Overloaded,
    QuotaExceeded,
    RateLimited,
    SqlError,
    SqlResult,
    Statement,
    StepFailed,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    Workflow,
    WrongShard,
    method,
    workflow,
)
from shardlite.router import (
    ActorHandle,
    AsyncActorHandle,
    AsyncClient,
    Client,
    ConnectionLost,
    connect,
    connect_async,
)

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorHandle",
    "App",
    "AsyncActorHandle",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectionLost",
    "Constraint",
    "Error",
    "Forbidden",
    "Internal",
    "MethodError",
    "MethodNotAllowed",
    "Moved",
    "NotFound",
    "Overloaded",
    "QuotaExceeded",
    "RateLimited",
    "SqlError",
    "SqlResult",
    "Statement",
    "StepFailed",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Workflow",
    "WrongShard",
    "__version__",
    "connect",
    "connect_async",
    "method",
    "workflow",
]
