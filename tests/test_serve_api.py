"""Serving: continuous batching underneath (the slot KV cache and the scheduler) and the OpenAI-compatible API of a
live server on 127.0.0.1, driven with the official `openai` package and with raw HTTP for what a client library
would refuse to send. The model is a tiny GPT saved as a run folder, loaded the way `picochat serve` loads one."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import lively_model
from serving import HELLO, KEY, LiveServer, assert_error, json_error, post, trickling_clients

import picochat
from picochat.attention import SlotKVCache
from picochat.checkpoint import save_checkpoint
from picochat.cli import main
from picochat.common import atomic_write_json
from picochat.engine import Engine
from picochat.gpt import GPT
from picochat.serve.app import ServeSettings, create_app
from picochat.serve.scheduler import GenerationJob, Scheduler

SEQUENCE_LEN = 512  # the models' short window is then 128 tokens, shorter than the rows the tests decode


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run folder made the way the pipeline makes one: tokenizer/ + sft/{config.json, weights}."""
    run = tmp_path_factory.mktemp("run")
    tokenizer.save(run / "tokenizer")
    model = lively_model(tokenizer.vocab_size, SEQUENCE_LEN)
    save_checkpoint(run / "sft", 1, model.state_dict(), {})
    atomic_write_json(run / "sft" / "config.json", {"model": model.config.to_dict()})
    return run


@pytest.fixture(scope="module")
def engine(run_dir) -> Engine:
    model, tokenizer = picochat.load(run_dir)
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def server(engine):
    scheduler = Scheduler(engine, max_batch=8, queue_size=16)
    settings = ServeSettings(model_id="picochat-test", api_key=KEY, max_tokens_limit=200, max_message_chars=2000,
                             max_body_bytes=100_000)  # fmt: skip
    with LiveServer(create_app(scheduler, settings)) as url:
        yield url, scheduler


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- the engine underneath: rows at different positions in one forward ------------------------------------


def single_row_greedy(model: GPT, prompt: list[int], steps: int) -> list[int]:
    cache = model.new_kv_cache(batch_size=1, max_len=len(prompt) + steps)
    logits = model(torch.tensor([prompt]), kv_cache=cache)[:, -1]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), kv_cache=cache)[:, -1]
    return tokens


@torch.inference_mode()
def test_slot_cache_decodes_rows_at_different_positions_like_single_rows(tokenizer):
    """Rows of different lengths join and leave a batch; each must produce exactly its single-row greedy tokens,
    through short windows (128) that the rows run past, with a row removed from the middle and one added late."""
    model = lively_model(tokenizer.vocab_size, SEQUENCE_LEN)
    assert model.window_sizes[:3] == [128, 128, 128]
    texts = ["The city", "In 1850 the railway reached the town and the population grew quickly " * 2, "A", "Music"]
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in texts]
    steps = [170, 40, 150, 120]
    expected = [single_row_greedy(model, prompt, n) for prompt, n in zip(prompts, steps)]

    cache = model.new_slot_cache(capacity=3, max_len=320)
    assert isinstance(cache, SlotKVCache)
    rows, outputs, logits = [], {i: [] for i in range(4)}, []

    def join(request: int) -> None:
        prefill = model.new_kv_cache(batch_size=1, max_len=len(prompts[request]))
        logits.append(model(torch.tensor([prompts[request]]), kv_cache=prefill, last_only=True)[:, -1])
        cache.add_row(prefill)
        rows.append(request)

    for request in range(3):
        join(request)
    current = torch.cat(logits)
    for step in range(200):
        tokens = current.argmax(dim=-1).tolist()
        for row, request in enumerate(rows):
            outputs[request].append(tokens[row])
        done = [row for row, request in enumerate(rows) if len(outputs[request]) == steps[request]]
        order = cache.remove_rows(done)
        rows, tokens = [rows[i] for i in order], [tokens[i] for i in order]
        current = model(torch.tensor(tokens).unsqueeze(1), kv_cache=cache)[:, -1] if rows else current[:0]
        if step == 45:  # a request joins a running batch (after request 1 has left)
            logits = [current]
            join(3)
            current = torch.cat(logits)
        if not rows:
            break
    assert [outputs[i] for i in range(4)] == expected
    assert cache.batch_size == 0


