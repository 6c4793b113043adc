"""ASGI guard in front of every route: the bearer token (when --api-key is set) and the body-size cap.

Pure ASGI rather than an HTTP middleware class, so streamed responses (SSE) pass through untouched.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

# Reachable without a token: the health probe, and the web UI (it has its own login).
PUBLIC = ("/healthz", "/ui")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the request body is over the {limit:,}-byte limit")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, which its clients turn into exceptions carrying the message."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def token_ok(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # compare_digest on bytes: the time taken does not depend on where a wrong token differs
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        public = any(path == p or path.startswith(p + "/") for p in PUBLIC)
        if self.api_key and not public and not token_ok(headers.get("authorization"), self.api_key):
            body = error_body("missing or wrong API key: send Authorization: Bearer <key>", "authentication_error",
                              code="invalid_api_key")
            return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            body = error_body(f"the request body ({length} bytes) is over the {self.max_body:,}-byte limit",
                              "invalid_request_error", code="request_too_large")
            return await JSONResponse(body, 413)(scope, receive, send)
        if public:
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():  # a body without Content-Length (chunked) is capped as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return await self.app(scope, counted, send)
