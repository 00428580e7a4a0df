"""The RPC wire format: length-prefixed msgpack frames (documented in docs/rpc.md).

Every frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Requests are ``[id, key, op]``; responses ``[id, status, body]``, matched by ``id`` (the
client's choice: any unsigned 64-bit integer; the server answers in completion order, not
request order). ``status`` 0 means ``body`` is the result, 1 that it is an error object.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

import msgspec

from shardlite.actor import (
    Batch,
    BatchResult,
    CallMethod,
    CallResult,
    Deleted,
    Error,
    ExportResult,
    KvDelete,
    KvGet,
    KvItems,
    KvList,
    KvOk,
    KvPut,
    KvValue,
    Sql,
    SqlResult,
    WorkflowGet,
    WorkflowInfo,
    WorkflowItems,
    WorkflowList,
)

from ._placement import PlacementMap

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 8 << 20
STATUS_OK = 0
STATUS_ERROR = 1
CONNECTION_ERROR_ID = 0
"""Id of an error frame that concerns the connection, not one request."""


class Delete(msgspec.Struct, tag="delete", array_like=True, frozen=True):
    """Remove the actor and its file."""


class Export(msgspec.Struct, tag="export", array_like=True, frozen=True):
    """A consistent copy of the actor's SQLite file, as bytes."""


class Ping(msgspec.Struct, tag="ping", array_like=True, frozen=True):
    """Answered by the server without touching any actor (key is ignored)."""


class Pong(msgspec.Struct, array_like=True):
    server: str


class GetPlacement(msgspec.Struct, tag="placement", array_like=True, frozen=True):
    """The placement map the server holds (key is ignored): for routing clients."""


class PeerHello(msgspec.Struct, tag="peer", array_like=True, frozen=True):
    """Sent first on a connection between shard processes: it carries forwarded
    requests, so its frames may exceed the size limit by ``PEER_SLACK_BYTES`` (a new
    request id, the epoch, the read-only flag). With auth required, ``token`` is the
    sending process's host credential."""

    token: str | None = None


class Authenticate(msgspec.Struct, tag="auth", array_like=True, frozen=True):
    """Sent first on a connection to a server that requires tokens (key is ignored)."""

    token: str


class Authenticated(msgspec.Struct, array_like=True):
    key: str
    perm: str
    exp: float


PEER_SLACK_BYTES = 64


class GetStatus(msgspec.Struct, tag="status", array_like=True, frozen=True):
    """This shard process's status (key is ignored): for ``shardlite ops status``."""


class ShardStatus(msgspec.Struct):
    epoch: int
    files: int
    bytes: int


class NodeStatus(msgspec.Struct):
    node: str
    pid: int
    uptime_s: float
    actors_open: int
    shards: dict[str, ShardStatus]


# ---------------------------------------------------------------------- admin operations
# Keyless (the request's key is ignored), for the ops CLI and between shard processes
# during moves; they need an admin token (or a host credential) when auth is on.


class ShardKeys(msgspec.Struct, tag="shard_keys", array_like=True, frozen=True):
    """The keys of every actor file of ``shard`` on this process."""

    shard: str


class KeyList(msgspec.Struct, array_like=True):
    keys: list[str]
    log_epoch: int = 0
    """The shard log's epoch: a copy of the shard must start its own log above it."""


class TrackWrites(msgspec.Struct, tag="track_writes", array_like=True, frozen=True):
    """Start (anew) or stop recording which keys of ``shard`` are written."""

    shard: str
    on: bool


class TakeWritten(msgspec.Struct, tag="take_written", array_like=True, frozen=True):
    """What ``shard``'s actors wrote since tracking started or the last take."""

    shard: str


class Written(msgspec.Struct, array_like=True):
    records: dict[str, list[tuple[int, bytes]]]
    """Per key, the shard-log records of its commits (LSN, payload: docs/shardlog.md)."""
    whole: list[str]
    """Keys no record describes (or durability is not ``log``): copy their files again."""


class PullChanges(msgspec.Struct, tag="pull_changes", array_like=True, frozen=True):
    """Target of a move: take what ``shard`` wrote at ``source`` since the last take and
    apply it here (records replayed into the copies, the other keys copied again).
    ``ready``: then also open the copy's shard log, so that serving it after the flip
    costs no file syncs."""

    shard: str
    source: str
    log_epoch: int
    ready: bool = False


class Snapshot(msgspec.Struct, tag="snapshot", array_like=True, frozen=True):
    """A consistent copy of ``key``'s file (backup API), its first ``first`` bytes
    inline; the rest with :class:`ReadChunk`."""

    key: str
    first: int