@torch.inference_mode()
def test_slot_cache_logits_match_a_full_forward(tokenizer):
    model = lively_model(tokenizer.vocab_size, SEQUENCE_LEN)
    sequences = [torch.randint(0, tokenizer.vocab_size, (length,)) for length in (150, 20, 90)]
    cache = model.new_slot_cache(capacity=4, max_len=200)
    for sequence in sequences:
        prefill = model.new_kv_cache(batch_size=1, max_len=len(sequence) - 5)
        model(sequence[None, :-5], kv_cache=prefill)
        cache.add_row(prefill)
    assert cache.lengths == [145, 15, 85]
    # Two tokens per row in one forward (T = 2), then the remaining three one at a time.
    chunks = [model(torch.stack([s[-5:-3] for s in sequences]), kv_cache=cache)]
    for offset in (-3, -2, -1):
        chunks.append(model(torch.stack([s[offset:][:1] for s in sequences]), kv_cache=cache))
    batched = torch.cat(chunks, dim=1)
    for row, sequence in enumerate(sequences):
        full = model(sequence[None])[0, -5:]
        torch.testing.assert_close(batched[row], full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="full"):
        cache.check_room(60)


def test_scheduler_batches_requests_and_reproduces_the_engine(engine, tokenizer):
    """Concurrent requests of different lengths (greedy and seeded sampling, n=3) share forwards and give exactly
    what Engine.generate gives each of them alone."""
    prompts = [tokenizer.render_for_completion([{"role": "user", "content": text}])
               for text in ["Hi", "Tell me about the history of the Roman empire, please. " * 3, "2+2?"]]  # fmt: skip
    jobs = [GenerationJob(prompt=prompt, max_tokens=120, temperature=0) for prompt in prompts]
    jobs.append(GenerationJob(prompt=prompts[0], max_tokens=60, temperature=0.9, top_k=20, seed=7, num_samples=3))
    expected = [[completion.tokens for completion in engine.generate_batch(
        job.prompt, num_samples=job.num_samples, max_tokens=job.max_tokens, temperature=job.temperature,
        top_k=job.top_k, seed=job.seed)] for job in jobs]  # fmt: skip

    async def run_all():
        scheduler = Scheduler(engine, max_batch=8, queue_size=8)
        scheduler.start(asyncio.get_running_loop())

        async def run(job, delay):
            await asyncio.sleep(delay)
            submission = scheduler.submit(job)
            tokens = [[] for _ in range(job.num_samples)]
            async for batch in submission.events():
                for event in batch:
                    if event.token is not None:
                        tokens[event.sample].append(event.token)
            return tokens

        try:
            results = await asyncio.gather(*[run(job, 0.02 * i) for i, job in enumerate(jobs)])
        finally:
            await asyncio.to_thread(scheduler.close)
        return results, scheduler.forward_passes

    results, forwards = asyncio.run(run_all())
    assert results == expected
    # Shared forwards: far fewer than one per generated token.
    assert forwards < 0.6 * sum(len(tokens) for tokens in sum(expected, []))


# ---- the API through the official client -------------------------------------------------------------------


