"""The generation scheduler: one worker thread owns the model and decodes every running request in shared forward
passes (continuous batching). The web server's event loop never runs the model; it only submits jobs and reads
their events.

    event loop                              worker thread (owns the model, the slot cache and the sampling)
    ----------                              ---------------------------------------------------------------
    submit(job) ──► waiting queue ──►       admit while rows are free: prefill the prompt alone (batch 1),
    (full: QueueFull, the API says 429)       copy its cache into n free rows of the SlotKVCache
                                            step: sample one token per row (each request with its own settings
                                              and seeded generator), run the tool-use state machine, decode to
                                              text, apply stop strings; finished rows leave the cache;
                                              ONE forward of (rows, 1) tokens for everything still running
    await submission.events() ◄── one call_soon_threadsafe per step delivers every request's new events

- Requests join and leave between steps: a new request waits at most one decode step (plus the prefills admitted
  before it), and a finished or cancelled one frees its rows at once for the next in the queue.
- The rows of a request sit at their own positions in the SlotKVCache (per-row rotary positions and attention
  masks, see attention.py), so requests of different lengths share one forward.
- Seeded requests reproduce Engine.generate: the same prefill logits, the same generator, drawn over the same rows
  in the same order; greedy requests are batched into one argmax.
- Limits: a bounded waiting queue, a deadline per request (checked every step: a queued request that has not
  started by then fails, a running one stops with finish_reason "timeout"), cancellation (the client went away)
  frees the rows at the next step.
- A prefill runs alone between two decode steps, so a long prompt delays the others by one prefill; the tool
  (calculator by default) runs inside the step too.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from picochat.common import warn
from picochat.engine import Engine, Piece, RowState, StreamDecoder, sample_next_token

MAX_LOGPROBS = 5  # alternatives per token, as in OpenAI's completions API


class QueueFull(Exception):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


@dataclass
class GenerationJob:
    """What to generate for one API request (already validated by the app)."""

    prompt: list[int]
    max_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings: the text ends right before the first one (prose only)
    logprobs: int | None = None  # report each generated token's logprob and this many top alternatives
    prompt_logprobs: bool = False  # report the prompt tokens' logprobs (the completions API's echo)
    timeout: float = 300.0  # seconds from submission until the request is stopped


@dataclass
class Event:
    """Something that happened to one sample (`sample` >= 0) or to the whole request (sample -1).

    pieces: new output (text / python / python_output), after stop strings; token: the id that entered the
    sample's sequence (None when nothing did: a flush, the stop token, an error); logprob / top_logprobs: the
    model's log-probability of that token and its most likely alternatives (only when the job asked);
    finish_reason on a sample's last event: "stop", "length", "timeout" or "cancelled".
    Request-level events carry an error (with an HTTP status) or the prompt's logprobs.
    """

    sample: int
    pieces: list[Piece] = field(default_factory=list)
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None


class Submission:
    """A job in flight, as the event loop sees it: read its events, or cancel it."""

    _ids = itertools.count()

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.id = next(self._ids)
        self.loop = loop
        self.submitted = time.monotonic()
        self.deadline = self.submitted + job.timeout
        self.cancelled = False
        self._queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._unfinished = set(range(job.num_samples))
        # Worker-side state: the request's random generator (one for all its samples, like Engine.generate).
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away): the worker frees the rows at its next step."""
        self.cancelled = True

    def deliver(self, events: list[Event]) -> None:
        """Called on the event loop (the worker hands events over with call_soon_threadsafe)."""
        self._queue.put_nowait(events)

    async def events(self, poll: float | None = None) -> AsyncIterator[list[Event]]:
        """The events, one list per worker step, until every sample finished or the request failed.
        poll: also yield an empty list after this many seconds without news (to check the client is there)."""
        while self._unfinished:
            try:
                batch = await asyncio.wait_for(self._queue.get(), poll) if poll else await self._queue.get()
            except asyncio.TimeoutError:
                yield []
                continue
            for event in batch:
                if event.error is not None:
                    self._unfinished.clear()
                elif event.finish_reason is not None:
                    self._unfinished.discard(event.sample)
            yield batch


class _StopText:
    """Stop strings over streamed text: text is released only once it cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found; then nothing after it is released)."""
        self.pending += text
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            released, self.pending = self.pending[: min(found)], ""
            return released, True
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:length]):
                    hold = length
                    break
        cut = len(self.pending) - hold
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


@dataclass
class _Sample:
    """One row of the batch: a sample of a submission, with its tool-use state, text decoder and counters."""

    submission: Submission
    index: int
    state: RowState
    decoder: StreamDecoder
    stop_text: _StopText
    generated: int = 0


