"""Shard log segments on disk: zero-filled segments (init_zero), their clean end, torn
records inside them, damage to a completed segment, and the spare that becomes the next
segment (docs/shardlog.md)."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from shardlite.actor import _shardlog as shardlog_module
from shardlite.actor._shardlog import (
    MAGIC,
    RECORD_HEADER,
    RECORD_HEADER_V1,
    SEGMENT_HEADER,
    SEGMENT_HEADER_V1,
    LogCorrupt,
    LogDamaged,
    ShardLog,
    encode_record,
    verify_log,
)

SEGMENT = 8 * 1024


def _write(log: ShardLog, key: str, payload: bytes) -> bytes:
    lsn = log.reserve()
    record = encode_record(lsn, key, payload, prev=lsn - 1)
    log.write(record, lsn)
    return record


def _reopen(directory: Path) -> tuple[ShardLog, dict[str, list[bytes]], int]:
    log = ShardLog(str(directory), SEGMENT)
    recovered = log.open()
    payloads = {k: [r.payload for r in rs] for k, rs in recovered.records.items()}
    return log, payloads, recovered.torn


def test_a_zero_filled_segment_holds_its_records_and_ends_cleanly_at_its_zeros(
    tmp_path: Path,
) -> None:
    log = ShardLog(str(tmp_path), SEGMENT, init_zero=True)
    log.open()
    sent = [_write(log, "k", f"row {i}".encode()) for i in range(5)]
    ((_, segment),) = log.segments
    assert os.path.getsize(segment) == SEGMENT  # the records went over the zeros
    assert log.size_bytes() == SEGMENT_HEADER.size + sum(map(len, sent))
    log.close()

    again, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [f"row {i}".encode() for i in range(5)]}
    assert torn == 0
    # the old segment counts its records, not its zeros; the new one its header
    assert again.size_bytes() == 2 * SEGMENT_HEADER.size + sum(map(len, sent))
    again.close()


def test_a_torn_record_in_a_zero_filled_segment_ends_it_and_is_ignored(tmp_path: Path) -> None:
    log = ShardLog(str(tmp_path), SEGMENT, init_zero=True)
    log.open()
    sent = [_write(log, "k", bytes([i]) * 100) for i in range(3)]
    ((_, segment),) = log.segments
    log.close()
    # the last record's tail never reached the disk: zeros where its end was
    third = SEGMENT_HEADER.size + len(sent[0]) + len(sent[1])
    with open(segment, "r+b") as f:
        f.seek(third + RECORD_HEADER.size + 50)
        f.write(bytes(len(sent[2]) - RECORD_HEADER.size - 50))

    again, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [bytes([0]) * 100, bytes([1]) * 100]}
    assert torn == 1
    again.close()


def test_a_record_cut_at_any_byte_is_ignored_and_the_records_before_it_are_read(
    tmp_path: Path,
) -> None:
    """A crash can end a segment anywhere in its last record (appended, not zero-filled):
    the records before it are read, the cut one is torn, unless all that is left of it
    is zeros (the high bytes of its length), which read as the clean end they look like."""
    original = tmp_path / "original"
    log = ShardLog(str(original), SEGMENT)
    log.open()
    sent = [_write(log, "k", bytes([i]) * 40) for i in range(3)]
    ((_, segment),) = log.segments
    log.close()
    third = SEGMENT_HEADER.size + len(sent[0]) + len(sent[1])
    name = os.path.basename(segment)
    for cut in range(1, len(sent[2])):
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(original, copy)
        os.truncate(copy / name, third + cut)
        again, payloads, torn = _reopen(copy)
        again.close()
        assert payloads == {"k": [bytes([0]) * 40, bytes([1]) * 40]}, cut
        assert torn == (0 if not any(sent[2][:cut]) else 1), cut
    # a record too short to hold its key's length, checksum and all: corrupt, not a crash
    body = b"\0"
    lsn = 3 << shardlog_module.SEQ_BITS
    checked = struct.pack(">QBQ", lsn, shardlog_module.TYPE_ROWS, 0)
    header = RECORD_HEADER.pack(
        len(body), zlib.crc32(body, zlib.crc32(checked)), lsn, shardlog_module.TYPE_ROWS, 0, 0, 0
    )
    copy = tmp_path / "short"
    shutil.copytree(original, copy)
    os.truncate(copy / name, third)
    with open(copy / name, "ab") as f:
        f.write(header + body)
    again, payloads, torn = _reopen(copy)
    again.close()
    assert payloads == {"k": [bytes([0]) * 40, bytes([1]) * 40]}
    assert torn == 1


def test_the_spare_becomes_the_next_segment_and_nothing_is_left_of_it(tmp_path: Path) -> None:
    log = ShardLog(str(tmp_path), SEGMENT, init_zero=True)
    log.open()
    assert not log.wants_spare()  # not while the active segment is under half full
    payload = b"x" * 500
    count = 0
    while not log.wants_spare():
        _write(log, "k", payload)
        count += 1
    log.prepare_spare()
    (spare,) = tmp_path.glob("*.zero")
    inode = spare.stat().st_ino
    assert spare.stat().st_size == SEGMENT
    assert not log.wants_spare()
    while len(log.segments) == 1:
        _write(log, "k", payload)
        count += 1
    _, second = log.segments[1]
    assert os.stat(second).st_ino == inode  # the spare, under its segment name
    assert not spare.exists()
    assert log.spares_used == 2  # the first segment was one too (prepared at open)
    _write(log, "k", b"after the switch")
    log.close()

    again, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [payload] * count + [b"after the switch"]}
    assert torn == 0
    again.close()


def test_closing_the_log_deletes_a_prepared_spare(tmp_path: Path) -> None:
    log = ShardLog(str(tmp_path), SEGMENT, init_zero=True)
    log.open()
    log.prepare_spare()
    assert len(list(tmp_path.glob("*.zero"))) == 1
    log.close()
    assert not list(tmp_path.glob("*.zero"))


def test_a_spare_left_by_a_crash_is_deleted_when_the_log_opens(tmp_path: Path) -> None:
    (tmp_path / "next-1.zero").write_bytes(b"half of a zero-fill, never synced")
    log = ShardLog(str(tmp_path), SEGMENT)
    log.open()
    assert not list(tmp_path.glob("*.zero"))
    assert [p.name for p in tmp_path.glob("*.log")] == [os.path.basename(log.segments[0][1])]
    log.close()


def test_without_init_zero_segments_grow_as_records_are_appended(tmp_path: Path) -> None:
    log = ShardLog(str(tmp_path), SEGMENT)
    log.open()
    record = _write(log, "k", b"appended")
    ((_, segment),) = log.segments
    assert os.path.getsize(segment) == SEGMENT_HEADER.size + len(record)
    assert not log.wants_spare()
    log.close()
    again, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [b"appended"]} and torn == 0
    again.close()


def _tear(segment: str, at: int, size: int) -> None:
    """Zeros over ``size`` bytes of ``segment`` from ``at``: pages that never reached the disk."""
    with open(segment, "r+b") as f:
        f.seek(at)
        f.write(bytes(size))


def test_damage_inside_a_completed_segment_stops_the_log_from_opening(tmp_path: Path) -> None:
    """A segment followed by one of the same run was completed: every record in it had
    been fdatasync'ed and acknowledged. A record there that no longer reads is damage,
    not a torn tail, and replaying the later records over the hole would build states
    that never existed: opening fails, naming the segment and the LSNs lost."""
    log = ShardLog(str(tmp_path), 512)
    log.open()
    sent = [_write(log, "k", bytes([i]) * 200) for i in range(9)]  # three per segment
    segments = [path for _, path in log.segments]
    assert len(segments) == 4  # three full ones and the active one
    log.close()
    # one bit of the second segment's first record flips on the disk
    with open(segments[1], "r+b") as f:
        f.seek(SEGMENT_HEADER.size + RECORD_HEADER.size + 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))

    with pytest.raises(LogDamaged, match="acknowledged and are lost") as caught:
        ShardLog(str(tmp_path), 512).open()
    assert segments[1] in str(caught.value)
    lost = [int.from_bytes(record[8:16], "big") for record in sent[3:6]]
    assert f"from LSN {lost[0]:#x} to {lost[-1]:#x}" in str(caught.value)

    # the remedy the message gives: move the damaged segment and every later one away
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in segments[1:]:
        shutil.move(path, aside)
    log, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [bytes([i]) * 200 for i in range(3)]} and torn == 0
    log.close()


def test_a_torn_tail_in_a_runs_last_segment_is_a_crash_not_damage(tmp_path: Path) -> None:
    """The segment a run was writing when it crashed ends torn, and the next run starts
    a segment of its own after it (a higher epoch): that is no hole."""
    log = ShardLog(str(tmp_path), SEGMENT, init_zero=True)
    log.open()
    sent = [_write(log, "k", bytes([i]) * 100) for i in range(3)]
    ((_, crashed),) = log.segments
    log.close()
    second = SEGMENT_HEADER.size + len(sent[0])
    _tear(crashed, second + RECORD_HEADER.size, len(sent[1]) - RECORD_HEADER.size)
    again, _, _ = _reopen(tmp_path)  # the next run, which writes on
    _write(again, "k", b"next run")
    again.close()

    log, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [bytes([0]) * 100, b"next run"]}
    assert torn == 1
    recovered = ShardLog(str(tmp_path), SEGMENT).open()
    (where,) = recovered.torn_segments
    assert (where.path, where.offset) == (crashed, second)
    assert where.ignored_bytes == len(sent[1]) + len(sent[2])  # the zeros after are not counted
    log.close()


class _FailingSync:
    """``os`` for the log module, whose next fdatasync fails once armed."""

    def __init__(self) -> None:
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)


@pytest.mark.parametrize("fresh", [False, True], ids=["mid-segment", "first-write-of-a-segment"])
def test_a_failed_writes_torn_records_are_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    """After a failed write the flusher starts the next segment one past the last record
    written successfully: the failed round's records, torn in the old segment, were never
    acknowledged, and leave no hole. When the failed write was a segment's first, the
    next segment's first LSN moves one past the failed segment's."""
    failing = _FailingSync()
    monkeypatch.setattr(shardlog_module, "os", failing)
    log = ShardLog(str(tmp_path), 512)
    log.open()
    kept = [_write(log, "k", b"a" * (500 if fresh else 100))]  # fresh: it fills the segment
    failed_in = log.segments[-1][1]
    assert len(log.segments) == (2 if fresh else 1)
    at = os.path.getsize(failed_in)
    lsn = log.reserve()
    failing.armed = True
    with pytest.raises(OSError):
        log.write(encode_record(lsn, "k", b"never acknowledged" * 4, prev=0), lsn)
    log.start_segment()  # as the flusher does after a failed write
    _write(log, "k", b"after the failure")
    log.close()
    _tear(failed_in, at + RECORD_HEADER.size, 20)  # the failed round never reached the disk

    again, payloads, torn = _reopen(tmp_path)
    assert payloads == {"k": [b"a" * (500 if fresh else 100), b"after the failure"]}
    assert torn == 1 and len(kept) == 1
    again.close()


def test_verify_log_reports_damage_in_completed_segments_only(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log = ShardLog(str(log_dir), 512)
    log.open()
    sent = [_write(log, "k", bytes([i]) * 200) for i in range(4)]  # three fill the first
    completed, active = (path for _, path in log.segments)
    assert verify_log(str(tmp_path)) == {}
    _tear(active, SEGMENT_HEADER.size + RECORD_HEADER.size, 10)  # being written: no damage
    assert verify_log(str(tmp_path)) == {}
    _tear(completed, SEGMENT_HEADER.size + len(sent[0]) + RECORD_HEADER.size, 10)
    assert list(verify_log(str(tmp_path))) == [os.path.basename(completed)]
    assert "acknowledged and are lost" in verify_log(str(tmp_path))[os.path.basename(completed)]
    log.close()
    assert verify_log(str(tmp_path / "no such shard")) == {}


def test_a_segment_missing_between_two_stops_the_log_from_opening(tmp_path: Path) -> None:
    """Each segment names the one written before it, so a segment file that is gone (not
    damaged: gone, which no checksum can see) is found; the oldest segments going, as
    trimming deletes them, is not damage."""
    log = ShardLog(str(tmp_path / "log"), 512)
    log.open()
    for i in range(9):
        _write(log, "k", bytes([i]) * 200)  # three per segment
    segments = [path for _, path in log.segments]
    log.close()
    os.unlink(segments[1])

    with pytest.raises(LogDamaged, match="which is missing") as caught:
        ShardLog(str(tmp_path / "log"), 512).open()
    message = str(caught.value)
    assert os.path.basename(segments[1]) in message and segments[2] in message
    assert verify_log(str(tmp_path)) == {os.path.basename(segments[2]): message}

    # the remedy the message gives: the segment after the hole and every later one away
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in segments[2:]:
        shutil.move(path, aside)
    log, payloads, torn = _reopen(tmp_path / "log")
    assert payloads == {"k": [bytes([i]) * 200 for i in range(3)]} and torn == 0
    assert log.trim(log.segments[1][0]) == 1  # the oldest gone by trimming: no hole
    assert not os.path.exists(segments[0])
    log.close()
    log, payloads, torn = _reopen(tmp_path / "log")
    assert payloads == {} and torn == 0
    log.close()
    assert verify_log(str(tmp_path)) == {}


def test_an_oldest_segment_lost_after_a_trim_stops_the_log_from_opening(tmp_path: Path) -> None:
    """Trimming names the segment it leaves as the oldest (the trimmed mark), so the
    oldest segment going otherwise is found: the links cannot see it, and a key whose
    records were all in it has no later record whose chain would break."""
    log = ShardLog(str(tmp_path / "log"), 512)
    log.open()
    for i in range(12):
        _write(log, f"k{i // 3}", bytes([i]) * 200)  # three per segment, a key each
    segments = [(first, path) for first, path in log.segments]
    assert log.trim(segments[2][0]) == 2  # k0's and k1's segments: their files are durable
    assert [path for _, path in log.segments] == [path for _, path in segments[2:]]
    log.close()
    log, payloads, _ = _reopen(tmp_path / "log")  # trimmed, not lost
    assert sorted(payloads) == ["k2", "k3"]
    log.close()

    os.unlink(segments[2][1])  # k2's only segment, never trimmed
    with pytest.raises(LogDamaged, match="was trimmed up to the segment") as caught:
        ShardLog(str(tmp_path / "log"), 512).open()
    message = str(caught.value)
    assert os.path.basename(segments[2][1]) in message
    assert os.path.basename(segments[3][1]) in message  # the oldest that is there
    assert verify_log(str(tmp_path)) == {os.path.basename(segments[2][1]): message}

    # the remedy the message gives: accept the loss by deleting the mark
    os.unlink(tmp_path / "log" / shardlog_module.TRIMMED_FILE)
    log, payloads, torn = _reopen(tmp_path / "log")
    assert sorted(payloads) == ["k3"] and torn == 0
    log.close()
    assert verify_log(str(tmp_path)) == {}


def test_a_trim_cut_short_after_its_mark_leaves_older_segments_that_are_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark is durable before the first deletion; a crash in between leaves segments
    older than the mark, which open as usual (their records are in the actor files)."""
    log = ShardLog(str(tmp_path / "log"), 512)
    log.open()
    for i in range(9):
        _write(log, "k", bytes([i]) * 200)
    segments = list(log.segments)

    def power_cut(path: str) -> None:
        raise OSError("the power went")

    monkeypatch.setattr(shardlog_module.os, "unlink", power_cut)
    with pytest.raises(OSError, match="the power went"):
        log.trim(segments[2][0])
    monkeypatch.undo()
    log.close()
    assert all(os.path.exists(path) for _, path in segments)
    assert shardlog_module._read_trimmed(str(tmp_path / "log")) == segments[2][0]
    log, payloads, torn = _reopen(tmp_path / "log")
    assert payloads == {"k": [bytes([i]) * 200 for i in range(9)]} and torn == 0
    assert log.trim(segments[2][0]) == 2  # the next trim finishes the job
    log.close()
    assert verify_log(str(tmp_path)) == {}


