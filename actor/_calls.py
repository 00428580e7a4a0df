"""What an actor's mailbox holds: calls, exclusive entries, and where replies go."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import Error
from ._ops import Inline, Op, Result

if TYPE_CHECKING:
    from ._actor import Actor


class Sink(Protocol):
    """Where a call's result goes: an RPC connection, an HTTP waiter, ..."""

    def deliver(self, tag: Any, result: Result | Error) -> None: ...


class Exclusive:
    """A mailbox entry that needs the actor to itself (delete, export, ...).

    It runs after every call queued before it and before any call queued after it;
    ``fn`` is awaited by the pool while the actor is BUSY, its result is delivered like
    any other call's.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Actor], Awaitable[Any]]) -> None:
        self.fn = fn


class Call:
    """One request in an actor's mailbox."""

    __slots__ = ("idem", "op", "readonly", "sink", "tag")

    def __init__(
        self,
        op: Op | Exclusive | Inline,
        sink: Sink,
        tag: Any = None,
        idem: str | None = None,
        readonly: bool = False,
    ) -> None:
        self.op = op
        self.sink = sink
        self.tag = tag
        self.idem = idem  # an idempotency key
        self.readonly = readonly  # a read-only token: any statement that writes is refused


Replies = tuple[list[Call], list["Result | Error"]]
"""A committed batch's calls and their results, waiting for the output gate."""


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    BUSY = "busy"
    """A blocking operation (checkpoint, close, export) runs in a worker thread."""


def deliver(calls: list[Call], results: list[Result | Error]) -> None:
    """Hand each call its result (the output gate has opened for them)."""
    for call, result in zip(calls, results, strict=True):
        call.sink.deliver(call.tag, result)