class SnapshotInfo(msgspec.Struct, array_like=True):
    exists: bool
    id: str  # "" when ``data`` is the whole file
    size: int
    sha256: str
    data: bytes


class ReadChunk(msgspec.Struct, tag="read_chunk", array_like=True, frozen=True):
    id: str
    offset: int
    length: int


class Chunk(msgspec.Struct, array_like=True):
    data: bytes


class PullActors(msgspec.Struct, tag="pull", array_like=True, frozen=True):
    """Target of a move: copy ``keys`` of ``shard`` from the process at ``source``
    (``fresh``: first discard any copy of the shard here)."""

    shard: str
    source: str
    keys: list[str]
    log_epoch: int
    fresh: bool = False


class Pulled(msgspec.Struct, array_like=True):
    copied: int
    removed: int
    bytes: int
    checksums: dict[str, str]
    replayed: int = 0  # keys brought up to date by records
    records: int = 0


class Fence(msgspec.Struct, tag="fence", array_like=True, frozen=True):
    """Source of a move: hold the shard's requests, finish those in flight, and record
    the fence in the move record (expected at ``move_mod``)."""

    shard: str
    move_mod: int


class Fenced(msgspec.Struct, array_like=True):
    move_mod: int


class Unfence(msgspec.Struct, tag="unfence", array_like=True, frozen=True):
    shard: str


class Adopt(msgspec.Struct, tag="adopt", array_like=True, frozen=True):
    """Read the directory now and serve what it gives this process."""


class Release(msgspec.Struct, tag="release", array_like=True, frozen=True):
    """Source after the flip: forward the held requests and retire the local copy."""

    shard: str


class DropCopy(msgspec.Struct, tag="drop_copy", array_like=True, frozen=True):
    """Target of an aborted move: delete the copy of a shard this process does not serve."""

    shard: str


class VerifyShard(msgspec.Struct, tag="verify", array_like=True, frozen=True):
    """``PRAGMA integrity_check`` of each actor file of ``shard`` (all, or ``keys``)."""

    shard: str
    keys: list[str] | None = None


class Verified(msgspec.Struct, array_like=True):
    shard: str
    checked: int
    problems: dict[str, str]  # key -> what integrity_check (or opening) said
    log_problems: dict[str, str] = msgspec.field(default_factory=dict)  # segment -> damage


class Upload(msgspec.Struct, tag="upload", array_like=True, frozen=True):
    """A chunk of a file for :class:`RestoreActor` (``offset`` 0 starts it anew)."""

    id: str
    offset: int
    data: bytes


class RestoreActor(msgspec.Struct, tag="restore", array_like=True, frozen=True):
    """Replace ``key``'s file by the upload ``id`` (checked: size, sha256, the key
    inside, ``integrity_check``)."""

    key: str
    id: str
    size: int
    sha256: str


class SplitShard(msgspec.Struct, tag="split", array_like=True, frozen=True):
    """The owner: give the upper half of ``shard``'s slots to ``new_shard`` (same
    process), the split record expected at ``move_mod``."""

    shard: str
    new_shard: str
    move_mod: int


class Done(msgspec.Struct, array_like=True):
    count: int = 0


ADMIN_OPS = (
    ShardKeys,
    TrackWrites,
    TakeWritten,
    Snapshot,
    ReadChunk,
    PullActors,
    PullChanges,
    Fence,
    Unfence,
    Adopt,
    Release,
    DropCopy,
    VerifyShard,
    Upload,
    RestoreActor,
    SplitShard,
)


WireOp: TypeAlias = (
    Sql
    | Batch
    | KvGet
    | KvPut
    | KvDelete
    | KvList
    | CallMethod
    | WorkflowList
    | WorkflowGet
    | Delete
    | Export
    | Ping
    | GetPlacement
    | GetStatus
    | PeerHello
    | Authenticate
    | ShardKeys
    | TrackWrites
    | TakeWritten
    | Snapshot
    | ReadChunk
    | PullActors
    | PullChanges
    | Fence
    | Unfence
    | Adopt
    | Release
    | DropCopy
    | VerifyShard
    | Upload
    | RestoreActor
    | SplitShard
)


RequestId: TypeAlias = Annotated[int, msgspec.Meta(ge=1)]
"""1 to 2^64-1 (msgpack has no larger integers): id 0 is reserved for errors that concern
the connection, so a request cannot use it."""


class Request(msgspec.Struct, array_like=True, frozen=True):
    id: RequestId
    key: str
    op: WireOp
    idempotency_key: str | None = None
    epoch: int | None = None
    """The epoch of the key's shard the sender saw (routing clients and forwarders)."""
    readonly: bool = False
    """Forwarded requests only (peer connections): the caller's token is read-only."""