def test_a_trimmed_mark_left_by_a_run_of_an_older_build_is_not_trusted(tmp_path: Path) -> None:
    """A build from before the mark trims without writing it; it bumps the epoch when it
    opens the log, so the mark's epoch no longer matches and it is ignored, not taken for
    lost segments. The next open writes it afresh."""
    log = ShardLog(str(tmp_path), 512)
    log.open()
    for i in range(9):
        _write(log, "k", bytes([i]) * 200)
    segments = list(log.segments)
    log.trim(segments[1][0])
    log.close()
    epoch = shardlog_module._read_number(str(tmp_path / shardlog_module.EPOCH_FILE))
    shardlog_module._write_numbers(str(tmp_path / shardlog_module.EPOCH_FILE), epoch + 1)
    os.unlink(segments[1][1])  # the older build's open, then its trim
    log, payloads, _ = _reopen(tmp_path)
    assert payloads == {"k": [bytes([i]) * 200 for i in range(6, 9)]}
    assert shardlog_module._read_trimmed(str(tmp_path)) == segments[2][0]
    log.close()
    os.unlink(segments[2][1])  # lost now, with a mark this build wrote: found
    with pytest.raises(LogDamaged, match="was trimmed up to the segment"):
        ShardLog(str(tmp_path), 512).open()