def test_greedy_reply_is_the_same_streamed_or_not_and_equals_the_engine(client, engine):
    reply = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=40)
    text = reply.choices[0].message.content
    stream = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    expected = engine.chat(HELLO, temperature=0, max_tokens=40)[0]
    assert text == streamed == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    prompt_tokens = len(engine.fit_conversation(HELLO, 40)[1])
    for usage in (reply.usage, chunks[-1].usage):
        assert usage.prompt_tokens == prompt_tokens and usage.completion_tokens == len(expected.tokens)
        assert usage.total_tokens == prompt_tokens + len(expected.tokens)
    assert reply.model == "picochat-test" and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_n_seed_max_tokens_and_usage(client):
    settings = dict(model="picochat", messages=HELLO, temperature=1.0, max_tokens=12, n=3, seed=11)
    first = client.chat.completions.create(**settings, extra_body={"top_k": 0})
    again = client.chat.completions.create(**settings, extra_body={"top_k": 0})
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # three independent samples
    for choice in first.choices:
        assert choice.finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 3 * 12
    long = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=5)
    if long.choices[0].finish_reason == "length":
        assert long.usage.completion_tokens == 5
    streamed = client.chat.completions.create(**settings, stream=True)
    indices = {chunk.choices[0].index for chunk in streamed if chunk.choices}
    assert indices == {0, 1, 2}


def test_a_top_p_below_float32_precision_keeps_the_most_likely_token(client):
    """Found by schemathesis: top_p = 1e-300 is 0 in float32 and once masked every token (a 500)."""
    greedy = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=10)
    tiny = client.chat.completions.create(model="picochat", messages=HELLO, temperature=1, top_p=1e-300,
                                          max_tokens=10)  # fmt: skip
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_stop_strings_cut_the_reply(client):
    full = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=60)
    text = full.choices[0].message.content
    assert len(text) > 12
    stop = text[8:11]  # appears in the greedy text; the reply must end right before its first occurrence
    expected = text[: text.index(stop)]
    cut = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=60,
                                         stop=[stop, "never-appears"])  # fmt: skip
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="picochat", messages=HELLO, temperature=0, max_tokens=60,
                                            stop=stop, stream=True)  # fmt: skip
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_health_metrics_and_the_page(server, client):
    url, _ = server
    models = client.models.list()
    assert [model.id for model in models.data] == ["picochat-test"]
    health = httpx.get(url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["ready"] is True and health.json()["context_length"] == 512
    page = httpx.get(url + "/")  # no key needed
    assert page.status_code == 200 and "<title>picochat</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{url}/static/{name}").status_code == 200
    authorized = {"Authorization": f"Bearer {KEY}"}
    assert_error(httpx.get(url + "/static/..%2Fapp.py", headers=authorized), 404)  # only the page's own files
    assert_error(httpx.get(url + "/metrics"), 401)
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'picochat_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in ("picochat_generated_tokens_total", "picochat_queue_depth", "picochat_batch_rows",
                 "picochat_time_to_first_token_seconds_bucket", "picochat_request_duration_seconds_count"):  # fmt: skip
        assert name in text
    generated = [line for line in text.splitlines() if line.startswith("picochat_generated_tokens_total")]
    assert int(generated[0].split()[-1]) > 0