class Scheduler:
    """The worker thread and its queue. start(loop) once the event loop runs; close() at shutdown.

    engine: the Engine whose inference model, tokenizer and tool are used (the worker is its only user).
    max_batch: rows decoded together (a request with n samples takes n rows); its KV cache is allocated once.
    queue_size: requests that may wait to be admitted (a new request waits too, until the next step); one more
        raises QueueFull.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 16, queue_size: int = 64):
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch {max_batch} and queue_size {queue_size} must be >= 1")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.loop: asyncio.AbstractEventLoop | None = None
        self._condition = threading.Condition()
        self._waiting: deque[Submission] = deque()
        self._running = False
        self._thread: threading.Thread | None = None
        self._cache = None  # the SlotKVCache, allocated by the worker
        self._rows: list[_Sample] = []  # row i of the cache <-> self._rows[i]
        self._logits: torch.Tensor | None = None  # (rows, vocab): the next-token logits of every row
        self._outbox: dict[Submission, list[Event]] = {}
        # Counters for /metrics (written by the worker, read by the loop: ints, so a torn read cannot happen).
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.forward_passes = 0

    # ------------------------------------------------------------------------------------------------------
    # The event loop's side

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def rows_in_use(self) -> int:
        return len(self._rows)

    @property
    def ready(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._running = True
        self._thread = threading.Thread(target=self._work, name="picochat-generation", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._condition:
            self._running = False
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: GenerationJob) -> Submission:
        """Queue a job (call on the event loop). Raises QueueFull when queue_size jobs are already waiting."""
        if job.num_samples > self.max_batch:
            raise ValueError(f"n={job.num_samples} exceeds the batch of {self.max_batch} rows")
        submission = Submission(job, self.loop)
        with self._condition:
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(submission)
            self._condition.notify()
        return submission

    # ------------------------------------------------------------------------------------------------------
    # The worker's side

    def _work(self) -> None:
        with torch.inference_mode():
            model = self.engine.model
            self._cache = model.new_slot_cache(self.max_batch, self.engine.context_len)
            while True:
                with self._condition:
                    while self._running and not self._waiting and not self._rows:
                        self._condition.wait()
                    if not self._running:
                        break
                    admitted = self._take_admissible()
                try:
                    for submission in admitted:
                        self._prefill(submission)
                    if self._rows:
                        self._step()
                except Exception as error:  # never let one bad step kill the server: fail what was running
                    warn(f"generation failed ({type(error).__name__}: {error}); ending the running requests")
                    for submission in {sample.submission for sample in self._rows} | set(admitted):
                        self._emit(submission, Event(-1, error="generation failed", error_status=500))
                    self._cache.remove_rows(list(range(len(self._rows))))
                    self._rows, self._logits = [], None
                self._send_outbox()
            for submission in {sample.submission for sample in self._rows} | set(self._waiting):
                self._emit(submission, Event(-1, error="the server is shutting down", error_status=503))
            self._send_outbox()

    def _take_admissible(self) -> list[Submission]:
        """(Under the lock.) Pop the queued jobs that fit in the free rows, first come first served; drop the
        cancelled ones and fail the ones whose deadline passed while waiting."""
        now = time.monotonic()
        for submission in list(self._waiting):
            if submission.cancelled:
                self._waiting.remove(submission)
            elif now > submission.deadline:
                self._waiting.remove(submission)
                self._emit(submission, Event(-1, error="timed out waiting for a free slot", error_status=503))
        admitted = []
        free = self.max_batch - len(self._rows)
        while self._waiting and self._waiting[0].job.num_samples <= free:
            submission = self._waiting.popleft()
            free -= submission.job.num_samples
            admitted.append(submission)
        return admitted

    def _prefill(self, submission: Submission) -> None:
        """Run the prompt alone, then give each sample a row that starts from its cache."""
        job, model, device = submission.job, self.engine.model, self.engine.device
        submission.generator = torch.Generator(device=device)
        if job.seed is None:
            submission.generator.seed()
        else:
            submission.generator.manual_seed(job.seed)
        prompt = torch.tensor([job.prompt], dtype=torch.long, device=device)
        cache = model.new_kv_cache(batch_size=1, max_len=len(job.prompt))
        logits = model(prompt, kv_cache=cache, last_only=not job.prompt_logprobs)
        self.forward_passes += 1
        self.prompt_tokens += len(job.prompt)
        if job.prompt_logprobs:
            self._emit(submission, Event(-1, prompt_logprobs=self._prompt_logprobs(job, logits[0])))
        if job.max_tokens == 0:  # echo only: nothing to generate
            for index in range(job.num_samples):
                self._emit(submission, Event(index, finish_reason="length"))
            return
        for index in range(job.num_samples):
            self._cache.add_row(cache)
            decoder = StreamDecoder(self.tokenizer)
            self._rows.append(_Sample(submission, index, RowState(), decoder, _StopText(job.stop)))
        last = logits[:, -1].expand(job.num_samples, -1)  # every sample draws its own first token
        self._logits = last if self._logits is None else torch.cat([self._logits, last])

    def _prompt_logprobs(self, job: GenerationJob, logits: torch.Tensor):
        """Per prompt position: (logprob of that token given the ones before, top alternatives); None at 0."""
        log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(job.prompt[1:], device=log_probs.device)
        chosen = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = job.logprobs or 0
        top = _top(log_probs, k) if k else [[] for _ in chosen]
        return [(None, []), *zip(chosen, top)]

    def _step(self) -> None:
        """Sample one token for every row, advance each sample, drop the finished rows, forward the rest."""
        logits = self._logits
        log_probs = self._log_probs(logits)
        sampled = self._sample(logits)
        stops = self.engine.default_stop_tokens
        next_tokens, finished = [], []
        now = time.monotonic()
        for row, sample in enumerate(self._rows):
            submission, job = sample.submission, sample.submission.job
            next_tokens.append(0)
            if submission.cancelled:
                finished.append(row)
                self._emit(submission, Event(sample.index, finish_reason="cancelled"))
                continue
            token, _ = self.engine.advance_row(sample.state, sampled[row], stops)
            if sample.state.finished:  # a sampled stop token: it ends the sample and is not part of the output
                finished.append(row)
                self._emit(submission, self._finish(sample, "stop"))
                continue
            next_tokens[row] = token
            sample.generated += 1
            self.generated_tokens += 1
            event = Event(sample.index, token=token)
            if row in log_probs:
                event.logprob = log_probs[row][token].item()
                if job.logprobs:
                    event.top_logprobs = _top(log_probs[row].unsqueeze(0), job.logprobs)[0]
            stopped = self._add_text(sample, sample.decoder.push(token), event.pieces)
            reason = "stop" if stopped else None
            if reason is None and sample.generated >= job.max_tokens:
                reason = "length"
            elif reason is None and now > submission.deadline:
                reason = "timeout"
            elif reason is None and self._cache.lengths[row] + 1 >= self._cache.max_len:
                reason = "length"  # the context is full (the app's checks keep this from happening)
            if reason is not None:
                finished.append(row)
                event.pieces += self._finish(sample, reason, stopped=stopped).pieces
                event.finish_reason = reason
            self._emit(submission, event)

        if finished:
            order = self._cache.remove_rows(finished)
            self._rows = [self._rows[i] for i in order]
            next_tokens = [next_tokens[i] for i in order]
            logits = logits[torch.tensor(order, dtype=torch.long, device=logits.device)] if order else None
        if not self._rows:
            self._logits = None
            return
        ids = torch.tensor(next_tokens, dtype=torch.long, device=self.engine.device).unsqueeze(1)
        self._logits = self.engine.model(ids, kv_cache=self._cache)[:, -1]
        self.forward_passes += 1

    def _log_probs(self, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """log-softmax rows (the model's own distribution, before temperature) for the jobs that want logprobs."""
        rows = [row for row, sample in enumerate(self._rows) if sample.submission.job.logprobs is not None]
        if not rows:
            return {}
        values = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)].float(), dim=-1)
        return dict(zip(rows, values))

    def _sample(self, logits: torch.Tensor) -> list[int]:
        """One token per row. Greedy rows share one argmax; each sampling request draws with its own settings and
        generator, over its rows in sample order (as Engine.generate does), so a seed reproduces the engine."""
        tokens = logits.argmax(dim=-1)
        by_submission: dict[Submission, list[tuple[int, int]]] = {}
        for row, sample in enumerate(self._rows):
            if sample.submission.job.temperature != 0:
                by_submission.setdefault(sample.submission, []).append((sample.index, row))
        for submission, rows in by_submission.items():
            job = submission.job
            index = torch.tensor([row for _, row in sorted(rows)], dtype=torch.long, device=logits.device)
            tokens[index] = sample_next_token(
                logits[index], submission.generator, temperature=job.temperature, top_k=job.top_k, top_p=job.top_p
            )
        return tokens.tolist()  # the one device -> host transfer of the step

    def _add_text(self, sample: _Sample, pieces: list[Piece], out: list[Piece]) -> bool:
        """Pass pieces through the sample's stop strings into `out`; True if a stop string ended the text."""
        for piece in pieces:
            if piece.kind != "text":
                held = sample.stop_text.flush()
                if held:
                    out.append(Piece("text", held))
                out.append(piece)
                continue
            released, stopped = sample.stop_text.feed(piece.text)
            if released:
                out.append(Piece("text", released))
            if stopped:
                return True
        return False

    def _finish(self, sample: _Sample, reason: str, *, stopped: bool = False) -> Event:
        """The last event of a sample: what the decoder and the stop strings still hold (unless a stop string
        ended the text), and the reason."""
        event = Event(sample.index, finish_reason=reason)
        if not stopped and not self._add_text(sample, sample.decoder.finish(), event.pieces):
            held = sample.stop_text.flush()
            if held:
                event.pieces.append(Piece("text", held))
        return event

    def _emit(self, submission: Submission, event: Event) -> None:
        self._outbox.setdefault(submission, []).append(event)

    def _send_outbox(self) -> None:
        """Hand this step's events to the event loop in one call (one wake-up per step, not per token)."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        try:
            self.loop.call_soon_threadsafe(_deliver, outbox)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver(outbox: dict[Submission, list[Event]]) -> None:
    for submission, events in outbox.items():
        submission.deliver(events)


def _top(log_probs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of (rows, vocab) log-probabilities: the k most likely (token id, logprob) pairs."""
    values, ids = torch.topk(log_probs, min(k, log_probs.size(-1)), dim=-1)
    return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