def test_the_trimmed_mark_stays_trusted_when_the_epoch_advances_mid_run(tmp_path: Path) -> None:
    """advance_epoch (the log found behind an actor file) rewrites the mark with the new
    epoch, so a segment trimming kept that goes missing later is still found."""
    log = ShardLog(str(tmp_path), 512)
    log.open()
    for i in range(9):
        _write(log, "k", bytes([i]) * 200)
    segments = list(log.segments)
    log.trim(segments[1][0])
    log.advance_epoch((log.epoch + 5) << shardlog_module.SEQ_BITS)
    assert shardlog_module._read_trimmed(str(tmp_path)) == segments[1][0]
    log.close()
    os.unlink(segments[1][1])
    with pytest.raises(LogDamaged, match="was trimmed up to the segment"):
        ShardLog(str(tmp_path), 512).open()


def _v1_segment(directory: Path, first: int, records: list[tuple[int, str, bytes]]) -> None:
    """A segment as a build before format version 2 wrote it (docs/shardlog.md)."""
    header = SEGMENT_HEADER_V1.pack(MAGIC, 1, 0, first, 0, 0)
    data = header[:-4] + struct.pack(">I", zlib.crc32(header[:-4]))
    for lsn, key, payload in records:
        body = struct.pack(">H", len(key)) + key.encode() + payload
        crc = zlib.crc32(body, zlib.crc32(struct.pack(">QB", lsn, 1)))
        data += RECORD_HEADER_V1.pack(len(body), crc, lsn, 1, 0, 0) + body
    (directory / f"{first:016x}.log").write_bytes(data)


