"""The actor tests' one wait for a condition that background work (worker threads, the
pool's tasks) makes true: polled, bounded, never a fixed sleep."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import trio

POLL_S = 0.005


async def wait_until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` (a plain or an async function) until it returns something true, and
    return that; fail after ``timeout`` seconds.

    Bounded in wall-clock time, not trio's: under an autojump clock, virtual time flies
    past any bound while a worker thread is still busy on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await trio.sleep(POLL_S)
