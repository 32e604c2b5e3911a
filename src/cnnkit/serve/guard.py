"""The server's outer guard, a plain ASGI middleware in front of the app: the bearer token and
the request-body limit.

The body limit is enforced while the body is read, so a chunked upload (no Content-Length)
is cut off at the limit instead of being buffered: a declared length over the limit is
refused before a byte is read, and an undeclared one as soon as the bytes received pass it.
Tokens are compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

OPEN_PATHS = ("/", "/healthz", "/readyz")  # answered without a token (the page asks for it; health checks)


class BodyTooLarge(Exception):
    pass


async def send_json(send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


class Guard:
    """``app`` behind a token check (every path but :data:`OPEN_PATHS` when ``token`` is set)
    and a limit of ``max_body`` bytes on request bodies (413 beyond it)."""

    def __init__(self, app, max_body: int, token: str | None = None):
        self.app = app
        self.max_body = max_body
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            given = _header(scope, b"authorization") or b""
            ok = given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:].strip(), self.token)
            if not ok:
                return await send_json(send, 401, {"detail": "a valid 'Authorization: Bearer <token>' header is "
                                                             "required"}, [(b"www-authenticate", b"Bearer")])
        declared = _header(scope, b"content-length")
        limit_mb = f"{self.max_body / 2**20:g} MB"
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body
            except ValueError:
                return await send_json(send, 400, {"detail": "the Content-Length header is not a number"})
            if too_big:
                return await send_json(send, 413, {"detail": f"the request body is larger than {limit_mb}"},
                                       [(b"connection", b"close")])
        received = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # the app's own answer to the interrupted read (a 500) is replaced below
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if over and not started:
            await send_json(send, 413, {"detail": f"the request body is larger than {limit_mb}"},
                            [(b"connection", b"close")])
