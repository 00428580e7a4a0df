"""The HTTP API (quart-trio on hypercorn): the paths of CONTRACT.md, one error shape.

Handlers decode the body, hand one call to the actor pool and wait for its (durable)
result. Every error, Quart's own included (404, 405, 413, 408), leaves as
``{"error": {"code", "message", "retryable"}}`` with the status that fits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import apsw
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from shardlite.actor import (
    ActorPool,
    BadRequest,
    Batch,
    CallMethod,
    Error,
    Internal,
    KvDelete,
    KvGet,
    KvList,
    KvPut,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    Sql,
    TooLarge,
    Unauthorized,
    WorkflowGet,
    WorkflowList,
    validate_key,
)
from shardlite.router import wire

from . import _codec as codec
from ._auth import NEED
from ._metrics import Metrics
from ._routing import Node
from ._settings import Settings

log = logging.getLogger("shardlite.http")

EXPORT_CHUNK_BYTES = 1 << 20
EPOCH_HEADER = "Shardlite-Epoch"


class RequestTimeout(Error):
    """The request body did not arrive in time."""

    code = "request_timeout"
    status = 408
    retryable = True


def _wants_msgpack() -> bool:
    if codec.is_msgpack(request.headers.get("Content-Type")):
        return True
    accept = request.headers.get("Accept", "")
    return any(t in accept for t in codec.MSGPACK_TYPES)


def _respond(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if _wants_msgpack():
        return Response(
            codec.msgpack_encode(body), status, headers, content_type="application/msgpack"
        )
    return Response(codec.json_encode(body), status, headers, content_type="application/json")


def _error_response(error: Error) -> Response:
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="shardlite"'

    return _respond(codec.error_body(error), error.status, headers)


def create_app(pool: ActorPool, node: Node, settings: Settings, metrics: Metrics) -> QuartTrio:
    """The quart-trio app serving ``pool``; keys other processes own are forwarded."""
    app = QuartTrio("shardlite")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["BODY_TIMEOUT"] = settings.body_timeout
    app.config["RESPONSE_TIMEOUT"] = max(60.0, settings.statement_timeout * 10)
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # "/v1/actors//sql" must not be merged (and redirected) into another actor's path
    app.url_map.merge_slashes = False
    data_dir = settings.data

    async def body() -> bytes:
        try:
            data = await request.get_data(cache=False, as_text=False)
        except HTTPException as exc:
            raise _http_error(exc) from None
        assert isinstance(data, bytes)
        request.body_read = True  # type: ignore[attr-defined]
        return data

    def key_of(key: str) -> str:
        return validate_key(key)

    def admit(key: str, need: str) -> bool:
        """Check the caller's token (if tokens are required) and the key's rate limit;
        return whether the caller may only read."""
        readonly = False
        if node.auth.required:
            claims = node.auth.verify(_bearer())
            node.auth.check(claims, key, need)
            readonly = claims.readonly
        if node.rate_limit is not None and (refused := node.rate_limit(key)) is not None:
            raise refused
        return readonly

    async def dispatch(key: str, op: Any, idempotency_key: str | None = None) -> Any:
        """Run ``op`` here, or on the process that owns ``key`` (one hop)."""
        readonly = admit(key, NEED[type(op)])
        return await node.call(
            pool,
            key,
            op,
            idempotency_key=idempotency_key,
            epoch=_epoch_header(),
            readonly=readonly,
        )

    @app.before_request
    async def _start_timer() -> None:
        request.start_time = time.perf_counter()  # type: ignore[attr-defined]

    @app.after_request
    async def _count(response: Response) -> Response:
        if _unread_body():
            # hypercorn drops a keep-alive connection whose request body was not read,
            # without telling the client: a client reusing it would wait for a reply forever
            response.headers["Connection"] = "close"
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(rule, request.method, str(response.status_code)).inc()
        start = getattr(request, "start_time", None)
        if start is not None:
            metrics.http_duration.labels(rule).observe(time.perf_counter() - start)
        return response

    @app.errorhandler(Error)
    async def _on_error(error: Error) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def _on_http_error(exc: HTTPException) -> Response:
        return _error_response(_http_error(exc))

    @app.errorhandler(Exception)
    async def _on_bug(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(Internal("unexpected server error; see the server log"))

    def idempotency_key() -> str | None:
        return request.headers.get("Idempotency-Key")

    @app.route("/v1/actors/<key>/sql", methods=["POST"])
    async def sql(key: str) -> Response:
        stmt = codec.decode_sql(await body(), codec.is_msgpack(request.content_type))
        op = Sql(stmt.sql, stmt.params)
        result = await dispatch(key_of(key), op, idempotency_key=idempotency_key())
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/batch", methods=["POST"])
    async def batch(key: str) -> Response:
        stmts = codec.decode_batch(await body(), codec.is_msgpack(request.content_type))
        result = await dispatch(key_of(key), Batch(stmts), idempotency_key=idempotency_key())
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/kv", methods=["GET"])
    async def kv_list(key: str) -> Response:
        args = request.args
        try:
            limit = int(args.get("limit", "100"))
        except ValueError:
            raise BadRequest(f"limit must be an integer, got {args.get('limit')!r}") from None
        op = KvList(args.get("prefix", ""), limit, args.get("after"))
        result = await dispatch(key_of(key), op)
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/kv/<path:name>", methods=["GET"])
    async def kv_get(key: str, name: str) -> Response:
        result = await dispatch(key_of(key), KvGet(name))
        return _respond(result.value if _wants_msgpack() else codec.blobs_out(result.value))

    @app.route("/v1/actors/<key>/kv/<path:name>", methods=["PUT"])
    async def kv_put(key: str, name: str) -> Response:
        value = codec.decode_value(await body(), codec.is_msgpack(request.content_type))
        result = await dispatch(key_of(key), KvPut(name, value), idempotency_key=idempotency_key())
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/kv/<path:name>", methods=["DELETE"])
    async def kv_delete(key: str, name: str) -> Response:
        result = await dispatch(key_of(key), KvDelete(name), idempotency_key=idempotency_key())
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/call/<method>", methods=["POST"])
    async def call(key: str, method: str) -> Response:
        body_ = codec.decode_call(await body(), codec.is_msgpack(request.content_type))
        op = CallMethod(method, body_.args, body_.kwargs, body_.workflow_id)
        result = await dispatch(key_of(key), op, idempotency_key=idempotency_key())
        return _respond(result.value if _wants_msgpack() else codec.blobs_out(result.value))

    @app.route("/v1/actors/<key>/workflows", methods=["GET"])
    async def workflows(key: str) -> Response:
        args = request.args
        try:
            limit = int(args.get("limit", "100"))
        except ValueError:
            raise BadRequest(f"limit must be an integer, got {args.get('limit')!r}") from None
        result = await dispatch(key_of(key), WorkflowList(args.get("status"), limit))
        return _respond({"workflows": codec.result_body(result, _wants_msgpack())["items"]})

    @app.route("/v1/actors/<key>/workflows/<path:workflow_id>", methods=["GET"])
    async def workflow_get(key: str, workflow_id: str) -> Response:
        result = await dispatch(key_of(key), WorkflowGet(workflow_id))
        return _respond(codec.result_body(result, _wants_msgpack()))

    @app.route("/v1/actors/<key>/export", methods=["GET"])
    async def export(key: str) -> Response:
        key = key_of(key)
        admit(key, "read")
        if node.route(key, _epoch_header()) is not None:  # elsewhere: its bytes come back
            exported = await dispatch(key, wire.Export())
            return Response(
                exported.data,
                200,
                {"Content-Disposition": f'attachment; filename="{_download_name(key)}"'},
                content_type="application/vnd.sqlite3",
            )
        path = await pool.export(key)
        headers = {
            "Content-Disposition": f'attachment; filename="{_download_name(key)}"',
            "Content-Length": str((await trio.Path(path).stat()).st_size),
        }
        return Response(
            _stream_and_remove(path), 200, headers, content_type="application/vnd.sqlite3"
        )

    @app.route("/v1/actors/<key>", methods=["DELETE"])
    async def delete(key: str) -> Response:
        key = key_of(key)
        admit(key, "write")
        if node.route(key, _epoch_header()) is not None:
            result = await dispatch(key, wire.Delete())
            return _respond({"deleted": result.deleted})
        deleted = await pool.delete(key)
        return _respond({"deleted": deleted})

    @app.route("/livez", methods=["GET"])
    async def livez() -> Response:
        return _respond({"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz() -> Response:
        checks = {
            "accepting": not pool.closing,
            "data_dir_writable": os.access(data_dir, os.W_OK),
            "sqlite": _sqlite_ok(),
            "directory": node.not_ready is None,
            "lease": node.lease.valid,
        }
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if node.not_ready:
            body["reason"] = node.not_ready
        body["node"] = node.id
        body["shards"] = sorted(node.served)
        if node.unservable:  # still ready: the other shards serve
            body["unservable"] = dict(sorted(node.unservable.items()))
        return _respond(body, 200 if ok else 503)

    @app.route("/metrics", methods=["GET"])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), 200, content_type=CONTENT_TYPE_LATEST)

    return app


def _bearer() -> str | None:
    """The token of ``Authorization: Bearer TOKEN`` (never logged, never echoed)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer TOKEN'")
    return token.strip()


