"""The checkpointer's write-back: files' pages written out at idle I/O priority."""

from __future__ import annotations

import os
import platform
import sys

import pytest

from shardlite.actor import _writeback

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux calls")


def _ioprio() -> int:
    assert _writeback._syscall is not None
    return _writeback._syscall(_writeback._IOPRIO_SYSCALLS[platform.machine()][1], 1, 0)


@linux
def test_write_back_keeps_contents_skips_missing_files_and_restores_priority(tmp_path):
    path = tmp_path / "a.db-wal"
    data = os.urandom(3 * 4096 + 100)
    path.write_bytes(data)
    before = _ioprio() if platform.machine() in _writeback._IOPRIO_SYSCALLS else None
    _writeback.write_back([str(path), str(tmp_path / "gone-wal")])
    assert path.read_bytes() == data
    if before is not None:
        assert _ioprio() == before  # worker threads are reused: the idle class must not stick


@linux
def test_idle_io_applies_inside_only():
    if platform.machine() not in _writeback._IOPRIO_SYSCALLS:
        pytest.skip("no ioprio syscall numbers for this machine")
    before = _ioprio()
    guard = _writeback._IdleIO()
    with guard:
        if guard.saved is not None:  # refused in some sandboxes: then nothing changes
            assert _ioprio() >> _writeback._IOPRIO_CLASS_SHIFT == _writeback._IOPRIO_CLASS_IDLE
    assert _ioprio() == before
