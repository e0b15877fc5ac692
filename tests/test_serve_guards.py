"""The server's guards against hostile or broken clients: the Host-header check (DNS rebinding), deadlines for
slow clients, the Authorization header, and errors that always say what went wrong (a non-null `code`). A tiny
model behind a live server on 127.0.0.1, as in test_serve_api.py."""

from __future__ import annotations

import argparse
import time

import httpx
import pytest
from helpers import lively_model
from serving import HELLO, KEY, LiveServer, assert_error, json_error, post, trickling_clients

from picochat import engine as engine_module
from picochat.cli import main
from picochat.engine import Engine
from picochat.serve.app import ServeSettings, create_app
from picochat.serve.deadlines import header_deadline_protocol
from picochat.serve.hosts import accepted_hosts, host_name
from picochat.serve.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    return Engine(lively_model(tokenizer.vocab_size, 512), tokenizer)


@pytest.fixture(scope="module")
def server(engine):
    settings = ServeSettings(api_key=KEY, allowed_hosts=accepted_hosts("127.0.0.1", ("chat.example.org",)))
    with LiveServer(create_app(Scheduler(engine, max_batch=4, queue_size=8), settings)) as url:
        yield url


# ---- Host header ------------------------------------------------------------------------------------------


def test_only_the_servers_own_host_names_are_answered(server):
    port = server.rsplit(":", 1)[1]
    for host in ["127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}",
                 "localhost.", "chat.example.org", f"Chat.Example.Org:{port}"]:  # fmt: skip
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200, host
    for host in ["attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost:x",
                 "[::2]", "127.0.0.1@attacker.example", "", "[::1"]:  # fmt: skip
        response = httpx.get(server + "/health", headers={"Host": host})
        assert assert_error(response, 400)["code"] == "invalid_host", host
        assert host not in response.text or not host  # the value is not echoed
    # The check comes before the key: a rebinding page learns nothing, not even that a key is needed.
    response = httpx.post(server + "/v1/chat/completions", json={"messages": HELLO},
                          headers={"Host": "attacker.example"})  # fmt: skip
    assert assert_error(response, 400)["code"] == "invalid_host"
    assert 'picochat_rejected_total{reason="host"}' in httpx.get(server + "/metrics", headers={
        "Authorization": f"Bearer {KEY}"}).text  # fmt: skip


def test_accepted_host_names_follow_the_bound_address():
    assert accepted_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert accepted_hosts("::1") == {"127.0.0.1", "localhost", "::1"}
    assert accepted_hosts("127.0.0.2") == {"127.0.0.1", "127.0.0.2", "localhost", "::1"}
    assert accepted_hosts("192.168.1.5") == {"192.168.1.5"}
    assert accepted_hosts("fd00::5", ("Box.Local.",)) == {"fd00::5", "box.local"}
    assert accepted_hosts("0.0.0.0") is None and accepted_hosts("::") is None  # any, with a warning at start
    assert accepted_hosts("0.0.0.0", ("chat.example.org",)) == {"chat.example.org", "127.0.0.1", "localhost", "::1"}
    assert host_name("[::1]:80") == "::1" and host_name("a.b:8000") == "a.b" and host_name("a.b:") is None


