"""ASGI middleware: API keys and the body size limit before anything is parsed, and request metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from kleinbild.serve.bfl import ROUTES as BFL_ROUTES
from kleinbild.serve.metrics import Metrics
from kleinbild.serve.settings import ServerSettings

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict,
                     headers: Mapping[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def _error_body(message: str, code: str, param: str | None = None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Guard:
    """Host names, API keys (before any body is read), the body size limit and a body read timeout, as plain ASGI,
    so nothing oversized, slow or for another host is parsed.

    The body is read here, up to the limit, and replayed to the app; after it, `receive` is the server's
    again, so disconnects still reach the handlers.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.limit = settings.max_upload_bytes
        self.generation_limit = min(settings.max_upload_bytes, settings.max_generation_bytes)
        self.body_timeout = settings.body_timeout
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        # Digests, so the comparison time depends on neither the key's content nor its length.
        self.keys = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]

    def _needs_key(self, path: str) -> bool:
        # /v1/files/ are capability URLs (unguessable ids) so <img src> works without headers.
        api = path.startswith("/v1/") and not path.startswith("/v1/files/")
        return bool(self.keys) and (path == "/metrics" or api)

    def _authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        tokens = []
        for k, v in headers:
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    tokens.append(token)
            elif k == b"x-key":  # BFL's API key header, so BFL clients work unchanged (serve/bfl.py)
                tokens.append(v.decode("latin-1"))
        ok = False
        for token in tokens:
            digest = hashlib.sha256(token.strip().encode()).digest()
            for key in self.keys:  # no early exit: the time does not say which key (if any) matched
                ok |= hmac.compare_digest(digest, key)
        return ok

    def _host_allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """DNS rebinding: a page on another site must not reach a local server through a name that resolves here."""
        if not self.hosts:
            return True
        host = dict(headers).get(b"host", b"").decode("latin-1").lower()
        name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]  # [::1]:8000
        return host in self.hosts or name in self.hosts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._host_allowed(scope["headers"]):
            await _send_json(send, 400, _error_body(
                "this server does not answer for that Host; allow it with --allowed-host", "invalid_host"))
            return
        if scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._needs_key(scope["path"]) and not self._authorised(scope["headers"]):
            await _send_json(send, 401, _error_body(
                "missing or wrong API key; send 'Authorization: Bearer <key>' (or 'x-key: <key>')",
                "invalid_api_key"),
                {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await self._body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _body(self, scope: dict, receive: Callable, send: Callable) -> bytes | None:
        """The whole body, or None once an error was answered (too big, too slow, bad length, client gone)."""
        # A generation carries no image, so its body is held to a much smaller bound than an edit's.
        limit = self.generation_limit if scope["path"] == "/v1/images/generations" else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, _error_body("bad Content-Length", "invalid_request"))
                return None
            if declared > limit:
                await _send_json(send, 413, _error_body(
                    f"the body is {declared} bytes; at most {limit} are accepted here", "request_too_large"))
                return None
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=self.body_timeout)
            except TimeoutError:
                await _send_json(send, 408, _error_body(
                    f"the body did not arrive within {self.body_timeout:g} s", "request_timeout"))
                return None
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _send_json(send, 413, _error_body(
                    f"the body is over {limit} bytes, the most accepted here", "request_too_large"))
                return None
            if not msg.get("more_body", False):
                return b"".join(chunks)


def _route_label(path: str) -> str:
    """Bounded label values: ids collapse into their route."""
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}/events" if path.endswith("/events") else "/v1/jobs/{id}"
    if path.startswith("/v1/files/"):
        return "/v1/files/{name}"
    if path in ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/images/edits", "/v1/jobs"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path in BFL_ROUTES:
        return path
    return "other"


class Observe:
    """Counts every request by route and status, whatever answered it (guards, handlers, errors)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def watch(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = _route_label(scope["path"])
            self.metrics.inc("kleinbild_http_requests_total", method=scope["method"], route=route, status=str(status))
            if not route.endswith("/events"):
                self.metrics.observe("kleinbild_http_request_seconds", time.perf_counter() - t0, route=route)
