"""The server's guards against hostile or broken clients: the Host-header check (DNS rebinding), deadlines for
slow clients, the Authorization header, and errors that always say what went wrong (a non-null `code`). A tiny
model behind a live server on 127.0.0.1, as in test_serve_api.py."""

from __future__ import annotations

import httpx
import pytest
from helpers import lively_model
from serving import HELLO, KEY, LiveServer, assert_error

from picochat.cli import main
from picochat.engine import Engine
from picochat.serve.app import ServeSettings, create_app
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