@pytest.mark.parametrize("value", ["*", "https://chat.example.org", "chat.example.org:80", "a/b", ""])
def test_allowed_host_mistakes_are_one_line_errors(capsys, tmp_path, value):
    assert main(["serve", "--run-dir", str(tmp_path), "--allowed-host", value]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("picochat: error: --allowed-host")


# ---- slow clients ---------------------------------------------------------------------------------------

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def strict_server(engine):
    """A server whose clients must send their headers, and then their body, within READ_TIMEOUT seconds."""
    settings = ServeSettings(api_key=KEY, body_timeout=READ_TIMEOUT, cors_origins=("https://good.example",))
    app = create_app(Scheduler(engine, max_batch=2, queue_size=4), settings)
    with LiveServer(app, http=header_deadline_protocol(READ_TIMEOUT), timeout_keep_alive=1) as url:
        yield url


def test_clients_that_trickle_their_headers_are_timed_out_and_others_still_served(strict_server):
    started = time.monotonic()
    results = trickling_clients(strict_server, 12, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    for answer, closed in results:
        assert closed is not None and READ_TIMEOUT * 0.9 < closed < READ_TIMEOUT + 2.5
        status, error = json_error(answer)
        assert status == 408 and error["code"] == "request_timeout"
    assert httpx.get(strict_server + "/health").status_code == 200
    # A client that connects and says nothing is cut the same way.
    ((answer, closed),) = trickling_clients(strict_server, 1, b"")
    assert json_error(answer)[0] == 408 and closed < READ_TIMEOUT + 2.5
    assert time.monotonic() - started < 15


def test_clients_that_trickle_their_body_are_timed_out(strict_server):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{").encode()  # fmt: skip
    for answer, closed in trickling_clients(strict_server, 4, head):
        status, error = json_error(answer)
        assert status == 408 and error["code"] == "request_timeout" and "body" in error["message"]
        assert closed is not None and closed < READ_TIMEOUT + 2.5
    # Malformed HTTP is a JSON error with a code too (uvicorn's own answer is plain text).
    ((answer, _),) = trickling_clients(strict_server, 1, b"NOT HTTP\r\n\r\n")
    status, error = json_error(answer)
    assert status == 400 and error["code"] == "invalid_http"


# ---- the API key ----------------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"]:
        response = httpx.get(server + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert response.status_code == 200, scheme
    for value in [f"Basic {KEY}", f"Bearer{KEY}", f"Bearer {KEY}x", "bearer", KEY]:
        response = httpx.get(server + "/v1/models", headers={"Authorization": value})
        assert assert_error(response, 401)["code"] == "invalid_api_key", value


# ---- the reply's room without max_tokens ----------------------------------------------------------------


def prompt_of(engine: Engine, tokens: int) -> list[dict]:
    """A one-message conversation whose prompt is `tokens` tokens long."""
    for words in range(tokens):
        for pad in range(8):
            messages = [{"role": "user", "content": "word " * words + " q" * pad}]
            if len(engine.tokenizer.render_for_completion(messages)) == tokens:
                return messages
    raise AssertionError(f"no prompt of {tokens} tokens")


def test_without_max_tokens_a_long_prompt_gets_the_room_that_is_left(engine, server):
    assert engine.context_len == 512 and engine.reply_budget() == 256
    messages = prompt_of(engine, 305)  # 305 + the default 256 > 512, but 207 tokens are left for the reply
    kept, prompt = engine.fit_conversation(messages)
    assert kept == messages and len(prompt) == 305 and engine.reply_tokens(prompt) == 207
    reply = post(server, "/v1/chat/completions", {"messages": messages, "temperature": 0}, timeout=120)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] == 305 and usage["completion_tokens"] <= 207
    # An explicit max_tokens is a promise: it must fit.
    refused = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 256})
    assert assert_error(refused, 400, "max_tokens 256")["code"] == "context_length_exceeded"
    # Without one, at least MIN_REPLY_TOKENS must be left.
    assert engine_module.MIN_REPLY_TOKENS == 32
    crowded = post(server, "/v1/chat/completions", {"messages": prompt_of(engine, 512 - 31)})
    assert assert_error(crowded, 400, "fewer than 32 tokens")["code"] == "context_length_exceeded"
    assert (
        post(server, "/v1/chat/completions", {"messages": prompt_of(engine, 480), "max_tokens": 1}).status_code == 200
    )


# ---- error messages and codes ---------------------------------------------------------------------------


def test_a_non_finite_temperature_or_top_p_is_said_to_be_one(server):
    for field in ["temperature", "top_p"]:
        for value in ["NaN", "Infinity", "-Infinity"]:
            body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
            error = assert_error(post(server, "/v1/chat/completions", body), 400, "finite number")
            assert error["param"] == field and error["code"], (field, value)


def test_every_error_carries_a_code(server, strict_server):
    big = {"messages": [{"role": "user", "content": "x" * 2_000_000}]}
    cases = [
        (httpx.get(server + "/no/such/path", headers={"Authorization": f"Bearer {KEY}"}), 404),
        (httpx.put(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}), 405),
        (httpx.get(server + "/v1/models"), 401),
        (post(server, "/v1/chat/completions", {"messages": HELLO, "n": 100}), 400),
        (post(server, "/v1/chat/completions", {"messages": HELLO, "logprobs": True}), 400),
        (post(server, "/v1/chat/completions", {"messages": [*HELLO, {"role": "system", "content": "x"}]}), 400),
        (post(server, "/v1/chat/completions", {"messages": HELLO, "stop": ["x"] * 9}), 400),
        (post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
         400),
        (post(server, "/v1/completions", {"prompt": [], "max_tokens": 1}), 400),
        (post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 0}), 400),
        (post(server, "/v1/chat/completions", "{not json"), 400),
        (post(server, "/v1/chat/completions", big), 413),
        (httpx.options(strict_server + "/v1/models", headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "POST"}), 400),
    ]  # fmt: skip
    for response, status in cases:
        error = assert_error(response, status)
        assert isinstance(error["code"], str) and error["code"], (status, error)


def test_a_wildcard_bind_answers_any_host_with_a_warning_unless_names_are_given(monkeypatch):
    from picochat.stages import serve as serve_stage

    warnings = []
    monkeypatch.setattr(serve_stage, "warn", warnings.append)
    parser = argparse.ArgumentParser()
    serve_stage.add_arguments(parser)
    settings = serve_stage._settings(parser.parse_args(["--host", "0.0.0.0", "--api-key", KEY]))
    assert settings.allowed_hosts is None and any("--allowed-host" in w for w in warnings)
    warnings.clear()
    args = parser.parse_args(["--host", "0.0.0.0", "--api-key", KEY, "--allowed-host", "chat.example.org"])
    assert "chat.example.org" in serve_stage._settings(args).allowed_hosts and not warnings
