"""The shard log: one append-only file set per shard, one fdatasync for many keys' writes.

Format (docs/shardlog.md): ``DIR/epoch`` holds the current epoch; segments are
``DIR/<first lsn, 16 hex digits>.log``, each a 40-byte header then records::

    header:  magic "SHLOG\\0\\0\\0" | u16 version=2 | u16 0 | u64 first lsn | u64 created ns
             | u64 first lsn of the segment before it | u32 crc
    record:  u32 payload length | u32 crc32(lsn, type, prev, payload) | u64 lsn | u8 type
             | u8 0 | u16 0 | u64 prev: the LSN the key's file held before this batch | payload

All integers big-endian; ``crc32`` is zlib's. A record's LSN is ``epoch << 40 | seq``:
the epoch is bumped, durably, every time a log is opened, so an LSN is never reused
across restarts, even one an actor file holds while its record never reached the log.
A torn or corrupt record ends a segment. In a run's last segment (or after a failed
write) that is a crash's torn tail, never acknowledged; in a segment the run completed
it is damage, and the log refuses to open (``LogDamaged``, ``_check_tail``). Two links
catch what a checksum cannot, a file that is gone: each segment names the one before it
(``_check_links``: a segment missing between two), and each record names its key's
previous LSN (recovery: a record of the key missing, or an actor file older than the log).
Version 1 segments (no links) are still read.

With ``init_zero`` (the server's default, like PostgreSQL's ``wal_init_zero``) a segment
file is zero-filled to its full size and fdatasync'ed before it is used, and records
overwrite it in place: a flush then writes data blocks the file already has, with no
journal commit for a growing file (which waited behind other files' write-back). A record
header of zeros is a segment's clean end. The next segment is prepared ahead, beside the
writer (``prepare_spare``), as ``next-<n>.zero``; it becomes a segment by a link after
its header is durable.

Everything here is blocking file I/O: the caller runs it in a worker thread (the
flusher) or before serving (recovery).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

import msgspec

from ._actor import sync_directory

MAGIC = b"SHLOG\0\0\0"
VERSION = 2
SEGMENT_HEADER = struct.Struct(">8sHHQQQI")
RECORD_HEADER = struct.Struct(">IIQBBHQ")
SEGMENT_HEADER_V1 = struct.Struct(">8sHHQQI")
"""Version 1 (read, never written): no link to the segment before, records without prev."""
RECORD_HEADER_V1 = struct.Struct(">IIQBBH")
_CHECKED = struct.Struct(">QBQ")
"""What a record's checksum covers of its header (then its body): LSN, type, prev."""
_CHECKED_V1 = struct.Struct(">QB")
SEQ_BITS = 40
TYPE_ROWS = 1
DEFAULT_SEGMENT_BYTES = 16 << 20
EPOCH_FILE = "epoch"
TRIMMED_FILE = "trimmed"
"""The first LSN of the oldest segment trimming kept (8 bytes): a log whose oldest
segment starts above it has lost segments that were never trimmed."""
LOG_DIR = "log"
"""The log's directory inside a shard's."""
SEGMENT_SUFFIX = ".log"
SPARE_SUFFIX = ".zero"
"""Of a zero-filled file that becomes the next segment (init_zero); never read."""
ZERO_CHUNK = 1 << 20


class LogCorrupt(RuntimeError):
    """A segment header is not a shardlite log's (not a torn tail: a wrong file). The
    shard is not served (a startup error: one line, no traceback)."""


class LogDamaged(LogCorrupt):
    """Records a completed segment held can no longer be read: acknowledged writes are
    missing from the log, and replaying the records after them would build actor
    states that never existed."""


@dataclass
class TornSegment:
    """Where a segment's readable records end before its end (a crash's torn tail)."""

    path: str
    offset: int
    ignored_bytes: int  # after ``offset``, not counting a zero-filled segment's zeros


class Record(msgspec.Struct, gc=False):
    """A rows record. A struct the garbage collector does not track: a restart reads a
    whole log's records at once (up to a million), and tracked objects by the million
    made the collector's passes a third of the read."""

    lsn: int
    key: str
    payload: bytes
    prev: int | None = None
    """The LSN the key's actor file held before this batch (None: not known, a version 1
    record or one shipped by a move). Recovery applies a record only on top of it."""
    segment: str = ""
    """The segment file it was read from."""