class Response(msgspec.Struct, array_like=True):
    id: int
    status: int
    body: msgspec.Raw


RESULT_TYPES: dict[type, type] = {
    Sql: SqlResult,
    Batch: BatchResult,
    KvGet: KvValue,
    KvPut: KvOk,
    KvDelete: Deleted,
    KvList: KvItems,
    CallMethod: CallResult,
    WorkflowList: WorkflowItems,
    WorkflowGet: WorkflowInfo,
    Delete: Deleted,
    Export: ExportResult,
    Ping: Pong,
    GetPlacement: PlacementMap,
    GetStatus: NodeStatus,
    PeerHello: Pong,
    Authenticate: Authenticated,
    ShardKeys: KeyList,
    TrackWrites: Done,
    TakeWritten: Written,
    Snapshot: SnapshotInfo,
    ReadChunk: Chunk,
    PullActors: Pulled,
    PullChanges: Pulled,
    Fence: Fenced,
    Unfence: Done,
    Adopt: Done,
    Release: Done,
    DropCopy: Done,
    VerifyShard: Verified,
    Upload: Done,
    RestoreActor: Done,
    SplitShard: Done,
}


def _reject_ext(code: int, data: memoryview) -> Any:
    raise TypeError(f"msgpack extension type {code} is not supported")


request_decoder = msgspec.msgpack.Decoder(Request, ext_hook=_reject_ext)
response_decoder = msgspec.msgpack.Decoder(Response)
_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


def ok_frame(req_id: int, result: Any) -> bytes:
    payload = encode((req_id, STATUS_OK, result))
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


def error_frame(req_id: int, error: Error) -> bytes:
    return frame(encode((req_id, STATUS_ERROR, error.to_dict())))


def request_frame(
    req_id: int,
    key: str,
    op: WireOp,
    idempotency_key: str | None = None,
    epoch: int | None = None,
    *,
    readonly: bool = False,
) -> bytes:
    if readonly:
        return frame(encode((req_id, key, op, idempotency_key, epoch, True)))
    if epoch is not None:
        return frame(encode((req_id, key, op, idempotency_key, epoch)))
    if idempotency_key is None:
        return frame(encode((req_id, key, op)))
    return frame(encode((req_id, key, op, idempotency_key)))


def raw_frame(req_id: int, status: int, body: bytes) -> bytes:
    """A response whose body is already msgpack (a forwarded reply)."""
    return frame(encode((req_id, status, msgspec.Raw(body))))


def guess_id(payload: bytes | memoryview) -> int:
    """Best effort: the id of a request that failed to decode, else CONNECTION_ERROR_ID."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError, TypeError, ValueError):
        return CONNECTION_ERROR_ID
    if isinstance(raw, list) and raw and type(raw[0]) is int and 0 < raw[0] < 1 << 64:
        return raw[0]
    return CONNECTION_ERROR_ID


class FrameReader:
    """Splits a byte stream into frames; ``feed`` returns the complete payloads.

    Payloads are zero-copy views of the received chunk (msgspec decodes them directly);
    only a frame cut across two chunks is copied, to join its parts.
    """

    __slots__ = ("_have", "_need", "_parts", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._parts: list[bytes] = []  # the start of an incomplete frame, in pieces
        self._have = 0
        self._need = 0  # bytes that piece must reach before a frame can complete
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> list[memoryview]:
        if type(data) is not bytes:
            data = bytes(data)  # views must not see a buffer that changes later
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []  # a large frame still arriving: join once, not per chunk
            data = b"".join(self._parts)
            self._parts.clear()
        view = memoryview(data)
        out: list[memoryview] = []
        pos = 0
        n = len(data)
        while n - pos >= HEADER_BYTES:
            size = int.from_bytes(view[pos : pos + HEADER_BYTES], "big")
            if size > self.max_frame:
                raise FrameTooLarge(size, self.max_frame, out)
            end = pos + HEADER_BYTES + size
            if end > n:
                break
            out.append(view[pos + HEADER_BYTES : end])
            pos = end
        if pos < n:
            rest = data[pos:]
            self._parts.append(rest)
            self._have = len(rest)
            self._need = (
                HEADER_BYTES + int.from_bytes(rest[:HEADER_BYTES], "big")
                if len(rest) >= HEADER_BYTES
                else HEADER_BYTES
            )
        return out

    @property
    def buffered(self) -> int:
        return self._have if self._parts else 0


class FrameTooLarge(Exception):
    """A frame header over the limit; ``frames`` are the complete frames read before it."""

    def __init__(self, size: int, limit: int, frames: list[memoryview] | None = None) -> None:
        super().__init__(f"frame of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.frames = frames or []
