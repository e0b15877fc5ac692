"""What the server tests share: a live uvicorn server on 127.0.0.1 in a thread, raw HTTP helpers for what a
client library would refuse to send, and slow clients on raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import uvicorn

KEY = "test-key"
HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread, for the duration of a with-block. `config`:
    more uvicorn.Config settings."""

    def __init__(self, app, **config):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def post(url: str, path: str, body, *, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"}, **kwargs)
    return httpx.post(url + path, json=body, headers=headers, **kwargs)


def assert_error(response: httpx.Response, status: int, text: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and text in error["message"]
    return error


def trickling_clients(url: str, count: int, start: bytes, seconds: float = 6.0) -> list[tuple[bytes, float]]:
    """`count` connections that send `start`, then one more byte every 0.1 s until the server closes them (or
    `seconds` pass): per connection, what the server answered and when it closed, in seconds from the start."""
    host, port = url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]
    began, answers, closed = time.monotonic(), [b""] * count, [None] * count
    for connection in sockets:
        connection.sendall(start)
        connection.settimeout(0.01)
    while None in closed and time.monotonic() - began < seconds:
        for i, connection in enumerate(sockets):
            if closed[i] is not None:
                continue
            try:
                connection.sendall(b"x")
                while chunk := connection.recv(65536):
                    answers[i] += chunk
                closed[i] = time.monotonic() - began  # recv() gave b"": the server closed it
            except TimeoutError:
                pass
            except OSError:  # reset or broken pipe: closed too
                closed[i] = time.monotonic() - began
        time.sleep(0.1)
    for connection in sockets:
        connection.close()
    return list(zip(answers, closed))


def json_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]
