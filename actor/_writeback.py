"""The operating-system calls the log checkpointer uses to make actor files durable.

``syncfs(2)`` flushes every file of a file system with one disk flush; ``write_back``
first writes the files' dirty pages out in small portions at idle I/O priority (what
PostgreSQL's ``checkpoint_flush_after`` does with the same call, ``sync_file_range(2)``),
so that the syncfs finds little left to write and the shard log's own flush never queues
behind a checkpoint's whole burst of writes (measured at 1,000 keys, 64 in flight: the
burst put the log's p99 at 18-28 ms, against 13 ms with no checkpoint in the window).
All of it is Linux only; elsewhere ``HAVE_SYNCFS`` is False (per-file fsyncs instead) and
``write_back`` does nothing. Blocking: worker threads only.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable, Iterable
from typing import Any

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags
_IOPRIO_WHO_PROCESS = 1  # with id 0: the calling thread
_IOPRIO_CLASS_SHIFT, _IOPRIO_CLASS_IDLE = 13, 3
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (ioprio_set, ioprio_get)


def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes:
        fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_syncfs = _libc_function("syncfs", ctypes.c_int)
_sync_file_range = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint
)
_syscall = _libc_function("syscall")
HAVE_SYNCFS = _syncfs is not None


def syncfs(directory: str) -> None:
    """syncfs(2) on the file system holding ``directory``: every file's written data and
    metadata there reach the disk, with one flush."""
    assert _syncfs is not None
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({directory}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _IdleIO:
    """While inside: the calling thread's I/O at idle priority (served when the disk has
    nothing else queued; the kernel's aging keeps it from starving). A no-op where the
    call is unknown or refused."""

    def __init__(self) -> None:
        self.saved: int | None = None

    def __enter__(self) -> None:
        calls = _IOPRIO_SYSCALLS.get(platform.machine())
        if _syscall is None or calls is None:
            return
        set_, get = calls
        saved = _syscall(get, _IOPRIO_WHO_PROCESS, 0)
        idle = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        if saved >= 0 and _syscall(set_, _IOPRIO_WHO_PROCESS, 0, idle) == 0:
            self.saved = saved

    def __exit__(self, *exc: object) -> None:
        calls = _IOPRIO_SYSCALLS.get(platform.machine())
        if self.saved is not None and _syscall is not None and calls is not None:
            _syscall(calls[0], _IOPRIO_WHO_PROCESS, 0, self.saved)  # a worker thread: restore


def write_back(paths: Iterable[str]) -> None:
    """Write the dirty pages of ``paths`` to the disk (no flush, no metadata) at idle I/O
    priority, waiting for it; missing files are skipped. Not durability by itself: a
    ``syncfs`` afterwards flushes them."""
    if _sync_file_range is None:
        return
    with _IdleIO():
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # checkpointed and closed meanwhile
            try:
                _sync_file_range(fd, 0, 0, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            finally:
                os.close(fd)
