"""Inference: a KV-cache engine with batched sampling, tool use and UTF-8-safe streaming.

How one generation runs (Engine.generate):

    prompt ──prefill (batch 1, logits of the last position only)──► cache of 1 row
           ──replicate──► cache of N rows, room for prompt + max_tokens
    step:  sample N tokens (each row draws its own, from the same first distribution)
           per row: forced tool-output token? stop token? tool call finished? (the state machine below)
           yield the column of N tokens, then feed them back: one forward of (N, 1) tokens

- The cache is preallocated (attention.KVCache) and honours each layer's sliding window and GQA, because the model
  itself writes into it; rows that finish are dropped from the batch (KVCache.select_rows), so the rest run faster.
- Sampling: temperature (0 = greedy), top-k, top-p, all on the device; an explicit torch.Generator makes a seed
  reproduce the same text, and all rows draw from one generator, so N samples are independent draws.
- Tool use, per row: <|python_start|> expression <|python_end|> -> run the tool (calculator by default) -> the
  tokens <|output_start|> result <|output_end|> are forced into that row, one per step, with mask 0 (not sampled),
  then the model carries on.
- Weights: the engine runs a copy of the model whose weights are already in the compute dtype (prepare_for_inference),
  so no step re-casts fp32 master weights (the reference does, every step). On CPU in fp32 the "copy" shares the
  weights; in bf16 it is a real bf16 copy. Its outputs equal the fp32-master model's in the same compute dtype
  exactly, because that model casts the very same weights on the fly.
- Context: a prompt plus max_tokens must fit the model's context (sequence_len). Raw token prompts that do not are
  refused with a clear error; chat conversations drop their oldest exchanges first, with a notice
  (fit_conversation, linear in the conversation's length: context_fit.py). Without an explicit max_tokens a chat
  reply is given what the context leaves, up to 256 tokens, if that is at least MIN_REPLY_TOKENS.
- Streaming: StreamDecoder turns token ids into text through an incremental UTF-8 decoder over the tokens' raw bytes,
  so a character split across tokens is never printed as garbage, and special tokens are never printed: they only
  switch between text, tool call and tool output.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from picochat.attention import KVCache
from picochat.common import PicochatError, warn
from picochat.context_fit import fit_messages
from picochat.tools import calculator

FINISHED = -1  # the token reported for a row that finished at an earlier step
DEFAULT_REPLY_TOKENS = 256  # a chat reply's default length (the reference's chat CLI)
# Without an explicit max_tokens, a conversation whose last message leaves less than DEFAULT_REPLY_TOKENS is still
# answered if this many are left (the reply gets what is left): a 305-token prompt in a 512 context fits.
MIN_REPLY_TOKENS = 32

# ----------------------------------------------------------------------------------------------------------
# Weights in the compute dtype


def prepare_for_inference(model, compute_dtype: torch.dtype | None = None, *, copy: bool = True):
    """The model ready for inference: every parameter in `compute_dtype` (default: the model's), no gradients,
    rotary tables recomputed in that dtype.

    copy=True leaves `model` untouched (its fp32 masters can keep training); tensors already in the right dtype
    are shared, not duplicated. copy=False converts `model` in place (picochat.load, where nobody else holds it).
    """
    from picochat.rotary import rotary_tables

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: the module underneath
    dtype = compute_dtype or model.compute_dtype
    if copy:
        with torch.device("meta"):
            inference_model = type(model)(model.config, compute_dtype=dtype)
        weights = {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}
        inference_model.load_state_dict(weights, assign=True)
    else:
        inference_model = model.to(dtype)
        inference_model.compute_dtype = dtype
    inference_model.requires_grad_(False)
    config = inference_model.config
    inference_model.cos, inference_model.sin = rotary_tables(
        inference_model.rotary_len, config.head_dim, device=model.device, dtype=dtype
    )
    return inference_model.eval()


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row of `logits` (B, V): argmax when temperature is 0; otherwise a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the smallest set whose
    probability reaches top_p (the most likely token always stays). Returns (B,) token ids, on the device."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    else:
        candidates = None
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probabilities = torch.softmax(logits, dim=-1)
        mass_before = probabilities.cumsum(dim=-1) - probabilities  # probability of the more likely tokens
        outside = mass_before >= top_p
        outside[..., 0] = False  # the most likely token stays even if top_p rounds to 0 in the logits' dtype
        logits = logits.masked_fill(outside, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    choice = torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)
    if candidates is None:
        return choice
    return candidates.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Sampling settings come from users (flags, chat commands, API calls): wrong ones are PicochatErrors."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e6:
        raise PicochatError(f"temperature {temperature!r}: expected a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise PicochatError(f"top_k {top_k!r}: expected a positive integer (or None for no limit)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise PicochatError(f"top_p {top_p!r}: expected a finite number in (0, 1] (or None for no limit)")


# ----------------------------------------------------------------------------------------------------------
# Streaming text


@dataclass
class Piece:
    """A bit of streamed output. kind is "text" (the assistant's prose), "python" (a tool call it writes) or
    "python_output" (the tool's result, forced into the stream) -- the part types of a conversation message."""

    kind: str
    text: str


class StreamDecoder:
    """Token ids of one row -> Pieces of printable text, as they arrive.

    Ordinary tokens are decoded from their raw bytes with an incremental UTF-8 decoder, so a multi-byte character
    split over two tokens comes out whole once its last byte arrives (bytes that can never form a character become
    U+FFFD). Special tokens print nothing: the tool delimiters switch the kind of the pieces that follow, the
    others are dropped. `parts` collects everything as conversation parts ({"type", "text"}) for the history.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = tokenizer.special_token_ids
        self._switches = {
            ids["<|python_start|>"]: "python",
            ids["<|python_end|>"]: "text",
            ids["<|output_start|>"]: "python_output",
            ids["<|output_end|>"]: "text",
        }
        self.kind = "text"
        self.parts: list[dict] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> list[Piece]:
        if self.tokenizer.is_special(token_id):
            pieces = self.finish()
            self.kind = self._switches.get(token_id, self.kind)
            return pieces
        return self._emit(self._utf8.decode(self.tokenizer.token_to_bytes(token_id)))

    def finish(self) -> list[Piece]:
        """Flush what is pending (an incomplete character becomes U+FFFD)."""
        pieces = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return pieces

    def _emit(self, text: str) -> list[Piece]:
        if not text:
            return []
        if self.parts and self.parts[-1]["type"] == self.kind:
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"type": self.kind, "text": text})
        return [Piece(self.kind, text)]


def decode_pieces(tokenizer, tokens: Iterable[int]) -> StreamDecoder:
    """Run a whole token list through a StreamDecoder (its .parts are then complete)."""
    decoder = StreamDecoder(tokenizer)
    for token in tokens:
        decoder.push(token)
    decoder.finish()
    return decoder


# ----------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class Completion:
    tokens: list[int]  # generated ids: no prompt, no stop token
    masks: list[int]  # per token: 1 = sampled by the model, 0 = forced (tool output)
    finish_reason: str  # "stop" (a stop token came) or "length" (max_tokens reached)
    parts: list[dict] = field(default_factory=list)  # text / python / python_output parts, as in a message

    @property
    def text(self) -> str:
        """The assistant's prose, without tool calls and tool outputs."""
        return "".join(part["text"] for part in self.parts if part["type"] == "text")


@dataclass
class _Row:
    """The tool-use state machine of one sample."""

    forced: deque = field(default_factory=deque)  # tokens to force before sampling again
    tool_tokens: list | None = None  # collecting a tool call (between python_start and python_end)
    finished: bool = False


RowState = _Row  # the public name, for schedulers that batch samples themselves (picochat.serve)


class Engine:
    """Generation with a KV cache from a GPT and its Tokenizer.

    tool: called with the text between <|python_start|> and <|python_end|>; returns the result text or None (no
    output is forced then). Default: the calculator; tools.python_tool runs real Python; None disables tools.
    compute_dtype: the dtype of the inference weights (default: the model's compute dtype).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        compute_dtype: torch.dtype | None = None,
        tool: Callable[[str], str | None] | None = calculator,
    ):
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: the module underneath
        if model.config.vocab_size != tokenizer.vocab_size:
            raise PicochatError(
                f"the model's vocabulary ({model.config.vocab_size}) does not match the tokenizer's "
                f"({tokenizer.vocab_size}): they come from different runs"
            )
        self.source_model = model
        self.model = prepare_for_inference(model, compute_dtype, copy=True)
        self.tokenizer = tokenizer
        self.tool = tool
        ids = tokenizer.special_token_ids
        self.default_stop_tokens = frozenset({ids["<|assistant_end|>"], tokenizer.bos_token_id})
        self._python_start, self._python_end = ids["<|python_start|>"], ids["<|python_end|>"]
        self._output_start, self._output_end = ids["<|output_start|>"], ids["<|output_end|>"]

    @property
    def context_len(self) -> int:
        """How many tokens (prompt + generated) fit: the context the model was trained with."""
        return self.model.config.sequence_len

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sync_weights(self) -> None:
        """Copy the source model's current weights into the inference copy (after training steps, e.g. RL).
        Weights stored in the same dtype are shared already; this matters for a real (e.g. bf16) copy."""
        with torch.no_grad():
            inference_weights = self.model.state_dict()
            for name, tensor in self.source_model.state_dict().items():
                if inference_weights[name].data_ptr() != tensor.data_ptr():
                    inference_weights[name].copy_(tensor)

    # ------------------------------------------------------------------------------------------------------
    # From token ids

    def generate(
        self,
        tokens: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Stream `num_samples` continuations of the prompt `tokens`, one step at a time.

        Each step yields (tokens, masks): one entry per sample; mask 1 = sampled, 0 = forced by the tool; a sample
        that finished at an earlier step reports FINISHED (-1) with mask 0. The stop token that ends a sample is
        yielded (default stop tokens: <|assistant_end|> and <|bos|>; pass () for none). Generation ends when every
        sample has stopped or after max_tokens steps (default: as many as fit in the context).
        seed: None draws a fresh random seed; an int makes the output reproducible.
        """
        prompt = self._check_prompt(tokens)
        check_sampling(temperature, top_k, top_p)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise PicochatError(f"num_samples {num_samples!r}: expected a positive integer")
        room = self.context_len - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise PicochatError(f"max_tokens {max_tokens!r}: expected a positive integer")
        if max_tokens > room:
            raise PicochatError(
                f"a prompt of {len(prompt)} tokens plus max_tokens {max_tokens} exceeds the model's context of "
                f"{self.context_len} tokens: lower max_tokens to {room} or shorten the prompt"
            )
        stops = self.default_stop_tokens if stop_tokens is None else frozenset(stop_tokens)
        return self._generate(prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stops)

    @torch.inference_mode()
    def _generate(self, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stops):
        model, device = self.model, self.device
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

        # Prefill once at batch 1; only the last position's logits are needed.
        total = len(prompt) + max_tokens
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        if num_samples == 1:
            cache = model.new_kv_cache(batch_size=1, max_len=total)
            logits = model(prompt_ids, kv_cache=cache, last_only=True)[:, -1]
        else:
            prefill_cache = model.new_kv_cache(batch_size=1, max_len=len(prompt))
            logits = model(prompt_ids, kv_cache=prefill_cache, last_only=True)[:, -1]
            cache = KVCache.replicate(prefill_cache, num_samples, total)
            logits = logits.expand(num_samples, -1)  # every row samples its own first token

        rows = [_Row() for _ in range(num_samples)]
        active = list(range(num_samples))  # the sample behind each row of the batch
        for step in range(max_tokens):
            sampled = sample_next_token(logits, generator, temperature=temperature, top_k=top_k, top_p=top_p)
            sampled = sampled.tolist()  # the one device -> host transfer per step
            column, masks = [FINISHED] * num_samples, [0] * num_samples
            for batch_row, sample in enumerate(active):
                token, mask = self._advance(rows[sample], sampled[batch_row], stops)
                column[sample], masks[sample] = token, mask
            yield column, masks
            if step == max_tokens - 1:
                break
            alive = [i for i, sample in enumerate(active) if not rows[sample].finished]
            if not alive:
                break
            if len(alive) < len(active):  # drop finished rows: later steps compute only the live ones
                cache.select_rows(torch.tensor(alive, device=device))
                active = [active[i] for i in alive]
            next_ids = torch.tensor([[column[sample]] for sample in active], dtype=torch.long, device=device)
            logits = model(next_ids, kv_cache=cache)[:, -1]

    def _advance(self, row: _Row, sampled: int, stops: frozenset) -> tuple[int, int]:
        """The state machine of one sample for one step: returns (token, mask)."""
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = sampled, 1
        if mask == 1 and token in stops:
            row.finished = True
        elif token == self._python_start and self.tool is not None:
            row.tool_tokens = []
        elif token == self._python_end and row.tool_tokens is not None:
            result = self._run_tool(self.tokenizer.decode(row.tool_tokens))
            row.tool_tokens = None
            if result is not None:
                row.forced.extend([self._output_start, *self.tokenizer.encode(result), self._output_end])
        elif row.tool_tokens is not None:
            row.tool_tokens.append(token)
        return token, mask

    def advance_row(self, row: RowState, sampled: int, stops: frozenset) -> tuple[int, int]:
        """One step of one sample's tool-use state machine, for callers that run the forwards and the sampling
        themselves (picochat.serve batches many requests): the (token, mask) that enters the sequence."""
        return self._advance(row, sampled, stops)

    def _run_tool(self, call: str) -> str | None:
        try:
            result = self.tool(call)
        except Exception as error:  # a broken tool must not end the generation; the model just gets no output
            warn(f"tool call failed ({type(error).__name__}: {error})")
            return None
        return None if result is None else str(result)

    def generate_batch(
        self,
        tokens: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
    ) -> list[Completion]:
        """Run generate() to the end: one Completion per sample."""
        stops = self.default_stop_tokens if stop_tokens is None else frozenset(stop_tokens)
        steps = self.generate(
            tokens, num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_tokens=stops,
        )  # fmt: skip
        sequences: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for column, mask_column in steps:
            for sample, (token, mask) in enumerate(zip(column, mask_column)):
                if token != FINISHED:
                    sequences[sample].append(token)
                    masks[sample].append(mask)
        completions = []
        for sequence, mask in zip(sequences, masks):
            # A sampled stop token is always a sample's last token; it is reported by finish_reason, not kept.
            stopped = bool(sequence) and mask[-1] == 1 and sequence[-1] in stops
            if stopped:
                sequence, mask = sequence[:-1], mask[:-1]
            completions.append(
                Completion(
                    tokens=sequence,
                    masks=mask,
                    finish_reason="stop" if stopped else "length",
                    parts=decode_pieces(self.tokenizer, sequence).parts,
                )
            )
        return completions

    def _check_prompt(self, tokens: Sequence[int]) -> list[int]:
        try:
            prompt = [int(token) for token in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
        except (TypeError, ValueError):
            raise PicochatError("prompt: expected a sequence of token ids") from None
        if not prompt:
            raise PicochatError("prompt is empty: expected at least one token id (a conversation starts with BOS)")
        vocab = self.model.config.vocab_size
        if all(token < 0 for token in prompt):
            raise PicochatError(
                f"prompt: all {len(prompt)} tokens are masked/padding ids (negative, e.g. -1); expected real ids"
            )
        for position, token in enumerate(prompt):
            if not 0 <= token < vocab:
                raise PicochatError(f"prompt: token {position} is {token}, expected an id in [0, {vocab})")
        if len(prompt) >= self.context_len:
            raise PicochatError(
                f"prompt of {len(prompt)} tokens leaves no room in the model's context of {self.context_len} tokens"
            )
        return prompt

    # ------------------------------------------------------------------------------------------------------
    # From chat messages

    def reply_budget(self, max_tokens: int | None = None) -> int:
        """Tokens reserved for a chat reply: max_tokens, by default 256 or half the context if that is less."""
        if max_tokens is None:
            return min(DEFAULT_REPLY_TOKENS, self.context_len // 2)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise PicochatError(f"max_tokens {max_tokens!r}: expected a positive integer")
        if max_tokens >= self.context_len:
            raise PicochatError(
                f"max_tokens {max_tokens} leaves no room for the conversation in the model's context of "
                f"{self.context_len} tokens"
            )
        return max_tokens

    def reply_tokens(self, prompt: Sequence[int], max_tokens: int | None = None) -> int:
        """The most tokens a reply to `prompt` may have: max_tokens if given, else reply_budget() or what the
        context leaves after the prompt, if that is less."""
        if max_tokens is not None:
            return self.reply_budget(max_tokens)
        return max(1, min(self.reply_budget(), self.context_len - len(prompt)))

    def fit_conversation(
        self, messages: list[dict], max_tokens: int | None = None, *, shrink_reply: bool | None = None
    ) -> tuple[list[dict], list[int]]:
        """The messages that fit and the prompt for the next assistant reply: while prompt + max_tokens does not
        fit the context, the oldest user/assistant exchange is dropped (a leading system message stays), with a
        notice. If even the last user message does not fit, that is an error -- unless shrink_reply (the default
        when max_tokens is None, i.e. reply_budget()): then it is enough that MIN_REPLY_TOKENS are left for the
        reply (reply_tokens says how many it gets). An explicit max_tokens is a promise the reply can be that long."""
        if shrink_reply is None:
            shrink_reply = max_tokens is None
        max_tokens = self.reply_budget(max_tokens)
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise PicochatError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the reply to write is the next one; render_for_completion drops it too
        # Linear in the conversation's length, and exactly what re-rendering after each drop would keep.
        pairs, prompt = fit_messages(self.tokenizer, messages, self.context_len - max_tokens)
        dropped = 2 * pairs
        first = 1 if messages[0].get("role") == "system" else 0
        messages = messages[:first] + messages[first + dropped :]
        minimum = min(MIN_REPLY_TOKENS, max_tokens) if shrink_reply else max_tokens
        if len(prompt) + minimum > self.context_len:
            if shrink_reply:
                raise PicochatError(
                    f"the last message makes a prompt of {len(prompt)} tokens, which leaves fewer than {minimum} "
                    f"tokens for the reply in the model's context of {self.context_len} tokens (shorten it)"
                )
            raise PicochatError(
                f"the last message makes a prompt of {len(prompt)} tokens; with max_tokens {max_tokens} that "
                f"exceeds the model's context of {self.context_len} tokens (shorten it or lower max_tokens)"
            )
        if dropped:
            warn(
                f"the conversation does not fit the model's context of {self.context_len} tokens with "
                f"max_tokens {max_tokens}: dropped its {dropped} oldest messages"
            )
        return messages, prompt

    def stream_chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.6,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[Piece]:
        """Stream the assistant's reply to a conversation as Pieces (text, tool calls, tool outputs).
        max_tokens: the most reply tokens (default: reply_budget(), or what the context leaves after the last
        message if that is less); old turns are dropped to make room."""
        _, prompt = self.fit_conversation(messages, max_tokens)
        max_tokens = self.reply_tokens(prompt, max_tokens)
        decoder = StreamDecoder(self.tokenizer)
        steps = self.generate(
            prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        for column, _ in steps:
            if column[0] in self.default_stop_tokens:
                break
            yield from decoder.push(column[0])
        yield from decoder.finish()

    def chat(
        self,
        messages: list[dict],
        *,
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 0.6,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """num_samples complete replies to a conversation (settings as for stream_chat)."""
        _, prompt = self.fit_conversation(messages, max_tokens)
        max_tokens = self.reply_tokens(prompt, max_tokens)
        return self.generate_batch(
            prompt, num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed,
        )  # fmt: skip
