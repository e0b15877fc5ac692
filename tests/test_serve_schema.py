"""Property-based API testing with schemathesis against the live server's /openapi.json: for generated requests,
valid and invalid alike, no response is a 5xx, every status is one the schema documents, and every body matches
its documented schema. Bounded: a few examples per operation, short generations, a time limit."""

from __future__ import annotations

import threading
import time

import pytest
import schemathesis
import torch
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from picochat.engine import Engine
from picochat.gpt import GPT, GPTConfig
from picochat.serve.app import ServeSettings, create_app
from picochat.serve.scheduler import Scheduler
from picochat.tokenizer import Tokenizer

KEY = "schema-key"
AUTHORIZATION = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation and mode
TIME_LIMIT = 30.0  # seconds per mode; examples past it are skipped
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_url():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and robust on a busy CPU
    ranks = {bytes([b]): b for b in range(256)}
    tokenizer = Tokenizer(ranks)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    engine = Engine(GPT.build(config, "cpu"), tokenizer)
    # Short generations keep each example fast: the schema documents max_tokens <= 24.
    app = create_app(Scheduler(engine, max_batch=8, queue_size=32),
                     ServeSettings(api_key=KEY, max_tokens_limit=24, request_timeout=10))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def api_schema(live_url):
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json", headers=AUTHORIZATION)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(api_schema, live_url, mode):
    """Every operation, with data that fits the schema and data that does not."""
    started = time.monotonic()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 5
    calls = []

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to get wrong in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
        def check(case):
            if time.monotonic() - started > TIME_LIMIT:
                return
            response = case.call_and_validate(base_url=live_url, headers=AUTHORIZATION, checks=CHECKS, timeout=30)
            calls.append(response.status_code)

        check()
    assert len(calls) >= len(operations)  # it really ran
    assert all(status < 500 for status in calls)


def test_schema_documents_the_api(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert paths == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    chat = api_schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "413", "429"} <= set(chat) and "422" not in chat
    assert "text/event-stream" in chat["200"]["content"]