def test_tool_calls_travel_as_parts_and_stay_out_of_the_content(tokenizer):
    """A model scripted to call the calculator: the call and its forced output come back as parts, the prose as
    content, streamed and not, and the parts can be sent back as history."""
    ids = tokenizer.special_token_ids
    call, answer = tokenizer.encode("6*7"), tokenizer.encode("Done!")
    plan = [ids["<|assistant_start|>"], ids["<|python_start|>"], *call, ids["<|python_end|>"]]
    after_output = [ids["<|output_end|>"], *answer, ids["<|assistant_end|>"]]
    script = {**dict(zip(plan, plan[1:])), **dict(zip(after_output, after_output[1:]))}
    assert len(script) == len(plan) - 1 + len(after_output) - 1  # every step has its own key

    class ScriptedGPT(GPT):
        def forward(self, idx, *args, kv_cache=None, **kwargs):
            logits = super().forward(idx, *args, kv_cache=kv_cache, **kwargs)
            for row, last in enumerate(idx[:, -1].tolist()):
                if last in script:
                    logits[row, -1] = -10.0
                    logits[row, -1, script[last]] = 10.0
            return logits

    engine = Engine(lively_model(tokenizer.vocab_size, SEQUENCE_LEN, model_class=ScriptedGPT), tokenizer)
    with LiveServer(create_app(Scheduler(engine, max_batch=2, queue_size=2))) as url:
        tools_client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = tools_client.chat.completions.create(model="m", messages=HELLO, max_tokens=40)
        message = reply.choices[0].message
        assert message.content == "Done!"
        assert message.parts == [{"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
                                 {"type": "text", "text": "Done!"}]  # fmt: skip
        stream = tools_client.chat.completions.create(model="m", messages=HELLO, max_tokens=40, stream=True)
        deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
        parts = [part for delta in deltas for part in (getattr(delta, "parts", None) or [])]
        assert {part["type"] for part in parts} == {"python", "python_output", "text"}
        assert "".join(part["text"] for part in parts if part["type"] == "python_output") == "42"
        history = [*HELLO, {"role": "assistant", "content": message.parts}, {"role": "user", "content": "Thanks"}]
        assert post(url, "/v1/chat/completions", {"messages": history, "max_tokens": 3}, key=None).status_code == 200


def test_completions_echo_logprobs_for_scoring(client, engine, tokenizer):
    text = "The history of the city begins"
    scored = client.completions.create(model="picochat", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == text and "".join(choice.logprobs.tokens) == text
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text)]
    with torch.no_grad():
        log_probs = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)
    expected = [log_probs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    for token_logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        # Two alternatives (one key if both are pieces of a character: they print the same), the best first.
        assert 1 <= len(top) <= 2 and max(top.values()) >= token_logprob - 1e-6
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0

    greedy = client.completions.create(model="picochat", prompt=[ids, ids[:3]], max_tokens=6, temperature=0,
                                       logprobs=1)  # fmt: skip
    assert [c.index for c in greedy.choices] == [0, 1]
    first = greedy.choices[0]
    expected_tokens = engine.generate_batch(ids, max_tokens=6, temperature=0)[0].tokens
    assert len(first.logprobs.tokens) == len(expected_tokens)
    for token_logprob, top in zip(first.logprobs.token_logprobs, first.logprobs.top_logprobs):
        assert max(top.values()) == pytest.approx(token_logprob)  # greedy picks the most likely token
    streamed = client.completions.create(model="picochat", prompt=text, max_tokens=6, temperature=0, stream=True)
    plain = client.completions.create(model="picochat", prompt=text, max_tokens=6, temperature=0)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text


# ---- mistakes are 4xx JSON in OpenAI's shape, never 5xx -----------------------------------------------------


def test_client_mistakes_are_4xx_json(server, client):
    url, _ = server
    messages = {"messages": HELLO, "max_tokens": 5}
    assert_error(post(url, "/v1/chat/completions", messages, key=None), 401, "API key")
    assert_error(post(url, "/v1/chat/completions", messages, key="wrong"), 401)
    assert_error(post(url, "/v1/models", {}, key=None), 401)
    error = assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}), 400)
    assert error["param"] == "messages[0].role"
    assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]}), 400,
                 "at most 2000")  # fmt: skip
    assert_error(post(url, "/v1/chat/completions", b'{"messages": [ not json'), 400, "not valid JSON")
    assert_error(post(url, "/v1/chat/completions", b"[]"), 400)
    assert_error(post(url, "/v1/chat/completions", {"messages": []}), 400)
    assert_error(post(url, "/v1/chat/completions", {}), 400, "messages")
    for body in [{**messages, "temperature": -1}, {**messages, "n": 100}, {**messages, "max_tokens": 10_000},
                 {**messages, "top_p": 0}, {**messages, "stop": ["a"] * 5}, {**messages, "logprobs": True},
                 {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                 {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}]:  # fmt: skip
        assert_error(post(url, "/v1/chat/completions", body), 400)
    assert_error(post(url, "/v1/chat/completions", {**messages, "stream": True, "n": 99}), 400)
    assert_error(post(url, "/v1/chat/completions", b"x" * 200_000), 413, "larger than")
    long_message = [{"role": "user", "content": "word " * 390}]  # fits the characters, not the 512-token context
    error = assert_error(post(url, "/v1/chat/completions", {"messages": long_message, "max_tokens": 200}), 400)
    assert error["code"] == "context_length_exceeded"
    assert_error(post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0}), 400, "echo")
    assert_error(post(url, "/v1/completions", {"prompt": [99999]}), 400, "token ids")
    assert_error(post(url, "/v1/completions", {"prompt": []}), 400)
    assert_error(httpx.get(url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert_error(httpx.delete(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}), 405)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="picochat", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_old_messages_are_dropped_to_fit_the_context(server):
    url, _ = server
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "ok " * 20}]
    response = post(url, "/v1/chat/completions", {"messages": [*history, *HELLO], "max_tokens": 20})
    assert response.status_code == 200
    assert int(response.headers["x-picochat-dropped-messages"]) > 0