@dataclass
class Recovered:
    """What a log held when it was opened, by key, in LSN order."""

    records: dict[str, list[Record]] = field(default_factory=dict)
    count: int = 0
    torn: int = 0  # segments that ended in a torn or corrupt record
    torn_segments: list[TornSegment] = field(default_factory=list)


def read_log_epoch(shard_directory: str) -> int:
    """The epoch of a shard's log as its epoch file holds it (0: no log yet)."""
    return _read_number(os.path.join(shard_directory, LOG_DIR, EPOCH_FILE))


def _read_number(path: str) -> int:
    """The 8-byte big-endian number a small file of the log holds (0: no such file)."""
    return _read_numbers(path, 1)[0]


def _read_numbers(path: str, count: int) -> tuple[int, ...]:
    """The ``count`` 8-byte big-endian numbers a small file of the log holds (zeros: no
    such file, or a shorter one)."""
    try:
        with open(path, "rb") as f:
            data = f.read(8 * count)
    except FileNotFoundError:
        data = b""
    if len(data) < 8 * count:
        return (0,) * count
    return tuple(int.from_bytes(data[i : i + 8], "big") for i in range(0, 8 * count, 8))


def _write_numbers(path: str, *values: int) -> None:
    """Make ``values`` what the file at ``path`` holds (8 bytes each, big-endian),
    durably: a new file is written, fsynced and renamed over it, and the directory
    fsynced."""
    with open(path + ".tmp", "wb") as f:
        f.write(b"".join(value.to_bytes(8, "big") for value in values))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    sync_directory(os.path.dirname(path))


