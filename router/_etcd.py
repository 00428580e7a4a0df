"""The directory's KvStore on a real etcd v3, through its JSON gRPC gateway (``/v3/*``).

No grpc and no asyncio: plain HTTP with httpx under trio. The gateway's JSON carries keys
and values in base64 and int64 fields as strings, and leaves out false and zero fields
(``succeeded`` is missing when a transaction's compare failed, ``TTL`` when a lease has
expired). Waiting for a change is etcd's watch: one streamed request on the directory's
prefix from the next revision on, which answers in newline-delimited JSON.

Several endpoints (``http://a:2379,http://b:2379``) are tried in turn when one refuses
the connection; any other failure raises :class:`DirectoryUnavailable` at once (a
request that may have been applied is never sent twice).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import trio

from ._kv import Delete, DirectoryUnavailable, KvEntry, KvStore, Put

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
WATCH_PREFIX = "/shardlite/"  # what wait_revision watches: the directory's keys
_STREAM_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)


def _b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(data: Any) -> bytes:
    return base64.b64decode(data or "")


def _prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's rule)."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64(b"\0")  # every key
    raw[-1] += 1
    return _b64(bytes(raw))


def _revision(answer: Any) -> int:
    return int(answer["header"]["revision"])


class EtcdKv(KvStore):
    """A :class:`KvStore` on etcd; ``endpoints`` is ``http://host:port[,http://...]``."""

    def __init__(
        self,
        endpoints: str,
        prefix: str = WATCH_PREFIX,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: a fake etcd
    ) -> None:
        self.endpoints = [e.strip().rstrip("/") for e in endpoints.split(",") if e.strip()]
        if not self.endpoints:
            raise ValueError("etcd: no endpoint given")
        hosts = ",".join(e.split("://", 1)[-1] for e in self.endpoints)
        self.url = f"etcd://{hosts}"
        self.prefix = prefix
        self._current = 0  # the endpoint that answered last
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )

    async def open(self) -> EtcdKv:
        """Check that etcd answers (fails within a few seconds if it does not)."""
        try:
            await self._post("/v3/kv/range", {"key": _b64(self.prefix), "count_only": True})
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _send(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        """Send to the current endpoint, moving on to the next ones if it is unreachable."""
        error: Exception | None = None
        for _ in self.endpoints:
            endpoint = self.endpoints[self._current]
            request = self._client.build_request(
                "POST",
                endpoint + path,
                json=body,
                # a watch waits as long as its caller wants: no read timeout
                timeout=_STREAM_TIMEOUT if stream else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                return await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = exc  # never reached etcd: safe to try the next endpoint
                self._current = (self._current + 1) % len(self.endpoints)
            except httpx.HTTPError as exc:
                raise DirectoryUnavailable(f"{self.url}: {path}: {_describe(exc)}") from exc
        assert error is not None
        raise DirectoryUnavailable(f"{self.url} is unreachable: {_describe(error)}") from error

    def _parse(self, path: str, status: int, text: str) -> Any:
        """The answer's JSON object; DirectoryUnavailable for an error or a bad answer."""
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise DirectoryUnavailable(
                f"{self.url}: {path}: HTTP {status}: bad answer {text[:200]!r}"
            )
        error = answer.get("error") or (None if status < 400 else f"HTTP {status}")
        if error:
            message = error.get("message", error) if isinstance(error, dict) else error
            raise DirectoryUnavailable(f"{self.url}: {path}: {message}")
        return answer.get("result", answer)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = await self._send(path, body, stream=False)
        return self._parse(path, response.status_code, response.text)

    @contextlib.contextmanager
    def _reading(self, path: str) -> Iterator[None]:
        """Reading an answer's fields: a missing or malformed one is a bad answer."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DirectoryUnavailable(f"{self.url}: {path}: bad answer: {exc!r}") from exc

    async def get_prefix(self, prefix: str) -> tuple[int, list[KvEntry]]:
        answer = await self._post(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        )
        with self._reading("/v3/kv/range"):
            entries = [
                KvEntry(
                    key=_unb64(kv["key"]).decode("utf-8"),
                    value=_unb64(kv.get("value")),
                    mod_revision=int(kv.get("mod_revision", 0)),
                    lease=int(kv.get("lease", 0)),
                )
                for kv in answer.get("kvs", [])
            ]
            entries.sort(key=lambda e: e.key.encode("utf-8"))
            return _revision(answer), entries

    async def txn(self, compare: Sequence[tuple[str, int]], ops: Sequence[Put | Delete]) -> bool:
        body = {
            # an absent key compares as mod_revision 0 in etcd too
            "compare": [
                {"target": "MOD", "result": "EQUAL", "key": _b64(key), "mod_revision": str(rev)}
                for key, rev in compare
            ],
            "success": [
                {
                    "request_put": {
                        "key": _b64(op.key),
                        "value": _b64(op.value),
                        "lease": str(op.lease),
                    }
                }
                if isinstance(op, Put)
                else {"request_delete_range": {"key": _b64(op.key)}}
                for op in ops
            ],
        }
        answer = await self._post("/v3/kv/txn", body)  # an expired lease: "lease not found"
        return bool(answer.get("succeeded", False))

    async def grant(self, ttl_s: float) -> int:
        ttl = max(1, math.ceil(ttl_s))  # etcd counts whole seconds
        answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        with self._reading("/v3/lease/grant"):
            return int(answer["ID"])

    async def keepalive(self, lease: int) -> bool:
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        with self._reading("/v3/lease/keepalive"):
            return int(answer.get("TTL", 0)) > 0  # etcd answers TTL 0 for an expired lease

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)})
        except DirectoryUnavailable as exc:
            if "lease not found" not in str(exc):  # already gone, with its keys
                raise

    async def _current_revision(self) -> int:
        answer = await self._post("/v3/kv/range", {"key": _b64(self.prefix), "count_only": True})
        with self._reading("/v3/kv/range"):
            return _revision(answer)

    async def wait_revision(self, after: int, timeout_s: float) -> int:
        """Watch the directory's prefix from ``after + 1``: the first change ends the wait.

        Writes outside the prefix do not end it (they are not the directory's)."""
        watch = {
            "create_request": {
                "key": _b64(self.prefix),
                "range_end": _prefix_end(self.prefix),
                "start_revision": str(after + 1),
            }
        }
        outcome: int | DirectoryUnavailable | None = None
        with trio.move_on_after(timeout_s) as scope:
            response = await self._send("/v3/watch", watch, stream=True)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    self._parse("/v3/watch", response.status_code, response.text)
                # never break out of this loop: leave it by cancelling the stream, so that
                # each of httpx's nested stream generators ends too (none is left to the GC)
                async for line in response.aiter_lines():
                    if outcome is None and line.strip():
                        try:
                            outcome = self._watched(response.status_code, line)
                        except DirectoryUnavailable as exc:
                            outcome = exc
                        if outcome is not None:
                            scope.cancel()
            except httpx.HTTPError as exc:
                raise DirectoryUnavailable(f"{self.url}: /v3/watch: {_describe(exc)}") from exc
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()
        if isinstance(outcome, DirectoryUnavailable):
            raise outcome
        return outcome or await self._current_revision()

    def _watched(self, status: int, line: str) -> int | None:
        """One watch answer: its revision if it has events, 0 if the watch was cancelled
        (e.g. ``after + 1`` was compacted away), None if it is news of no change."""
        result = self._parse("/v3/watch", status, line)
        with self._reading("/v3/watch"):
            if result.get("events"):
                return _revision(result)
            return 0 if result.get("canceled") else None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._client.aclose()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["EtcdKv"]