def test_rate_limit_per_client_address(engine):
    settings = ServeSettings(rate_limit=3, max_tokens_limit=4)
    with LiveServer(create_app(Scheduler(engine, max_batch=2, queue_size=4), settings)) as url:
        body = {"messages": HELLO, "max_tokens": 2}
        assert [post(url, "/v1/chat/completions", body, key=None).status_code for _ in range(3)] == [200] * 3
        limited = post(url, "/v1/chat/completions", body, key=None)
        assert_error(limited, 429, "rate limit of 3 requests per minute")
        assert 1 <= int(limited.headers["retry-after"]) <= 20
        assert httpx.get(url + "/health").status_code == 200  # only generation requests count
        assert httpx.get(url + "/v1/models").status_code == 200
        assert 'picochat_rejected_total{reason="rate_limit"} 1' in httpx.get(url + "/metrics").text


def test_cors_is_off_by_default_and_an_allow_list_otherwise(server, engine):
    url, _ = server
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    settings = ServeSettings(cors_origins=("https://good.example",))
    with LiveServer(create_app(Scheduler(engine, max_batch=1, queue_size=1), settings)) as cors_url:
        good = httpx.options(cors_url + "/v1/chat/completions", headers={**preflight, "Origin": "https://good.example"})
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        bad = httpx.options(cors_url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in bad.headers


# ---- queue limits, timeouts and cancellation ----------------------------------------------------------------


class SlowGPT(GPT):
    """A real GPT whose batched decode steps take at least 20 ms (so requests overlap and can be interrupted)."""

    def forward(self, idx, *args, kv_cache=None, **kwargs):
        if isinstance(kv_cache, SlotKVCache):
            time.sleep(0.02)
        return super().forward(idx, *args, kv_cache=kv_cache, **kwargs)


@pytest.fixture(scope="module")
def slow_engine(tokenizer) -> Engine:
    return Engine(lively_model(tokenizer.vocab_size, SEQUENCE_LEN, model_class=SlowGPT), tokenizer, tool=None)


class GatedGPT(GPT):
    """A real GPT whose batched decode steps wait until the test opens the gate."""

    gate = threading.Event()

    def forward(self, idx, *args, kv_cache=None, **kwargs):
        if isinstance(kv_cache, SlotKVCache):
            assert self.gate.wait(timeout=30)
        return super().forward(idx, *args, kv_cache=kv_cache, **kwargs)


def test_full_queue_is_429_with_retry_after_and_waiting_too_long_is_503(tokenizer):
    engine = Engine(lively_model(tokenizer.vocab_size, SEQUENCE_LEN, model_class=GatedGPT), tokenizer, tool=None)
    scheduler = Scheduler(engine, max_batch=1, queue_size=1)
    settings = ServeSettings(request_timeout=0.5, temperature=1.0, top_k=None)
    body = {"messages": HELLO, "max_tokens": 200}
    responses: dict[str, httpx.Response] = {}

    def send(name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: responses.update({name: post(url, "/v1/chat/completions", body,
                                                                              key=None, timeout=30)}))  # fmt: skip
        thread.start()
        return thread

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    GatedGPT.gate.clear()
    with LiveServer(create_app(scheduler, settings)) as url:
        running = send("running")  # takes the only row; its first decode step waits at the gate
        wait_until(lambda: scheduler.rows_in_use == 1)
        waiting = send("waiting")  # waits in the queue (size 1)
        wait_until(lambda: scheduler.queue_depth == 1)
        rejected = post(url, "/v1/chat/completions", body, key=None)  # finds the queue full
        assert_error(rejected, 429, "busy")
        assert rejected.headers["retry-after"].isdigit()
        time.sleep(0.6)  # past both deadlines
        GatedGPT.gate.set()
        running.join(timeout=30)
        waiting.join(timeout=30)
    assert_error(responses["waiting"], 503, "timed out waiting")
    finished = responses["running"].json()
    assert finished["choices"][0]["finish_reason"] == "length" and finished["usage"]["completion_tokens"] < 5


def test_a_client_that_goes_away_frees_its_rows(slow_engine):
    scheduler = Scheduler(slow_engine, max_batch=2, queue_size=2)
    body = {"messages": HELLO, "max_tokens": 300, "temperature": 1.0}
    with LiveServer(create_app(scheduler)) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
            assert scheduler.rows_in_use == 1
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            post(url, "/v1/chat/completions", body, key=None, timeout=0.5)
        deadline = time.monotonic() + 5
        while scheduler.rows_in_use and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.rows_in_use == 0
        assert scheduler.generated_tokens < 2 * 300 - 100  # both stopped early


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-batch", "0"], "--max-batch 0"),
        (["--port", "70000"], "--port 70000"),
        (["--cors-origin", "*"], "--cors-origin '*'"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--rate-limit", "-1"], "--rate-limit -1"),
        (["--temperature", "-1"], "temperature -1"),
        (["--stage", "rl"], "no trained model"),
    ],
)
def test_serve_flag_mistakes_are_one_line_errors(run_dir, capsys, extra, message):
    assert main(["serve", "--run-dir", str(run_dir), *extra]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("picochat: error:") and message in error


def test_picochat_serve_command_serves_and_never_logs_messages(run_dir, tmp_path):
    with socket.socket() as probe:  # a free port on the loopback address
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "PICOCHAT_API_KEY": KEY, "PICOCHAT_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "picochat", "serve", "--run-dir", str(run_dir), "--port", str(port),
               "--max-batch", "2", "--read-timeout", "2"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").json()["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        secret = "my-secret-marker-4711"
        long_history = [{"role": "user", "content": f"{secret} " * 60}, {"role": "assistant", "content": "ok"}] * 4
        dropping = {"messages": [*long_history, *HELLO], "max_tokens": 300}  # the notice must not quote them
        assert post(url, "/v1/chat/completions", dropping).status_code == 200
        too_long = {"messages": [{"role": "user", "content": secret * 500}]}
        assert post(url, "/v1/chat/completions", too_long).status_code == 400
        assert post(url, "/v1/chat/completions", {"messages": HELLO}, key=None).status_code == 401
        # The command's own guards: the Host check and the headers' deadline (test_serve_guards.py has the rest).
        assert (
            httpx.get(url + "/health", headers={"Host": "attacker.example"}).json()["error"]["code"] == "invalid_host"
        )
        ((answer, closed),) = trickling_clients(url, 1, b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        assert json_error(answer)[0] == 408 and closed < 5
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130)
    output = log.read_text()
    assert "serve:" in output and "127.0.0.1" in output and "dropped" in output
    assert secret not in output
