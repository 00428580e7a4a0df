"""Actor-test fixtures, and a VFS that remembers what a power cut would keep.

:class:`PowerCutVFS` keeps only data followed by a sync.

Every write and truncate goes through to the real file and is also queued per path;
``xSync`` applies the queue to the path's *durable image*. ``cut()`` drops everything
from then on; ``restore()`` then rewrites each file as its durable image, which is what
the disk would hold after the power came back. This is the fault-injection seam the
durability tests use: the flusher's sync is pointed at :meth:`PowerCutVFS.sync_path`.

The flusher and the checkpointer sync from worker threads while the event loop writes:
a lock makes each write and each sync whole (a write queued between a sync's reading
of the queue and its emptying would be lost from the image for good).

Simplification: unlinks (SQLite deleting a WAL after a checkpoint on close) are taken
as durable at once; directory entries are not modelled.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from typing import Any

import apsw
import pytest


class PowerCutVFS(apsw.VFS):
    def __init__(self, name: str = "powercut") -> None:
        self.vfs_name = name
        self.durable: dict[str, bytearray | None] = {}
        self.pending: dict[str, list[tuple[str, int, bytes]]] = {}
        self.is_cut = False
        self.syncs = 0
        self.lock = threading.Lock()
        super().__init__(name, "")

    # --- tracking

    def track(self, path: str) -> None:
        if path not in self.durable:
            try:
                with open(path, "rb") as f:
                    self.durable[path] = bytearray(f.read())
            except FileNotFoundError:
                self.durable[path] = None
            self.pending[path] = []

    def sync_path(self, path: str) -> None:
        """Make every write to ``path`` so far durable (what fdatasync does)."""
        with self.lock:
            self._sync_locked(path)

    def _sync_locked(self, path: str) -> None:
        if self.is_cut:
            return
        self.track(path)
        image = self.durable[path]
        if image is None:
            image = bytearray()
        for op, offset, data in self.pending[path]:
            if op == "w":
                end = offset + len(data)
                if len(image) < end:
                    image.extend(b"\0" * (end - len(image)))
                image[offset:end] = data
            else:
                del image[offset:]
        self.durable[path] = image
        self.pending[path] = []
        self.syncs += 1

    def cut(self) -> None:
        self.is_cut = True

    def revive(self) -> None:
        """Power is back (after :meth:`restore`): what is on disk is durable."""
        for path in self.pending:
            self.pending[path] = []
        self.is_cut = False

    def restore(self) -> None:
        """Put every tracked file back to its durable image (None: the file never was)."""
        for path, image in self.durable.items():
            if image is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                with open(path, "wb") as f:
                    f.write(image)

    # --- apsw.VFS

    def xOpen(self, name: Any, flags: list[int]) -> PowerCutFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        return PowerCutFile(self, path, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        with self.lock:
            if not self.is_cut:
                super().xDelete(filename, syncdir)
                self.durable[filename] = None
                self.pending[filename] = []


class PowerCutFile(apsw.VFSFile):
    def __init__(self, vfs: PowerCutVFS, path: str | None, name: Any, flags: list[int]) -> None:
        self._vfs = vfs
        self._path = path
        if path is not None:
            with vfs.lock:
                vfs.track(path)
        super().__init__("", name, flags)

    def xWrite(self, data: bytes, offset: int) -> None:
        with self._vfs.lock:
            if self._vfs.is_cut:
                return
            super().xWrite(data, offset)
            if self._path is not None:
                self._vfs.pending[self._path].append(("w", offset, bytes(data)))

    def xTruncate(self, newsize: int) -> None:
        with self._vfs.lock:
            if self._vfs.is_cut:
                return
            super().xTruncate(newsize)
            if self._path is not None:
                self._vfs.pending[self._path].append(("t", newsize, b""))

    def xSync(self, flags: int) -> None:
        if self._vfs.is_cut:
            return
        super().xSync(flags)
        if self._path is not None:
            self._vfs.sync_path(self._path)


_names = itertools.count()


@pytest.fixture
def powercut() -> Iterator[PowerCutVFS]:
    vfs = PowerCutVFS(f"powercut{next(_names)}")
    yield vfs
    vfs.unregister()
