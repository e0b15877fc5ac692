"""The guard: one ASGI middleware for the API key, the rate limit, the body limit and the body-read deadline,
security headers and request metrics (moved out of app.py, which wires it in).

The API key is checked as RFC 6750 says: `Authorization: Bearer <key>`, the scheme name in any case ("bearer"
works too, as RFC 9110 makes scheme names case-insensitive). A client must send its whole body within
body_timeout seconds of the headers (408 otherwise): a slow-drip body would otherwise hold its connection and
its memory forever (the headers' own deadline is in deadlines.py).

JsonCORSMiddleware is Starlette's CORS middleware whose refused preflight is a JSON error with a code, like every
other error of the server, not plain text.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time

from starlette.middleware.cors import CORSMiddleware

from picochat.serve.protocol import error_response


class RateLimiter:
    """Per client address, a token bucket: `per_minute` requests of burst, refilled at per_minute / 60 a second.
    (Behind a reverse proxy every client has the proxy's address: limit there instead.)"""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, time of the last update)

    def retry_after(self, address: str) -> float:
        """0 if the request may go ahead (and it is counted), else the seconds until it may."""
        now, rate = time.monotonic(), self.per_minute / 60
        tokens, last = self.buckets.get(address, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - last) * rate)
        if tokens < 1:
            self.buckets[address] = (tokens, now)
            return (1 - tokens) / rate
        self.buckets[address] = (tokens - 1, now)
        if len(self.buckets) > 10_000:  # forget clients whose bucket is full again
            self.buckets = {a: (t, u) for a, (t, u) in self.buckets.items() if t + (now - u) * rate < self.per_minute}
        return 0.0


class Guard:
    def __init__(self, app, *, settings, metrics, public_paths: set[str]):
        """settings: the server's ServeSettings; metrics: its Metrics; public_paths: paths that need no key."""
        self.app, self.settings, self.metrics, self.public_paths = app, settings, metrics, public_paths
        self.limiter = RateLimiter(settings.rate_limit) if settings.rate_limit > 0 else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, status = time.monotonic(), scope["path"], [500]
        endpoint = path if path in self.metrics.duration else "other"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]  # fmt: skip
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.requests[(endpoint, status[0])] += 1
                if endpoint in self.metrics.duration:
                    self.metrics.duration[endpoint].observe(time.monotonic() - started)

        key = self.settings.api_key
        if key and path not in self.public_paths and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          kind="authentication_error", code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send_with_headers)
        if self.limiter is not None and scope["method"] == "POST" and path.startswith("/v1/"):
            wait = self.limiter.retry_after((scope.get("client") or ("unknown", 0))[0])
            if wait > 0:
                self.metrics.rejected["rate_limit"] += 1
                response = error_response(429, f"rate limit of {self.settings.rate_limit} requests per minute "
                                          "reached: retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                                          headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
                return await response(scope, receive, send_with_headers)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.settings.body_timeout)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                seconds = self.settings.body_timeout
                response = error_response(408, f"the request body did not arrive within {seconds:g} seconds",
                                          code="request_timeout", headers={"Connection": "close"})  # fmt: skip
                return await response(scope, receive, send_with_headers)
            if body is None:
                limit = self.settings.max_body_bytes
                response = error_response(413, f"request body larger than {limit} bytes", code="body_too_large")
                return await response(scope, receive, send_with_headers)
            receive = _replay(body, receive)
        await self.app(scope, receive, send_with_headers)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None if it is over the limit (read no further than that)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that gives the already-read body once, then listens to the client again (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class JsonCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        keep = {name: value for name, value in response.headers.items()
                if name.lower() not in ("content-type", "content-length")}  # fmt: skip
        return error_response(response.status_code, response.body.decode("utf-8", "replace"), code="cors_refused",
                              headers=keep)  # fmt: skip
