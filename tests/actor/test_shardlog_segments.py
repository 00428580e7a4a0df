"""Shard log segments on disk: zero-filled segments (init_zero), their clean end, torn
records inside them, and the spare that becomes the next segment (docs/shardlog.md)."""

from __future__ import annotations

import os
from pathlib import Path

from shardlite.actor._shardlog import (
    RECORD_HEADER,
    SEGMENT_HEADER,
    ShardLog,
    encode_record,
)

SEGMENT = 8 * 1024


def _write(log: ShardLog, key: str, payload: bytes) -> bytes:
    lsn = log.reserve()
    record = encode_record(lsn, key, payload)
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
