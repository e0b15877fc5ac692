"""`picochat serve`: the web chat page and an OpenAI-compatible API for a trained model.

    picochat serve --run myrun                 # http://127.0.0.1:8000  (page at /, API under /v1)
    picochat serve --run myrun --host 0.0.0.0 --api-key "$KEY" --cors-origin https://my.site

Safe by default: it listens on 127.0.0.1 only and answers only requests whose Host header is one of its own
names (against DNS rebinding; --allowed-host adds one, serve/hosts.py says what 0.0.0.0 does); a public --host
without an API key gets a warning. The key can come
from $PICOCHAT_API_KEY instead of the command line (so it does not show in process lists). Concurrent requests are
decoded together (continuous batching, --max-batch rows); beyond that they wait in a bounded queue (--queue-size,
then HTTP 429); each client address may start --rate-limit generations a minute. Message contents are never logged.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from picochat.common import PicochatError, add_model_arguments, add_tool_argument, log, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "stage to serve")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0 picks a free one)")
    parser.add_argument(
        "--allowed-host", action="append", default=[],
        help="also answer requests whose Host header is this name, e.g. behind a proxy (repeatable; default: "
        "the names of --host only: 127.0.0.1, localhost, [::1] on loopback; any on 0.0.0.0 / ::)",
    )  # fmt: skip
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PICOCHAT_API_KEY, or none)")
    parser.add_argument(
        "--cors-origin", action="append", default=[], help="allow this web origin to call the API (repeatable; none)"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="rows decoded together (16)")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait for a row (64), then 429")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take (300)")
    parser.add_argument(
        "--read-timeout", type=float, default=30.0,
        help="seconds a client may take to send a request's headers, and again its body (30); then 408",
    )  # fmt: skip
    parser.add_argument(
        "--rate-limit", type=int, default=120, help="generation requests per minute per client address, 0 = off (120)"
    )
    parser.add_argument("--max-tokens-limit", type=int, help="the most max_tokens a request may ask (the context)")
    parser.add_argument("--max-n", type=int, default=8, help="the most samples (n) per request (8)")
    parser.add_argument("--max-messages", type=int, default=500, help="messages per request (500)")
    parser.add_argument("--max-message-chars", type=int, default=8000, help="characters per message (8000)")
    parser.add_argument("--max-total-chars", type=int, default=32000, help="characters per request (32000)")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size (1,000,000)")
    parser.add_argument("--temperature", type=float, default=0.8, help="default when a request omits it (0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="default top-k when a request omits it, 0 = off (50)")
    add_tool_argument(parser)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    import uvicorn

    from picochat import load_engine
    from picochat.engine import check_sampling
    from picochat.serve.app import create_app
    from picochat.serve.deadlines import header_deadline_protocol
    from picochat.serve.scheduler import Scheduler

    check_sampling(settings.temperature, settings.top_k, None)
    engine, run_dir, stage_dir = load_engine(
        args.run, args.run_dir, stage=args.stage, step=args.step, device=args.device, tool=args.tool
    )
    settings.model_id = f"picochat-{run_dir.name}-{stage_dir.name}"
    scheduler = Scheduler(engine, max_batch=args.max_batch, queue_size=args.queue_size)
    app = create_app(scheduler, settings)
    layers = engine.model.config.n_layer
    log(
        f"serve: {stage_dir} ({layers} layers, context {engine.context_len} tokens) on {engine.device}; "
        f"batch {args.max_batch} rows, queue {args.queue_size}; http://{_url_host(args.host)}:{args.port}/"
    )
    # On Ctrl-C, streams still open get 5 s to finish, then they are cut (their generations stop with them).
    # Slow clients: headers within --read-timeout (deadlines.py), idle kept-alive connections closed after 5 s.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, server_header=False,
                timeout_graceful_shutdown=5, timeout_keep_alive=5,
                http=header_deadline_protocol(args.read_timeout))  # fmt: skip
    return 0


def _settings(args: argparse.Namespace):
    """ServeSettings from the flags, after checking them (mistakes are one-line errors)."""
    from picochat.serve.app import ServeSettings
    from picochat.serve.hosts import accepted_hosts

    positive = ["max_batch", "queue_size", "max_n", "max_messages", "max_message_chars", "max_total_chars",
                "max_body_bytes"]  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise PicochatError(f"--max-tokens-limit {args.max_tokens_limit}: expected a positive integer")
    for name in ("request_timeout", "read_timeout"):
        if not 0 < getattr(args, name) < 1e6:  # (also refuses nan and inf)
            raise PicochatError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number of seconds"
            )
    if not 0 <= args.port <= 65535:
        raise PicochatError(f"--port {args.port}: expected 0 to 65535")
    if args.rate_limit < 0:
        raise PicochatError(f"--rate-limit {args.rate_limit}: expected requests per minute, or 0 for no limit")
    if args.top_k < 0:
        raise PicochatError(f"--top-k {args.top_k}: expected 0 (off) or a positive integer")
    for origin in args.cors_origin:
        if origin == "*" or not origin.startswith(("http://", "https://")):
            raise PicochatError(f"--cors-origin {origin!r}: expected one origin like https://example.com (no '*')")
    api_key = args.api_key or os.environ.get("PICOCHAT_API_KEY") or None
    allowed_hosts = accepted_hosts(args.host, tuple(args.allowed_host))
    if allowed_hosts is None:
        warn(f"listening on {args.host}: requests for any Host name are answered; name this server's public names "
             "with --allowed-host to refuse the others (DNS rebinding)")  # fmt: skip
    if not _is_loopback(args.host) and not api_key:
        warn(f"listening on {args.host} without an API key: anyone who can reach this port can use the model")
    return ServeSettings(
        api_key=api_key,
        allowed_hosts=allowed_hosts,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_message_chars=args.max_message_chars,
        max_total_chars=args.max_total_chars,
        max_tokens_limit=args.max_tokens_limit,
        max_n=args.max_n,
        request_timeout=args.request_timeout,
        body_timeout=args.read_timeout,
        rate_limit=args.rate_limit,
        temperature=args.temperature,
        top_k=args.top_k or None,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