def _epoch_header() -> int | None:
    """``Shardlite-Epoch``: the shard epoch a routing sender saw (absent: none)."""
    text = request.headers.get(EPOCH_HEADER)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{EPOCH_HEADER}: {text!r} is not an integer") from None


def _http_error(exc: HTTPException) -> Error:
    code = exc.code or 500
    if code == 404:
        bad_key = _bad_key_in_path()
        if bad_key is not None:
            return bad_key
        return NotFound(
            f"no such path: {request.method} {request.path} (see CONTRACT.md for the API)"
        )
    if code == 405:
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or []))
        return MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        )
    if code == 413:
        return TooLarge(f"the request body is over the limit of {request.max_content_length} bytes")
    if code == 408:
        return RequestTimeout("the request body did not arrive in time")
    if 400 <= code < 500:
        return BadRequest(exc.description or "bad request")
    return Internal(exc.description or "server error")


def _bad_key_in_path() -> Error | None:
    """The error for a path under /v1/actors/ whose key is invalid, if it is.

    Routing matches the decoded path, so a key that is empty or holds an encoded slash
    (``/v1/actors//sql``, ``/v1/actors/..%2Fx/sql``) matches no route; say why.
    """
    raw = request.scope.get("raw_path") or request.path.encode()
    parts = raw.decode("latin-1").split("/")
    if len(parts) < 4 or parts[1:3] != ["v1", "actors"]:
        return None
    try:
        validate_key(unquote(parts[3], errors="strict"))
    except BadRequest as exc:
        return exc
    except UnicodeDecodeError:
        return BadRequest("actor key is not valid UTF-8")
    return None


def _unread_body() -> bool:
    """The request came with a body that no handler read."""
    if getattr(request, "body_read", False):
        return False
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")


def _sqlite_ok() -> bool:
    try:
        conn = apsw.Connection(":memory:")
        try:
            return bool(conn.execute("SELECT 1").fetchall() == [(1,)])
        finally:
            conn.close()
    except apsw.Error:
        return False


def _download_name(key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe}.db"


async def _stream_and_remove(path: str) -> AsyncIterator[bytes]:
    try:
        async with await trio.open_file(path, "rb") as f:
            while chunk := await f.read(EXPORT_CHUNK_BYTES):
                yield chunk
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.unlink, path)