def raise_log_epoch(shard_directory: str, epoch: int) -> None:
    """Make the shard's log start above ``epoch`` when it next opens (a copy of a shard
    from another host: its files hold LSNs of the source's log). Durable on return."""
    directory = os.path.join(shard_directory, LOG_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if read_log_epoch(shard_directory) < epoch:
        _write_numbers(os.path.join(directory, EPOCH_FILE), epoch)


def encode_record(lsn: int, key: str, payload: bytes, *, prev: int) -> bytes:
    """A rows record; ``prev``: the LSN the key's file held before this batch."""
    raw_key = key.encode()
    body = struct.pack(">H", len(raw_key)) + raw_key + payload
    crc = zlib.crc32(body, zlib.crc32(_CHECKED.pack(lsn, TYPE_ROWS, prev)))
    return RECORD_HEADER.pack(len(body), crc, lsn, TYPE_ROWS, 0, 0, prev) + body


class ShardLog:
    """The log files of one shard. One writer (the flusher) at a time; only
    ``prepare_spare`` may run beside it, in another thread (a lock hands the spare over)."""

    def __init__(
        self, directory: str, segment_bytes: int = DEFAULT_SEGMENT_BYTES, *, init_zero: bool = False
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.init_zero = init_zero
        self._spare: tuple[int, str] | None = None  # the prepared next segment: fd, path
        self._spare_lock = threading.Lock()  # the spare is made in another thread
        self._mark_lock = threading.Lock()  # trim (a worker thread) and advance_epoch
        self._trimmed = 0  # the first LSN of the oldest segment trimming keeps
        self._spares_made = 0  # each spare has a name of its own (a switch may overlap)
        self._closed = False
        self.spares_used = 0
        self.epoch = 0
        self._seq = 0
        self._written_lsn = 0  # of the last record written
        self._fd: int | None = None
        self._size = 0  # of the active segment
        self._active = ""
        self._sizes: dict[str, int] = {}
        self.segments: list[tuple[int, str]] = []  # (first lsn, path), oldest first

    # ------------------------------------------------------------------ opening

    def open(self) -> Recovered:
        """Read what is there, bump the epoch, start a new segment. Blocking."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for name in os.listdir(self.directory):
            if name.endswith(SPARE_SUFFIX):  # a crash's: its zeros may never have been synced
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
        recovered = Recovered()
        torn: list[tuple[int, TornSegment]] = []  # with the LSN of the last record read
        links: list[int | None] = []
        newest = 0  # LSN seen: of a segment's start or a record
        for first, path in _list_segments(self.directory):
            self.segments.append((first, path))
            whole, end, last, link = _read_segment(path, recovered)
            links.append(link)
            newest = max(newest, first, last)
            self._sizes[path] = end
            if not whole:
                torn.append((last, TornSegment(path, end, _bytes_after(path, end))))
        _check_links(self.segments, links)
        trimmed = _read_trimmed(self.directory)
        _check_oldest(self.directory, self.segments, trimmed)
        firsts = {path: (i, first) for i, (first, path) in enumerate(self.segments)}
        for last, segment in torn:
            i, first = firsts[segment.path]
            following = self.segments[i + 1][0] if i + 1 < len(self.segments) else None
            _check_tail(segment, first, last, following)
            recovered.torn += 1
            recovered.torn_segments.append(segment)
        self.epoch = self._bump_epoch(max(newest, trimmed or 0) >> SEQ_BITS)
        self._seq = 0
        self._written_lsn = self.epoch << SEQ_BITS
        if self.init_zero:
            self.prepare_spare()
        self.start_segment()
        self._trimmed = self.segments[0][0]
        _write_trimmed(self.directory, self.epoch, self._trimmed)
        return recovered

    def _bump_epoch(self, seen: int) -> int:
        """One above the epoch file's, and above ``seen`` (the newest segment's: an epoch
        file lost or put back from an older copy must not make LSNs go back)."""
        path = os.path.join(self.directory, EPOCH_FILE)
        epoch = max(_read_number(path), seen) + 1
        if epoch >= 1 << (64 - SEQ_BITS):
            raise LogCorrupt(f"{path}: epoch {epoch} is out of range")
        _write_numbers(path, epoch)
        return epoch

    def advance_epoch(self, above: int) -> int:
        """Make every later LSN greater than ``above`` (an LSN some actor file holds that
        this log never gave out: its directory was lost or replaced), durably. Returns the
        new epoch. Blocking, but rare; on the thread that calls ``reserve``."""
        epoch = (above >> SEQ_BITS) + 1
        if epoch > self.epoch:
            if epoch >= 1 << (64 - SEQ_BITS):
                raise LogCorrupt(f"{self.directory}: epoch {epoch} is out of range")
            with self._mark_lock:  # the mark is trusted only with the epoch file's epoch
                _write_numbers(os.path.join(self.directory, EPOCH_FILE), epoch)
                self.epoch, self._seq = epoch, 0
                _write_trimmed(self.directory, epoch, self._trimmed)
        return self.epoch

    def wants_spare(self) -> bool:
        """Time to prepare the next segment (``prepare_spare``): the active one is half
        full and no spare is ready. Cheap: the flusher asks after every round."""
        return (
            self.init_zero
            and self._spare is None
            and not self._closed
            and self._size >= self.segment_bytes // 2
        )

    def prepare_spare(self) -> None:
        """Zero-fill the next segment's file to its full size and fdatasync it. Blocking;
        runs in a thread of its own, beside ``write``."""
        self._spares_made += 1
        path = os.path.join(self.directory, f"next-{self._spares_made}{SPARE_SUFFIX}")
        spare = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        try:
            zeros = memoryview(bytes(min(ZERO_CHUNK, self.segment_bytes)))
            left = self.segment_bytes
            while left > 0:
                left -= os.write(spare[0], zeros[:left])
            os.fdatasync(spare[0])
        except BaseException:
            _drop_spare(spare)
            raise
        with self._spare_lock:
            keep = self._spare is None and not self._closed
            if keep:
                self._spare = spare
        if not keep:
            _drop_spare(spare)  # the log was closed meanwhile

    def start_segment(self) -> None:
        """Make the next segment the active one: the spare if one is ready, else a new
        file that records are appended to. Its header is durable, and its name, on return."""
        # Every record in a segment has an LSN >= its first. Not next_lsn(): the loop has
        # reserved LSNs for records that are still to be written (they go in this one).
        first = self._written_lsn + 1
        if self.segments and self.segments[-1][0] >= first:
            first = self.segments[-1][0] + 1  # after a failed write: its records are gone
        path = os.path.join(self.directory, f"{first:016x}{SEGMENT_SUFFIX}")
        before = self.segments[-1][0] if self.segments else 0
        header = SEGMENT_HEADER.pack(MAGIC, VERSION, 0, first, time.time_ns(), before, 0)
        header = header[:-4] + struct.pack(">I", zlib.crc32(header[:-4]))
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            fd = spare[0]
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_all(fd, header, 0)
            os.fdatasync(fd)
            if spare is not None:  # named once its header is durable; link: never over one
                os.link(spare[1], path)
                os.unlink(spare[1])
            sync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self.spares_used += spare is not None
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = len(header)
        self._active = path
        self.segments.append((first, path))
        self._sizes[path] = len(header)

    # ------------------------------------------------------------------ writing

    def next_lsn(self) -> int:
        """The LSN the next record will get (not reserved)."""
        return (self.epoch << SEQ_BITS) | (self._seq + 1)

    def reserve(self) -> int:
        """A new LSN, greater than every one before it (event-loop thread only)."""
        self._seq += 1
        return (self.epoch << SEQ_BITS) | self._seq

    def write(self, data: bytes, last_lsn: int) -> None:
        """Add encoded records after the last ones and make them durable; ``last_lsn`` is
        the LSN of the last of them (they come in LSN order). Blocking: the flusher's
        thread."""
        assert self._fd is not None
        _pwrite_all(self._fd, data, self._size)
        os.fdatasync(self._fd)
        self._written_lsn = last_lsn
        self._size += len(data)
        self._sizes[self._active] = self._size
        if self._size >= self.segment_bytes:
            self.start_segment()

    # ------------------------------------------------------------------ trimming

    def trim(self, below: int) -> int:
        """Delete whole segments whose records all have LSNs below ``below``, oldest
        first, each deletion durable before the next (a crash must not leave a younger
        segment deleted and an older one there: that is a missing segment). First the
        trimmed mark names the segment that will be the oldest, so that an oldest segment
        lost otherwise is found (``_check_oldest``)."""
        removed = 0
        while removed + 1 < len(self.segments) and self.segments[removed + 1][0] <= below:
            removed += 1
        if removed:  # the segment that will be the oldest, durable before any deletion
            with self._mark_lock:
                self._trimmed = self.segments[removed][0]
                _write_trimmed(self.directory, self.epoch, self._trimmed)
        for _ in range(removed):
            _, path = self.segments.pop(0)
            self._sizes.pop(path, None)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sync_directory(self.directory)
        return removed

    def size_bytes(self) -> int:
        """Bytes in the segments (tracked, not read from the disk: cheap on the loop)."""
        return sum(self._sizes.values())

    def close(self) -> None:
        """Close the files; a spare is deleted (now, or by ``prepare_spare`` when it ends)."""
        with self._spare_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            _drop_spare(spare)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _drop_spare(spare: tuple[int, str]) -> None:
    os.close(spare[0])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spare[1])


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _list_segments(directory: str) -> list[tuple[int, str]]:
    """(first LSN, path) of each segment, oldest first."""
    found = []
    for name in os.listdir(directory):
        if name.endswith(SEGMENT_SUFFIX):
            try:
                first = int(name[: -len(SEGMENT_SUFFIX)], 16)
            except ValueError:
                continue
            found.append((first, os.path.join(directory, name)))
    return sorted(found)


def verify_log(shard_directory: str) -> dict[str, str]:
    """Problems of the completed segments of a shard's log, by segment file name: the
    checks recovery makes, on a live log. Only segments followed by one of the same run
    are read (the active segment, and a crash's last segment, may end torn); a segment
    trimmed meanwhile is skipped. Blocking."""
    directory = os.path.join(shard_directory, LOG_DIR)
    if not os.path.isdir(directory):
        return {}  # durability os or fsync, and nothing left to drain
    found = _list_segments(directory)
    problems = {}
    trimmed = _read_trimmed(directory)  # after the listing: a trim meanwhile only raises it
    try:
        _check_oldest(directory, found, trimmed)
    except LogDamaged as exc:
        problems[f"{trimmed:016x}{SEGMENT_SUFFIX}"] = str(exc)
    for (first, path), (following, following_path) in itertools.pairwise(found):
        try:
            link = _read_link(following_path)
            if link is not None and link != first:
                problems[os.path.basename(following_path)] = _missing_before(
                    following_path, link, path
                )
            if following >> SEQ_BITS != first >> SEQ_BITS:
                continue
            whole, end, last, _ = _read_segment(path, Recovered())
            if not whole:
                _check_tail(TornSegment(path, end, _bytes_after(path, end)), first, last, following)
        except FileNotFoundError:
            continue  # trimmed: its records are in the actor files
        except LogCorrupt as exc:
            problems[os.path.basename(path)] = str(exc)
    return problems


def _check_links(segments: list[tuple[int, str]], links: list[int | None]) -> None:
    """Raise :class:`LogDamaged` if a segment is missing between two that are there:
    each (version 2) segment names the first LSN of the one written before it. The
    oldest segment's predecessor was trimmed (trimming deletes oldest first)."""
    for i in range(1, len(segments)):
        link = links[i]
        if link is not None and link != segments[i - 1][0]:
            raise LogDamaged(_missing_before(segments[i][1], link, segments[i - 1][1]))


def _read_trimmed(directory: str) -> int | None:
    """The trimmed mark's first LSN, if it can be trusted: the run that last opened the
    log wrote it (its epoch is the epoch file's). A build from before the mark trims
    without writing it, and always bumps the epoch: its mark is stale. None: no check."""
    epoch, first = _read_numbers(os.path.join(directory, TRIMMED_FILE), 2)
    if not first or epoch != _read_number(os.path.join(directory, EPOCH_FILE)):
        return None
    return first


def _write_trimmed(directory: str, epoch: int, first: int) -> None:
    _write_numbers(os.path.join(directory, TRIMMED_FILE), epoch, first)


def _check_oldest(directory: str, segments: list[tuple[int, str]], trimmed: int | None) -> None:
    """Raise :class:`LogDamaged` if the oldest segment starts after the one trimming
    kept: the segments before it were lost, not trimmed (the links cannot see this: the
    oldest segment's predecessor is always gone). An oldest segment older than the mark
    is one a crash kept from being trimmed. No segment at all is what the remedy for a
    damaged one leaves (every segment from it on moved out), not damage."""
    if not trimmed or not segments or segments[0][0] <= trimmed:
        return
    name = f"{trimmed:016x}{SEGMENT_SUFFIX}"
    oldest = os.path.basename(segments[0][1])
    raise LogDamaged(
        f"{directory}: the log was trimmed up to the segment {name}, which is missing (its "
        f"oldest segment is {oldest}): the records in it were acknowledged and are lost. "
        "Restore the shard from a backup, or, to keep what the actor files hold and lose "
        f"the writes that only the missing segments had, delete {TRIMMED_FILE} from the "
        "log directory"
    )


def _missing_before(path: str, link: int, there: str) -> str:
    name = f"{link:016x}{SEGMENT_SUFFIX}"
    return (
        f"{path} was written after the segment {name}, which is missing (the log has "
        f"{os.path.basename(there)} before it): the records in it were acknowledged and are "
        "lost. This shard's log is not replayed past a hole. Restore the shard from a "
        "backup, or, to keep what the actor files hold and lose the writes that only the "
        f"log had, move {os.path.basename(path)} and every later segment out of the log "
        "directory"
    )


def _read_link(path: str) -> int | None:
    """The first LSN of the segment written before this one, as its header names it
    (None: a version 1 segment, or a header that never made it to the disk)."""
    with open(path, "rb") as f:
        header = f.read(SEGMENT_HEADER.size)
    if len(header) < SEGMENT_HEADER.size or header[8:10] != VERSION.to_bytes(2, "big"):
        return None
    magic, _, _, _, _, before, crc = SEGMENT_HEADER.unpack(header)
    if magic != MAGIC or zlib.crc32(header[:-4]) != crc:
        return None  # _read_segment says what is wrong with it
    return before or None


def _check_tail(torn: TornSegment, first: int, last: int, following: int | None) -> None:
    """Raise :class:`LogDamaged` if records a completed segment held are unreadable.

    A torn tail is a crash's (the round being written was never acknowledged) only in a
    run's last segment. A segment followed by one of the same run (epoch) was completed:
    the next starts one past its last record, after that record's round was fdatasync'ed.
    A failed write also starts the next segment, but one past the last record written
    *successfully*, so a failed round's torn records leave no gap.
    """
    if following is None or following >> SEQ_BITS != first >> SEQ_BITS:
        return
    if torn.offset == 0:
        return  # its header never made it: records go in only after it is durable
    missing_from = max(last, first - 1) + 1
    if following <= missing_from:
        return
    if last < first and following == first + 1:
        return  # the segment's first write failed: the next one's first LSN moved past it
    raise LogDamaged(
        f"{torn.path} is damaged at byte {torn.offset} ({torn.ignored_bytes} bytes after it "
        f"unreadable): it was completed (the next segment of the same run starts at LSN "
        f"{following:#x}), so the records from LSN {missing_from:#x} to {following - 1:#x} "
        "were acknowledged "
        "and are lost. This shard's log is not replayed past a hole. Restore the shard "
        "from a backup, or, to keep what the actor files hold and lose the writes that "
        "only the log had, move this segment and every later one out of the log directory"
    )


def _bytes_after(path: str, end: int) -> int:
    """Bytes of the segment after ``end`` that are not trailing zeros (at least 1)."""
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read()
    return max(len(rest.rstrip(b"\0")), 1)


def _read_segment(path: str, into: Recovered) -> tuple[bool, int, int, int | None]:
    """Add a segment's valid records to ``into``. Returns whether it ended cleanly (not
    torn or corrupt), where its records end, the LSN of its last one (its first LSN - 1
    if it has none), and the first LSN of the segment before it (None: not known)."""
    with open(path, "rb") as f:
        data = f.read()
    version = int.from_bytes(data[8:10], "big") if len(data) >= 10 else VERSION
    if data[:8] == MAGIC and version not in (1, VERSION):
        raise LogCorrupt(
            f"{path} has log format version {version}; this build reads 1 to {VERSION}"
        )
    header = SEGMENT_HEADER_V1 if version == 1 else SEGMENT_HEADER
    if len(data) < header.size:
        return False, 0, 0, None  # a segment whose header never made it: it holds nothing
    fields = header.unpack_from(data)
    magic, first, crc = fields[0], fields[3], fields[-1]
    if magic != MAGIC or zlib.crc32(data[: header.size - 4]) != crc:
        raise LogCorrupt(f"{path} is not a shardlite log segment")
    link = (fields[5] or None) if version == VERSION else None
    whole, end, last, count = _read_records(
        data, header.size, version, path, last=first - 1, into=into
    )
    into.count += count
    return whole, end, last, link


def _read_records(
    data: bytes, pos: int, version: int, path: str, *, last: int, into: Recovered
) -> tuple[bool, int, int, int]:
    """Add each record from ``pos`` on to ``into.records``, until the data ends or a
    record is torn or corrupt (or does not follow ``last``, the LSN before it). Returns
    whether the records ended cleanly, where they end, the LSN of the last one and how
    many there were. Zeros where a record header would be end the records cleanly
    (init_zero), as the end of the data does.

    One loop, no generator or per-record helper: a restart reads the whole log before
    the shard serves, up to ``--log-trim-bytes`` of it (about a million records)."""
    by_key = into.records
    size = len(data)
    linked = version == VERSION
    record_header = RECORD_HEADER if linked else RECORD_HEADER_V1
    header_size = record_header.size
    unpack = record_header.unpack_from
    checked = _CHECKED.pack if linked else _CHECKED_V1.pack
    crc32 = zlib.crc32
    count = 0
    prev: int | None = None
    while pos < size:
        if pos + header_size > size:  # a header cut short, unless it is zeros
            return data[pos:] == bytes(size - pos), pos, last, count
        fields = unpack(data, pos)
        if linked:
            length, crc, lsn, kind, pad8, pad16, prev = fields
        else:
            length, crc, lsn, kind, pad8, pad16 = fields
        body_at = pos + header_size
        body_end = body_at + length
        if kind != TYPE_ROWS or pad8 or pad16 or length < 2 or body_end > size:
            return not any(fields), pos, last, count  # zeros: the clean end
        body = data[body_at:body_end]
        if (
            crc32(body, crc32(checked(lsn, kind, prev) if linked else checked(lsn, kind))) != crc
            or lsn <= last
        ):
            return False, pos, last, count
        key_end = 2 + (body[0] << 8 | body[1])
        key = body[2:key_end].decode()
        record = Record(lsn, key, body[key_end:], prev, path)
        kept = by_key.get(key)
        if kept is None:
            by_key[key] = [record]
        else:
            kept.append(record)
        count += 1
        last, pos = lsn, body_end
    return True, pos, last, count
