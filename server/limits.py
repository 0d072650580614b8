"""Request body size limit, enforced while the body streams in (Content-Length may be absent or lie)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import InvalidRequest, PayloadTooLarge, error_response

# RFC 9110: Content-Length = 1*DIGIT, ASCII only (bytes.isdigit() agrees, but str.isdigit() and int() take "¹", " 1", "1_0").
CONTENT_LENGTH_RE = re.compile(rb"[0-9]{1,18}")


class BodyTooLarge(Exception):
    pass


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None when absent; a malformed one is a 400."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is None:
        return None
    if not CONTENT_LENGTH_RE.fullmatch(declared):
        raise InvalidRequest(
            f"invalid Content-Length header {declared[:40].decode('latin-1')!r}: use ASCII digits only"
        )
    return int(declared)


class BodyLimitMiddleware:
    """Every body at most `max_bytes`, but a POST to a path of `uploads` (path -> (bytes, the setting that
    sets them)) at most that path's."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, uploads: dict[str, tuple[int, str]] | None = None) -> None:
        self.app, self.max_bytes, self.uploads = app, max_bytes, uploads or {}

    def limit(self, scope: Scope) -> tuple[int, str]:
        if scope.get("method") == "POST" and scope.get("path") in self.uploads:
            return self.uploads[scope["path"]]
        return self.max_bytes, "ALIGNER_MAX_REQUEST_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = declared_length(scope)
        except InvalidRequest as err:
            await error_response(err)(scope, receive, send)
            return
        limit = self.limit(scope)
        if declared is not None and declared > limit[0]:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit[0]:
                    # Answer now: FastAPI turns any error while it reads a body into its own 400
                    # ("There was an error parsing the body"), which tracking_send then drops.
                    if not started and not refused:
                        refused = True
                        await self._refuse(scope, receive, send, limit)
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started and not refused:
                await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: tuple[int, str]) -> None:
        err = PayloadTooLarge(
            f"request body exceeds the limit of {limit[0]} bytes ({limit[1]})", code="request_too_large"
        )
        await error_response(err)(scope, receive, send)
