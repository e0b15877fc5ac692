"""A deadline for each request's headers, so that slow clients cannot hold connections forever.

uvicorn closes an idle kept-alive connection after timeout_keep_alive, but a client that connects and then sends
its request line and headers a byte at a time (slowloris) is never timed out: the app only sees a request once its
headers are complete, so no ASGI middleware can help. This is uvicorn's own h11 protocol with one timer more: from
the moment a connection opens, or the first byte of its next request arrives, the headers must be complete within
`seconds`; otherwise it gets 408 (JSON, code "request_timeout") and is closed. The body has its own deadline in
guard.py. Its malformed-request answer is JSON with a code too, like every other error of the server.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _raw_json_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + body.encode("ascii")


def header_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, with a deadline of `seconds` for each request's headers
    (uvicorn.Config(http=...))."""

    class HeaderDeadlineProtocol(H11Protocol):
        header_timeout = seconds
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:  # (part of) the next request's headers: its clock runs
                if self._deadline is None:
                    self._arm()
            else:  # the headers are in: the app and the body deadline take over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # until the next request's first byte (uvicorn's keep-alive timeout covers the wait)
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self._arm()  # a pipelined request already began

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                message = "the request is not valid HTTP/1.1"
                self.transport.write(_raw_json_response(400, "Bad Request", message, "invalid_http"))
                self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            message = f"the request headers did not arrive within {self.header_timeout:g} seconds"
            self.transport.write(_raw_json_response(408, "Request Timeout", message, "request_timeout"))
            self.transport.close()

    return HeaderDeadlineProtocol
