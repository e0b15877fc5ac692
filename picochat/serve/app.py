"""The web app: the chat page at /, an OpenAI-compatible API under /v1, /health and /metrics.

Endpoints
    GET  /                      the chat page (static/; no external assets; it uses /v1/chat/completions like any
                                client: one API, not two)
    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages -> reply; stream (SSE chunks, then `data: [DONE]`), temperature, top_p,
                                top_k (extension), max_tokens (default: 256 or what the context leaves, at least
                                32), stop, seed, n, stream_options.include_usage
    POST /v1/completions        raw prompts (text or token ids); max_tokens (0 with echo), logprobs, echo: enough
                                for log-likelihood evaluation clients
    GET  /health                liveness and load, no key needed
    GET  /metrics               Prometheus text: requests, tokens, queue depth, latency histograms

Tool calls (picochat extension). The reply's prose is `content`, exactly what a plain OpenAI client expects. What
the model writes between <|python_start|> and <|python_end|> and the tool output forced back into its context
are not prose: they travel in an extra field, `parts`, a list of {"type": "text" | "python" | "python_output",
"text"} -- in each streamed `delta` (the new output of that chunk) and in the non-streamed `message` (all of it).
The page renders tool calls and outputs from `parts`; a request may send an assistant message's content back as
such a parts list, so a conversation round-trips exactly.

Hardening. Generation runs in the scheduler's worker thread, prompt preparation in a thread pool: the event loop
only moves bytes. The server binds 127.0.0.1 by default (stages/serve.py); with an API key every path except the
page and /health needs `Authorization: Bearer <key>`; CORS is off unless origins are listed; bodies, messages,
characters, max_tokens and n are bounded; only requests whose Host header names this server are answered
(hosts.py, against DNS rebinding); every error is JSON in OpenAI's shape {"error": {"message", "type",
"param", "code"}} with a 4xx status for anything the client can fix; message contents are never logged.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from picochat.common import PicochatError, warn
from picochat.serve.guard import Guard, JsonCORSMiddleware
from picochat.serve.hosts import LOOPBACK_HOSTS, HostCheck
from picochat.serve.protocol import (
    ERROR_RESPONSES,
    FINISH_REASONS,
    NO_CACHE,
    STREAM_RESPONSE,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionAssembly,
    CompletionChoice,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
    chat_chunks,
    completion_chunks,
    document_limits,
    error_response,
    http_error_handler,
    merge_parts,
    started,
    validation_error_handler,
)
from picochat.serve.scheduler import Event, GenerationJob, QueueFull, Scheduler, Submission

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = {"/", "/health", *(f"/static/{name}" for name in PAGE_FILES)}
PAGE_POLICY = (  # the page may load only its own script and style and talk only to this server
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
RETRY_AFTER_SECONDS = 2


@dataclass
class ServeSettings:
    """Limits and defaults of one server (flags of `picochat serve`)."""

    model_id: str = "picochat"
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS  # Host header names answered to; None: any (hosts.py)
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1_000_000
    max_messages: int = 500
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_tokens_limit: int | None = None  # the most max_tokens a request may ask for (default: the context)
    max_n: int = 8
    max_prompts: int = 16  # prompts in one /v1/completions request
    request_timeout: float = 300.0  # seconds from arrival until a request is stopped
    body_timeout: float = 30.0  # seconds a client may take to send a request's body (guard.py)
    rate_limit: int = 0  # generation requests per minute per client address (0: no limit)
    temperature: float = 0.8  # used when a request does not say
    top_k: int | None = 50


# ----------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: a few counters, gauges and histograms)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.total, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.count}"]


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


class Metrics:
    def __init__(self):
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.rejected: Counter = Counter()  # reason -> count
        self.duration = {endpoint: Histogram(LATENCY_BUCKETS) for endpoint in ENDPOINTS}
        self.first_token = Histogram(LATENCY_BUCKETS)

    def render(self, scheduler: Scheduler) -> str:
        lines = ["# HELP picochat_requests_total HTTP requests by endpoint and status.",
                 "# TYPE picochat_requests_total counter"]  # fmt: skip
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'picochat_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        lines += ["# HELP picochat_rejected_total Requests turned away (queue full, rate limit).",
                  "# TYPE picochat_rejected_total counter"]  # fmt: skip
        lines += [f'picochat_rejected_total{{reason="{r}"}} {c}' for r, c in sorted(self.rejected.items())]
        for name, help_text, value, kind in [
            ("generated_tokens_total", "Tokens generated.", scheduler.generated_tokens, "counter"),
            ("prompt_tokens_total", "Prompt tokens prefilled.", scheduler.prompt_tokens, "counter"),
            ("forward_passes_total", "Model forward passes (prefills and batched decode steps).",
             scheduler.forward_passes, "counter"),
            ("queue_depth", "Requests waiting for a free row.", scheduler.queue_depth, "gauge"),
            ("batch_rows", "Rows being decoded together now.", scheduler.rows_in_use, "gauge"),
            ("batch_rows_max", "Rows the batch can hold.", scheduler.max_batch, "gauge"),
        ]:  # fmt: skip
            metric = f"picochat_{name}"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {value}"]
        lines += ["# HELP picochat_request_duration_seconds Time from request to the end of the response.",
                  "# TYPE picochat_request_duration_seconds histogram"]  # fmt: skip
        for endpoint, histogram in self.duration.items():
            lines += histogram.lines("picochat_request_duration_seconds", f'endpoint="{endpoint}"')
        lines += ["# HELP picochat_time_to_first_token_seconds Time from request to its first generated token.",
                  "# TYPE picochat_time_to_first_token_seconds histogram"]  # fmt: skip
        lines += self.first_token.lines("picochat_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(scheduler: Scheduler, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app around a scheduler. Its lifespan starts the scheduler's worker and stops it."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    engine, tokenizer = scheduler.engine, scheduler.tokenizer
    context_len = engine.context_len
    max_tokens_limit = min(settings.max_tokens_limit or context_len, context_len - 1)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)

    def host_rejected() -> None:
        metrics.rejected["host"] += 1

    middleware = [Middleware(Guard, settings=settings, metrics=metrics, public_paths=PUBLIC_PATHS)]
    if settings.cors_origins:  # outside the guard, so that even a 401 or 413 carries the CORS headers
        middleware.insert(0, Middleware(JsonCORSMiddleware, allow_origins=list(settings.cors_origins),
                                        allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                        expose_headers=["X-Picochat-Dropped-Messages"], max_age=600))  # fmt: skip
    # Outermost: a request for another host (DNS rebinding) gets no further, not even a CORS answer.
    middleware.insert(0, Middleware(HostCheck, hosts=settings.allowed_hosts, on_reject=host_rejected))
    app = FastAPI(title="picochat", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  middleware=middleware)  # fmt: skip
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, kind=error.kind, param=error.param, code=error.code,
                              headers=error.headers)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        warn(f"{request.url.path}: unexpected {type(error).__name__}")  # the type only: no request content
        return error_response(500, "internal server error", kind="server_error")

    def openapi() -> dict:
        # Validation errors are 400 here (as OpenAI's API), not FastAPI's 422: drop 422 from the schema.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            max_n = min(settings.max_n, scheduler.max_batch)
            document_limits(schema, {
                ("ChatCompletionRequest", "max_tokens"): {"maximum": max_tokens_limit},
                ("ChatCompletionRequest", "max_completion_tokens"): {"maximum": max_tokens_limit},
                ("CompletionRequest", "max_tokens"): {"maximum": max_tokens_limit},
                ("ChatCompletionRequest", "n"): {"maximum": max_n},
                ("CompletionRequest", "n"): {"maximum": max_n},
                ("ChatCompletionRequest", "messages"): {"maxItems": settings.max_messages},
                ("ChatMessage", "content"): {"maxLength": settings.max_message_chars},
            })  # fmt: skip
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # -- the page ---------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"})  # fmt: skip

    @app.get("/static/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            raise HTTPException(404, f"no such file: /static/{name}")
        return Response((STATIC / name).read_bytes(), media_type=PAGE_FILES[name])

    # -- plain endpoints --------------------------------------------------------------------------------

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        ready = scheduler.ready
        return Health(status="ok" if ready else "starting", ready=ready, model=settings.model_id,
                      context_length=context_len, max_batch=scheduler.max_batch, queue_depth=scheduler.queue_depth,
                      rows_in_use=scheduler.rows_in_use)  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: ERROR_RESPONSES[401]})
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(scheduler), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_id, created=created, context_length=context_len)])

    # -- shared request handling -----------------------------------------------------------------------

    def sampling_settings(body: SamplingRequest, max_tokens: int) -> dict:
        if body.n > min(settings.max_n, scheduler.max_batch):
            raise ApiError(400, f"n {body.n}: at most {min(settings.max_n, scheduler.max_batch)}", param="n")
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")  # fmt: skip
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(len(stop) > 256 for stop in stops):
            raise ApiError(400, "stop: at most 4 strings of at most 256 characters", param="stop")
        top_k = settings.top_k if body.top_k is None else (body.top_k or None)
        return dict(num_samples=body.n, max_tokens=max_tokens, seed=body.seed, stop=stops, top_k=top_k,
                    temperature=settings.temperature if body.temperature is None else body.temperature,
                    top_p=body.top_p, timeout=settings.request_timeout)  # fmt: skip

    def submit(job: GenerationJob) -> Submission:
        try:
            return scheduler.submit(job)
        except QueueFull:
            metrics.rejected["queue_full"] += 1
            raise ApiError(429, "the server is busy (queue full): retry shortly", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None  # fmt: skip

    async def batches(request: Request, submission: Submission) -> AsyncIterator[list[Event]]:
        """The submission's events; stops (cancelling it) when the client goes away; a safety net in case
        the worker never answers (it enforces the deadline itself)."""
        first_token, checked = True, time.monotonic()
        try:
            async for batch in submission.events(poll=0.5):
                if first_token and any(event.token is not None for event in batch):
                    metrics.first_token.observe(time.monotonic() - submission.submitted)
                    first_token = False
                if batch:
                    yield batch
                if time.monotonic() - checked >= 0.5:  # is the client still there? (twice a second)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                    if checked > submission.deadline + 30:
                        yield [Event(-1, error="the request timed out", error_status=504)]
                        return
        finally:
            submission.cancel()  # no effect once it has finished

    def request_error(event: Event) -> ApiError:
        kind = "server_error" if event.error_status >= 500 else "invalid_request_error"
        return ApiError(event.error_status, event.error, kind=kind, code="generation_error")

    # -- chat completions ------------------------------------------------------------------------------

    def conversation(body: ChatCompletionRequest) -> list[dict]:
        """The request's messages in picochat's format, within the server's limits."""
        if len(body.messages) > settings.max_messages:
            raise ApiError(400, f"messages: {len(body.messages)} messages, at most {settings.max_messages}",
                           param="messages", code="too_many_messages")  # fmt: skip
        messages, total = [], 0
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            if role == "system" and i != 0:
                raise ApiError(400, f"messages[{i}]: a system message may only come first", param=f"messages[{i}]")
            content = message.content
            if not isinstance(content, str):
                allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
                parts = []
                for j, part in enumerate(content):
                    if part.type not in allowed or part.text is None:
                        where = f"messages[{i}].content[{j}]"
                        raise ApiError(400, f"{where}: expected a part of type {' or '.join(allowed)} with text",
                                       param=where)  # fmt: skip
                    parts.append({"type": part.type, "text": part.text})
                content = parts if role == "assistant" else "".join(part["text"] for part in parts)
            characters = len(content) if isinstance(content, str) else sum(len(part["text"]) for part in content)
            if characters > settings.max_message_chars:
                raise ApiError(400, f"messages[{i}].content: {characters} characters, at most "
                               f"{settings.max_message_chars}", param=f"messages[{i}].content",
                               code="message_too_long")  # fmt: skip
            total += characters
            messages.append({"role": role, "content": content})
        if total > settings.max_total_chars:
            raise ApiError(400, f"messages: {total} characters in all, at most {settings.max_total_chars}",
                           param="messages", code="messages_too_long")  # fmt: skip
        return messages

    def chat_prompt(messages: list[dict], max_tokens: int, asked: bool) -> tuple[list[int], int]:
        """(prompt, messages dropped to fit the context). Runs in the thread pool (tokenizing is work). A
        max_tokens the client did not ask for may shrink to what the context leaves (Engine.fit_conversation)."""
        question = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        try:
            kept, prompt = engine.fit_conversation(messages, max_tokens, shrink_reply=not asked)
        except PicochatError as error:
            code = "context_length_exceeded" if "context" in str(error) else "invalid_conversation"
            raise ApiError(400, str(error), param="messages", code=code) from None
        return prompt, len(question) - len(kept)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.logprobs:
            raise ApiError(400, "logprobs are available on /v1/completions, not on chat", param="logprobs")
        messages = conversation(body)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = asked or min(engine.reply_budget(), max_tokens_limit)
        sampling = sampling_settings(body, max_tokens)
        prompt, dropped = await run_in_threadpool(chat_prompt, messages, max_tokens, asked is not None)
        sampling["max_tokens"] = min(max_tokens, context_len - len(prompt))  # not asked: what the context leaves
        submission = submit(GenerationJob(prompt=prompt, **sampling))
        headers = {"X-Picochat-Dropped-Messages": str(dropped)}
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            events = await started(batches(request, submission))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = chat_chunks(events, reply_id, now, settings.model_id, body.n, len(prompt), include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={**headers, **NO_CACHE})
        choices = [{"parts": [], "finish_reason": None, "tokens": 0} for _ in range(body.n)]
        async with aclosing(batches(request, submission)) as stream:
            async for batch in stream:
                for event in batch:
                    if event.error is not None:
                        raise request_error(event)
                    if event.sample >= 0:
                        choice = choices[event.sample]
                        merge_parts(choice["parts"], event)
                        choice["tokens"] += event.token is not None
                        choice["finish_reason"] = event.finish_reason or choice["finish_reason"]
        if any(choice["finish_reason"] is None for choice in choices):
            return error_response(499, "the client closed the request")
        completion_tokens = sum(choice["tokens"] for choice in choices)
        reply = ChatCompletion(id=reply_id, created=now, model=settings.model_id, choices=[
            ChatChoice(index=i, finish_reason=FINISH_REASONS[choice["finish_reason"]], message=AssistantMessage(
                content="".join(p["text"] for p in choice["parts"] if p["type"] == "text"), parts=choice["parts"]))
            for i, choice in enumerate(choices)
        ], usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                       total_tokens=len(prompt) + completion_tokens))  # fmt: skip
        return JSONResponse(reply.model_dump(), headers=headers)

    # -- completions -----------------------------------------------------------------------------------

    def completion_prompts(body: CompletionRequest) -> list[tuple[list[int], int]]:
        """Per prompt: (token ids, how many leading ids are not echoed). Text prompts start with <|bos|>, as
        every training document does (the BOS is not echoed); token-id prompts are used exactly as given."""
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) > settings.max_prompts:
            raise ApiError(400, f"prompt: expected 1 to {settings.max_prompts} prompts", param="prompt")
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if len(prompt) > settings.max_total_chars:
                    raise ApiError(400, f"prompt: {len(prompt)} characters, at most {settings.max_total_chars}",
                                   param="prompt", code="prompt_too_long")  # fmt: skip
                out.append(([tokenizer.bos_token_id, *tokenizer.encode(prompt)], 1))
            elif prompt and all(0 <= token < tokenizer.vocab_size for token in prompt):
                out.append((list(prompt), 0))
            else:
                raise ApiError(400, f"prompt[{i}]: expected a non-empty list of token ids in [0, "
                               f"{tokenizer.vocab_size})", param="prompt")  # fmt: skip
        for ids, _ in out:
            if len(ids) + body.max_tokens > context_len or len(ids) >= context_len:
                raise ApiError(400, f"a prompt of {len(ids)} tokens plus max_tokens {body.max_tokens} exceeds the "
                               f"model's context of {context_len} tokens", param="prompt",
                               code="context_length_exceeded")  # fmt: skip
        return out

    @app.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
    async def completions(body: CompletionRequest, request: Request):
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 needs echo: true (scoring the prompt)", param="max_tokens")
        sampling = {**sampling_settings(body, max(body.max_tokens, 1)), "max_tokens": body.max_tokens}
        prompts = await run_in_threadpool(completion_prompts, body)
        submissions = []
        try:
            for ids, _ in prompts:
                want_prompt = body.echo and body.logprobs is not None
                submissions.append(submit(GenerationJob(ids, logprobs=body.logprobs, prompt_logprobs=want_prompt,
                                                        **sampling)))  # fmt: skip
        except ApiError:
            for submission in submissions:
                submission.cancel()
            raise
        reply_id, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        # One choice per (prompt, sample); the prompts run concurrently in the worker and are read in turn here.
        choices = [[CompletionAssembly(tokenizer, ids[skip:], body.echo, body.logprobs) for _ in range(body.n)]
                   for ids, skip in prompts]  # fmt: skip

        async def updates() -> AsyncIterator[tuple[int, CompletionAssembly, dict]]:
            for p, ((_, skip), submission) in enumerate(zip(prompts, submissions)):
                async with aclosing(batches(request, submission)) as stream:
                    async for batch in stream:
                        for event in batch:
                            if event.error is not None:
                                raise request_error(event)
                            if event.prompt_logprobs is not None:
                                for choice in choices[p]:
                                    choice.add_prompt_logprobs(event.prompt_logprobs[skip:])
                            elif event.sample >= 0:
                                choice = choices[p][event.sample]
                                yield p * body.n + event.sample, choice, choice.add(event)

        def usage() -> Usage:
            prompt_tokens = sum(len(ids) for ids, _ in prompts)
            generated = sum(choice.generated for row in choices for choice in row)
            return Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                         total_tokens=prompt_tokens + generated)  # fmt: skip

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = completion_chunks(await started(updates()), reply_id, now, settings.model_id,
                                        usage if include_usage else None)  # fmt: skip
            return StreamingResponse(chunks, media_type="text/event-stream", headers=NO_CACHE)
        async with aclosing(updates()) as stream:
            async for _ in stream:
                pass
        flat = [choice for row in choices for choice in row]
        if any(choice.finish_reason is None for choice in flat):
            return error_response(499, "the client closed the request")
        reply = Completion(id=reply_id, created=now, model=settings.model_id, usage=usage(), choices=[
            CompletionChoice(index=i, text=choice.text, finish_reason=FINISH_REASONS[choice.finish_reason],
                             logprobs=choice.logprobs())
            for i, choice in enumerate(flat)
        ])  # fmt: skip
        return JSONResponse(reply.model_dump())

    return app
