"""The OpenAI-compatible wire format: request and response schemas, errors in OpenAI's shape, server-sent event
chunks, and the assembly of /v1/completions choices with their logprobs. app.py wires these to the scheduler.

Streams follow OpenAI's: `data: <json>` blocks, one choice per chunk, the role first, then deltas, then a chunk with
the finish_reason, an optional usage chunk (stream_options.include_usage), then `data: [DONE]`. Each chat delta
also carries `parts` (the picochat extension for tool calls, see app.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from picochat.serve.scheduler import Event

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}  # "timeout": ran out of time, not tokens


# ----------------------------------------------------------------------------------------------------------
# Request and response schemas (OpenAI's names; unknown fields are ignored, as OpenAI-compatible servers do)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # allow_inf_nan=False: NaN fails every comparison, so ge/le alone would report it as "should be <= 2".
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="picochat extension: 0 = no limit")
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class Part(BaseModel):
    type: Literal["text", "python", "python_output"]
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    parts: list[Part]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "picochat"
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    ready: bool
    model: str
    context_length: int
    max_batch: int
    queue_depth: int
    rows_in_use: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str  # never null: error_response gives every error one


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in [
    (400, "invalid request"), (401, "missing or wrong API key"), (413, "body too large"),
    (429, "queue full: retry after Retry-After seconds"), (500, "server error"), (503, "not ready or overloaded"),
    (504, "timed out"),
]}  # fmt: skip
# A stream is documented event by event (OpenAPI 3.0/3.1: the schema describes each event): `data` holds one JSON
# chunk (chat.completion.chunk / text_completion) or the final "[DONE]".
_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": _EVENT}}, "description": "OK (JSON, or SSE)"}}


def document_limits(schema: dict, limits: dict[tuple[str, str], dict]) -> None:
    """Write a server's own limits into its OpenAPI schema (in place), e.g. {("ChatCompletionRequest",
    "max_tokens"): {"maximum": 200}}, so that clients and schema-based testers see the real bounds. Optional
    fields are anyOf [{the type}, {"type": "null"}]: the bounds go on the non-null branch."""
    models = schema.get("components", {}).get("schemas", {})
    for (model, field), bounds in limits.items():
        prop = models[model]["properties"][field]
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") != "null" and "$ref" not in branch:
                branch.update(bounds)


# ----------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers,
        )  # fmt: skip


# The code of an error that names none: every error body has a non-null code a client can switch on.
_STATUS_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                 408: "request_timeout", 413: "body_too_large", 429: "rate_limit_exceeded",
                 499: "client_closed_request", 500: "internal_error", 503: "unavailable", 504: "timeout"}  # fmt: skip


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:  # fmt: skip
    """An error in OpenAI's shape. Without a code: "invalid_value" for a 400 naming a param, else one by status."""
    if code is None:
        code = "invalid_value" if status == 400 and param else _STATUS_CODES.get(status, f"http_{status}")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def http_error_handler(request: Request, error: HTTPException) -> JSONResponse:
    kind = _STATUS_KINDS.get(error.status_code, "invalid_request_error" if error.status_code < 500 else "server_error")
    return error_response(error.status_code, str(error.detail), kind=kind, headers=getattr(error, "headers", None))


def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    """The first problem, naming the field (e.g. messages[2].role) -- never echoing the value sent."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    location = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".") or None
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return error_response(400, message, param=param, code=str(first.get("type", "invalid_value")))


# ----------------------------------------------------------------------------------------------------------
# Streams (server-sent events) and /v1/completions choices

NO_CACHE = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Started:
    """An async iterator whose first item was already taken (it is given again first)."""

    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    async def __aiter__(self):
        yield self.first
        async for item in self.rest:
            yield item

    async def aclose(self) -> None:
        await self.rest.aclose()


async def started(events) -> Started | AsyncIterator:
    """Wait for the first item of an event stream before answering with a stream, so that a failure before the
    first token (queue timeout, shutdown, bad request) is still a proper HTTP error status."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return events
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, list):  # a batch of scheduler events: fail on an error right away
        for event in first:
            if event.error is not None:
                await events.aclose()
                kind = "server_error" if event.error_status >= 500 else "invalid_request_error"
                raise ApiError(event.error_status, event.error, kind=kind, code="generation_error")
    return Started(first, events)