def test_a_log_written_in_format_version_1_is_read_and_goes_on_in_version_2(
    tmp_path: Path,
) -> None:
    tmp_path.joinpath("epoch").write_bytes((1).to_bytes(8, "big"))
    first = 1 << 40 | 1
    _v1_segment(tmp_path, first, [(first, "a", b"one"), (first + 1, "b", b"two")])

    log = ShardLog(str(tmp_path), SEGMENT)
    recovered = log.open()
    assert [(r.lsn, r.payload, r.prev) for r in recovered.records["a"]] == [(first, b"one", None)]
    assert [r.payload for r in recovered.records["b"]] == [b"two"]
    assert log.epoch == 2
    lsn = log.reserve()
    log.write(encode_record(lsn, "a", b"three", prev=first), lsn)
    log.close()

    again = ShardLog(str(tmp_path), SEGMENT)
    recovered = again.open()  # a version 2 segment after a version 1 one: linked
    again.close()
    assert [(r.payload, r.prev) for r in recovered.records["a"]] == [
        (b"one", None),
        (b"three", first),
    ]


def test_a_segment_of_a_later_format_version_is_refused(tmp_path: Path) -> None:
    header = SEGMENT_HEADER.pack(MAGIC, 3, 0, 1, 0, 0, 0)
    (tmp_path / f"{1:016x}.log").write_bytes(
        header[:-4] + struct.pack(">I", zlib.crc32(header[:-4]))
    )
    with pytest.raises(LogCorrupt, match="format version 3; this build reads 1 to 2"):
        ShardLog(str(tmp_path), SEGMENT).open()