def merge_parts(parts: list[dict], event: Event) -> list[dict]:
    """Add the event's pieces to a parts list (merging a piece into the last part of the same type); returns the
    event's own pieces as parts."""
    new = []
    for piece in event.pieces:
        new.append({"type": piece.kind, "text": piece.text})
        if parts and parts[-1]["type"] == piece.kind:
            parts[-1]["text"] += piece.text
        else:
            parts.append({"type": piece.kind, "text": piece.text})
    return new


def error_chunk(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": "generation_error"}})


async def chat_chunks(events, reply_id: str, created: int, model: str, n: int, prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}  # fmt: skip
        if include_usage:
            body["usage"] = usage
        return sse(body)

    completion_tokens = 0
    try:
        for index in range(n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for batch in events:
            for event in batch:
                if event.error is not None:
                    yield error_chunk(event.error)
                    yield sse("[DONE]")
                    return
                if event.sample < 0:
                    continue
                completion_tokens += event.token is not None
                parts = merge_parts([], event)
                if parts:
                    content = "".join(part["text"] for part in parts if part["type"] == "text")
                    yield chunk([{"index": event.sample, "delta": {"content": content, "parts": parts},
                                  "finish_reason": None}])  # fmt: skip
                if event.finish_reason is not None:
                    reason = FINISH_REASONS.get(event.finish_reason, "stop")
                    yield chunk([{"index": event.sample, "delta": {}, "finish_reason": reason}])
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            yield chunk([], usage)
        yield sse("[DONE]")
    finally:
        await events.aclose()


async def completion_chunks(updates, reply_id: str, created: int, model: str, usage) -> AsyncIterator[str]:
    def chunk(choices: list[dict]) -> dict:
        return {"id": reply_id, "object": "text_completion", "created": created, "model": model, "choices": choices}

    echoed = set()
    try:
        async for index, choice, (text, first_logprob) in updates:
            if index not in echoed:  # the echoed prompt (and its logprobs) come with the choice's first chunk
                echoed.add(index)
                text, first_logprob = choice.text, 0
            reason = FINISH_REASONS.get(choice.finish_reason) if choice.finish_reason else None
            if not text and reason is None and len(choice.tokens) == first_logprob:
                continue  # nothing new to say (e.g. a token that completes no character yet)
            yield sse(chunk([{"index": index, "text": text, "logprobs": choice.logprobs(first_logprob),
                               "finish_reason": reason}]))  # fmt: skip
        if usage is not None:
            yield sse({**chunk([]), "usage": usage().model_dump()})
        yield sse("[DONE]")
    except ApiError as error:
        yield error_chunk(error.message)
        yield sse("[DONE]")
    finally:
        await updates.aclose()


class CompletionAssembly:
    """One /v1/completions choice being assembled: its text (after the echoed prompt, if asked) and, if asked,
    per token: its text, logprob, top alternatives and character offset in prompt + completion."""

    def __init__(self, tokenizer, echo_ids: list[int], echo: bool, logprobs: int | None):
        self.tokenizer, self.want, self.top_k = tokenizer, logprobs is not None, logprobs or 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.finish_reason: str | None = None
        self.generated = 0
        self.echo_ids = echo_ids
        prompt_text = "".join(self._token_text(token) for token in echo_ids)
        self.offset = 0 if echo else len(prompt_text)  # offsets count from the start of the prompt
        self.text = prompt_text if echo else ""
        self.echo = echo

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_to_bytes(token).decode("utf-8", errors="replace")

    def _add_token(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None, text: str) -> None:
        self.tokens.append(self._token_text(token))
        self.token_logprobs.append(logprob)
        self.top_logprobs.append({self._token_text(t): value for t, value in top} if top and self.top_k else None)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_prompt_logprobs(self, entries: list[tuple[float | None, list[tuple[int, float]]]]) -> None:
        if self.echo and self.want:
            for token, (logprob, top) in zip(self.echo_ids, entries):
                self._add_token(token, logprob, top if top else None, self._token_text(token))

    def add(self, event: Event) -> tuple[str, int]:
        """Take a sample's event: (its new text, index of its first new logprobs entry)."""
        text = "".join(piece.text for piece in event.pieces)
        first = len(self.tokens)
        if event.token is not None:
            self.generated += 1
            if self.want:
                self._add_token(event.token, event.logprob, event.top_logprobs, text)
        self.text += text
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return text, first

    def logprobs(self, start: int = 0) -> CompletionLogprobs | None:
        if not self.want:
            return None
        return CompletionLogprobs(
            tokens=self.tokens[start:],
            token_logprobs=self.token_logprobs[start:],
            top_logprobs=self.top_logprobs[start:],
            text_offset=self.text_offset[start:],
        )
