"""The byte-level BPE tokenizer: training, encoding and decoding, special tokens, conversation rendering.

Three tools, each used for what it is best at:
  - training: a maintained Rust BPE trainer, `rustbpe` (default) or Hugging Face `tokenizers` (--trainer hf);
    both end in the same object, the *mergeable ranks*: token bytes -> rank, where ranks 0..255 are the 256 single
    bytes and rank 256 + i is the token created by the i-th merge;
  - encoding: `tiktoken`, an Encoding built from those ranks + the split pattern + our special tokens; it is fast,
    multi-threaded for batches, and applies the merges in rank order (lowest rank first), which is BPE;
  - storage: one JSON file (ranks as base64 bytes -> rank, the pattern, the special tokens). Never pickle.

The vocabulary is [256 byte tokens][merges][9 special tokens]: with the default 32,768 that is 32,503 merges and the
specials take the last 9 ids (BOS = 32,759).

Text is first split into chunks by a regex (GPT-4 style, but digits in groups of 1-2) and merges never cross a
chunk boundary, so e.g. " the" and "the" are different tokens but "the." is never one.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from picochat.common import PicochatError, atomic_write_bytes, atomic_write_json

# GPT-4's split pattern with numbers in groups of 1-2 digits ({1,2} measured best in the reference, A.7).
# Alternatives, in order: English contractions; an optional non-letter/non-digit char (usually a space) followed
# by letters; 1-2 digits; an optional space, punctuation, and trailing newlines; whitespace ending in a newline;
# whitespace not followed by a non-space (so the last space sticks to the next word); any other whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)

# The same pattern without possessive quantifiers, for regex engines that lack them (HF tokenizers' Oniguruma
# happens to accept them today; this form does not depend on it). It matches exactly the same chunks because
# neither possessive quantifier can change a match:
#   [^\r\n\p{L}\p{N}]?+\p{L}+  the optional char is not a letter, so \p{L}+ could never reuse it by backtracking;
#   [^\s\p{L}\p{N}]++[\r\n]*   what follows can match the empty string, so the greedy run is never given back.
# tests/test_tokenizer.py checks the two give identical splits on varied text.
SPLIT_PATTERN_NO_POSSESSIVE = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)

# Llama 3's split pattern, for the portable architecture: llama.cpp implements it as its "llama-bpe" pre-tokenizer
# (and transformers' GGUF reader maps that name back to this regex), so a GGUF export tokenises exactly as picochat
# does. Against ours: digits in groups of 1-3 (not 1-2), a run of newlines is one chunk (\s*[\r\n]+), and nothing is
# possessive (no possessive quantifier changes a match here, for the reasons given above).
LLAMA3_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
# The patterns `picochat tokenizer train --split-pattern` offers, by name; "llama-bpe" is llama.cpp's name for it.
SPLIT_PATTERNS = {"picochat": SPLIT_PATTERN, "llama-bpe": LLAMA3_SPLIT_PATTERN}


def split_pattern_name(pattern: str) -> str | None:
    """The SPLIT_PATTERNS name of a pattern, or None for any other."""
    return next((name for name, known in SPLIT_PATTERNS.items() if known == pattern), None)


# Special tokens, in this order, at the last ids of the vocabulary.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document (and every conversation)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output (comes from the interpreter, never trained on)
    "<|output_end|>",
]

DEFAULT_VOCAB_SIZE = 32_768  # = 2^15, including the special tokens
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte tokens and the specials, zero merges
TRAINERS = ("rustbpe", "hf")
# rustbpe is the default because it is faster and leaner at the same quality: bench/tokenizer.py (2 shared cores,
# vocab 32,768) measured 5.7 s vs 10.1 s and 309 vs 432 MiB on the 52M characters of our train shards (doc cap
# 10,000), and 10.7 s vs 28.7 s, 399 vs 708 MiB on 100M uncropped characters; both reached the same held-out
# Wikipedia bytes/token to 4 decimals (they learn the same merges up to the order of ties).
DEFAULT_TRAINER = "rustbpe"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.safetensors"
FILE_FORMAT = "picochat-tokenizer"
SYSTEM_JOINER = "\n\n"  # a system message is merged into the first user message: system + this + user


class Tokenizer:
    """Byte-level BPE over mergeable ranks; tiktoken does the encoding."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str = SPLIT_PATTERN,
        special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
    ) -> None:
        _check_mergeable_ranks(mergeable_ranks, source="mergeable ranks")
        if len(set(special_tokens)) != len(special_tokens):
            raise PicochatError(f"special tokens must be distinct, got {list(special_tokens)}")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = list(special_tokens)
        # Specials follow the mergeable tokens, so they are the last ids of the vocabulary.
        first_special = len(self.mergeable_ranks)
        self.special_token_ids = {name: first_special + i for i, name in enumerate(self.special_tokens)}
        self._encoding = tiktoken.Encoding(
            name="picochat",
            pat_str=pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_token_ids,
        )

    # ------------------------------------------------------------------------------------------------------
    # Sizes and ids

    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)

    @property
    def bos_token_id(self) -> int:
        return self.special_token_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """The id of a special token, by its name (e.g. "<|assistant_end|>")."""
        try:
            return self.special_token_ids[name]
        except KeyError:
            raise PicochatError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    # ------------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(
        self,
        text: str | list[str],
        *,
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 4,
    ) -> list[int] | list[list[int]]:
        """Token ids of one text, or of each text of a list (batched over num_threads threads).

        Always *ordinary* encoding: a special token's text inside user text (say "<|bos|>") is encoded as plain
        text, never as the special token -- otherwise any document could forge conversation structure.
        prepend/append: a token id, or the name of a special token, added to each sequence (e.g. prepend=BOS).
        """
        prepend_id = self._token_id(prepend)
        append_id = self._token_id(append)
        if isinstance(text, str):
            ids = self._encoding.encode_ordinary(text)
            return self._wrap(ids, prepend_id, append_id)
        if isinstance(text, list):
            for index, item in enumerate(text):
                if not isinstance(item, str):
                    raise TypeError(f"encode: item {index} of the list is {type(item).__name__}, expected str")
            batch = self._encoding.encode_ordinary_batch(text, num_threads=num_threads)
            return [self._wrap(ids, prepend_id, append_id) for ids in batch]
        raise TypeError(f"encode: expected str or list[str], got {type(text).__name__}")

    def _token_id(self, token: int | str | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        return self.encode_special(token)

    @staticmethod
    def _wrap(ids: list[int], prepend_id: int | None, append_id: int | None) -> list[int]:
        if prepend_id is not None:
            ids.insert(0, prepend_id)
        if append_id is not None:
            ids.append(append_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token sequence. Bytes that are not valid UTF-8 (a sequence cut inside a character) become
        U+FFFD; use decode_bytes for the exact bytes. ids may also be a 1-D tensor or array."""
        return self._encoding.decode(_id_list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._encoding.decode_bytes(_id_list(ids))

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token gives its name's bytes)."""
        return self._encoding.decode_single_token_bytes(token_id)

    def token_byte_lengths(self) -> list[int]:
        """Per token id: the number of raw bytes the token stands for; 0 for special tokens.

        Computed from the raw bytes of the ranks, never from decoded strings: a token that is only part of a UTF-8
        character would decode to U+FFFD (3 bytes) and corrupt the count (a bug the reference had, A.7).
        Used to turn a loss in nats per token into bits per byte, which does not depend on the tokenizer.
        """
        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def token_bytes(self):
        """token_byte_lengths() as a torch int32 tensor of shape (vocab_size,)."""
        import torch

        return torch.tensor(self.token_byte_lengths(), dtype=torch.int32)

    # ------------------------------------------------------------------------------------------------------
    # Conversations -> (ids, loss mask). The layout, for a user turn and an assistant turn with a tool call:
    #   <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> text <|python_start|> code <|python_end|>
    #   <|output_start|> result <|output_end|> text <|assistant_end|>
    # The loss mask says which tokens the model is trained to produce (1) and which it only reads (0): everything
    # the assistant itself writes -- its text, its tool calls with both python delimiters, and <|assistant_end|>
    # (so it learns to stop) -- but not BOS, the user's turns, <|assistant_start|> (the chat program inserts it)
    # or the tool output block (the interpreter writes it at inference time).

    def render_conversation(self, conversation: dict | list, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (0/1, same length) of a conversation, truncated to max_tokens.

        conversation: {"messages": [...]} or the list of messages itself; a message is {"role", "content"}. An
        optional leading system message is merged into the first user message; then roles must alternate
        user, assistant, user, ... Assistant content is a string or a list of parts
        {"type": "text" | "python" | "python_output", "text": str}.
        Pass max_tokens = the packing row's capacity, so a long conversation is cropped rather than unplaceable.
        """
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise PicochatError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        ids: list[int] = [self.bos_token_id]
        mask: list[int] = [0]
        for index, role, content in _conversation_turns(conversation):
            turn_ids, turn_mask = self._render_turn(index, role, content)
            ids += turn_ids
            mask += turn_mask
        return ids[:max_tokens], mask[:max_tokens]

    def _render_turn(self, index: int, role: str, content: Any) -> tuple[list[int], list[int]]:
        """Token ids and loss mask of one checked turn (from _conversation_turns)."""
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], supervised: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        special = self.special_token_ids
        if role == "user":
            add(special["<|user_start|>"], 0)
            add(self.encode(content), 0)
            add(special["<|user_end|>"], 0)
            return ids, mask
        add(special["<|assistant_start|>"], 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part_index, part in enumerate(parts):
            kind, text = _check_part(part, index, part_index)
            if kind == "text":
                add(self.encode(text), 1)
            elif kind == "python":
                add(special["<|python_start|>"], 1)
                add(self.encode(text), 1)
                add(special["<|python_end|>"], 1)
            else:  # python_output
                add(special["<|output_start|>"], 0)
                add(self.encode(text), 0)
                add(special["<|output_end|>"], 0)
        add(special["<|assistant_end|>"], 1)
        return ids, mask

    def render_for_completion(self, conversation: dict | list) -> list[int]:
        """The prompt that asks the model for the next assistant message: the conversation without its final
        assistant message (if it ends with one), then <|assistant_start|>. Used by evaluations, RL and chat."""
        ids = [self.bos_token_id]
        for turn in self.completion_turns(conversation):
            ids += turn
        return ids + [self.special_token_ids["<|assistant_start|>"]]

    def completion_turns(self, conversation: dict | list) -> list[list[int]]:
        """render_for_completion's pieces, checked the same way: the token ids of each turn, without the BOS before
        them and the <|assistant_start|> after them. A leading system message is part of the first turn. For
        callers that need each turn's length (fitting a conversation into the context)."""
        messages = _messages_of(conversation)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages:
            raise PicochatError("conversation: nothing left to prompt with after removing the final assistant message")
        last_role = messages[-1].get("role") if isinstance(messages[-1], dict) else None
        if last_role != "user":
            raise PicochatError(
                f"conversation: message {len(messages) - 1} must be a user message to prompt for an answer, "
                f"got role {last_role!r}"
            )
        return [self._render_turn(*turn)[0] for turn in _conversation_turns(messages)]

    def visualize_tokens(self, ids: Sequence[int], mask: Sequence[int] | None = None) -> str:
        """A plain-text debugging view: tokens separated by "|", supervised tokens (mask 1) wrapped in [[ ]].
        Control characters are escaped so the view stays on one line per conversation."""
        if mask is not None and len(mask) != len(ids):
            raise ValueError(f"visualize_tokens: {len(ids)} ids but {len(mask)} mask values")
        pieces = []
        for position, token_id in enumerate(ids):
            text = self.token_to_bytes(token_id).decode("utf-8", errors="replace")
            text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
            pieces.append(f"[[{text}]]" if mask is not None and mask[position] else text)
        return "|".join(pieces)

    # ------------------------------------------------------------------------------------------------------
    # Saving and loading: tokenizer.json (+ token_bytes.safetensors for the evaluators)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write <folder>/tokenizer.json and <folder>/token_bytes.safetensors (atomically). Returns the JSON path."""
        import numpy as np
        from safetensors.numpy import save as safetensors_save

        folder = Path(folder)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        document = {
            "format": FILE_FORMAT,
            "version": 1,
            "pattern": self.pattern,
            # base64 because token bytes are arbitrary bytes, not text; in rank order for readability.
            "mergeable_ranks": {base64.b64encode(token).decode("ascii"): rank for token, rank in ranks},
            "special_tokens": dict(self.special_token_ids),
        }
        json_path = folder / TOKENIZER_FILE
        atomic_write_json(json_path, document)
        lengths = np.asarray(self.token_byte_lengths(), dtype=np.int32)
        atomic_write_bytes(folder / TOKEN_BYTES_FILE, safetensors_save({"token_bytes": lengths}))
        return json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a tokenizer folder (holding tokenizer.json) or from the tokenizer.json file itself.

        The file is validated: anything missing or malformed is a PicochatError naming the file and the field.
        """
        path = Path(path)
        json_path = path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE
        if json_path.is_dir():
            raise PicochatError(f"{json_path}: is a folder, expected the tokenizer file")
        if not json_path.is_file():
            raise PicochatError(f"{json_path}: tokenizer file not found (train one with `picochat tokenizer train`)")
        try:
            document = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PicochatError(f"{json_path}: not a valid JSON tokenizer file ({error})") from None
        except OSError as error:
            raise PicochatError(f"{json_path}: unreadable ({error.strerror or error})") from None
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise PicochatError(f'{json_path}: not a picochat tokenizer file (expected "format": "{FILE_FORMAT}")')
        if document.get("version") != 1:
            raise PicochatError(f"{json_path}: unsupported tokenizer file version {document.get('version')!r}")
        pattern = document.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise PicochatError(f'{json_path}: field "pattern" must be a non-empty string')
        encoded_ranks = document.get("mergeable_ranks")
        if not isinstance(encoded_ranks, dict):
            raise PicochatError(f'{json_path}: field "mergeable_ranks" must be an object (base64 bytes -> rank)')
        ranks: dict[bytes, int] = {}
        for key, rank in encoded_ranks.items():
            try:
                token = base64.b64decode(key, validate=True)
            except ValueError:
                raise PicochatError(f"{json_path}: mergeable_ranks key {key!r} is not valid base64") from None
            if not isinstance(rank, int) or isinstance(rank, bool):
                raise PicochatError(f"{json_path}: mergeable_ranks[{key!r}] must be an integer, got {rank!r}")
            if token in ranks:
                raise PicochatError(f"{json_path}: mergeable_ranks has the token {token!r} twice")
            ranks[token] = rank
        _check_mergeable_ranks(ranks, source=str(json_path))
        specials = document.get("special_tokens")
        if not isinstance(specials, dict) or not all(isinstance(k, str) for k in specials):
            raise PicochatError(f'{json_path}: field "special_tokens" must be an object (name -> id)')
        names = list(specials)
        expected_ids = {name: len(ranks) + i for i, name in enumerate(names)}
        if specials != expected_ids:
            raise PicochatError(
                f"{json_path}: special_tokens must take the ids right after the {len(ranks)} mergeable tokens, "
                f"in order; got {specials}"
            )
        missing = [name for name in SPECIAL_TOKENS if name not in specials]
        if missing:
            raise PicochatError(f"{json_path}: special_tokens lacks {', '.join(missing)}")
        try:
            return cls(ranks, pattern=pattern, special_tokens=names)
        except ValueError as error:  # tiktoken rejects a pattern it cannot compile
            raise PicochatError(f'{json_path}: field "pattern" is not a valid regex ({error})') from None

    # ------------------------------------------------------------------------------------------------------
    # Training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        trainer: str = DEFAULT_TRAINER,
        pattern: str = SPLIT_PATTERN,
    ) -> Tokenizer:
        """Train byte-level BPE on an iterable of texts (streamed; never all in memory at once).

        vocab_size counts everything: 256 byte tokens + merges + the 9 specials. A corpus too small to supply that
        many merges yields a smaller vocabulary (the trainers stop when no pair is left to merge).
        """
        check_vocab_size(vocab_size)
        num_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if trainer == "rustbpe":
            ranks = train_ranks_rustbpe(texts, num_mergeable, pattern)
        elif trainer == "hf":
            ranks = train_ranks_hf(texts, num_mergeable, pattern)
        else:
            raise PicochatError(f"unknown trainer {trainer!r}; expected one of {', '.join(TRAINERS)}")
        return cls(ranks, pattern=pattern)


def _id_list(ids: Any) -> list[int]:
    # A tensor or numpy array iterates as 0-d elements tiktoken cannot read; tolist() gives plain ints.
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def check_vocab_size(vocab_size: Any) -> int:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise PicochatError(
            f"vocab size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size!r}"
        )
    return vocab_size


def _check_mergeable_ranks(ranks: dict[bytes, int], *, source: str) -> None:
    """Ranks must be exactly 0..n-1 (ids are dense) and contain all 256 single bytes (any text is encodable)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise PicochatError(f"{source}: ranks must be the integers 0..{len(ranks) - 1}, each used once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise PicochatError(
            f"{source}: {len(missing)} of the 256 single-byte tokens are missing (e.g. byte {missing[0]})"
        )
    empty = [rank for token, rank in ranks.items() if not token]
    if empty:
        raise PicochatError(f"{source}: rank {empty[0]} is an empty token")


def _dense_ranks(tokens_in_order: Iterable[bytes]) -> dict[bytes, int]:
    """Ranks from tokens listed in merge order. A token that appears a second time (two different pairs merged to
    the same bytes) adds nothing to tiktoken, which looks tokens up by their bytes, so it is dropped."""
    ranks: dict[bytes, int] = {}
    for token in tokens_in_order:
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


# ----------------------------------------------------------------------------------------------------------
# Trainer 1: rustbpe. It counts chunks in parallel (rayon) and returns ranks in exactly our layout.


def train_ranks_rustbpe(texts: Iterable[str], num_mergeable: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), num_mergeable, pattern=pattern)
    ranks = sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])
    return _dense_ranks(token for token, _ in ranks)


# ----------------------------------------------------------------------------------------------------------
# Trainer 2: Hugging Face tokenizers. Its byte-level BPE does not work on bytes but on a printable stand-in
# alphabet: every byte is mapped to one unicode character (GPT-2's trick, so that tokens are printable strings).
# We map its merges back to raw bytes, so the result is the same kind of object rustbpe gives: the 256 bytes at
# ranks 0..255 (in byte order), then the merged tokens in the order they were learned.


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
    space, a few Latin-1 blanks) are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def train_ranks_hf(texts: Iterable[str], num_mergeable: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf_pattern = SPLIT_PATTERN_NO_POSSESSIVE if pattern == SPLIT_PATTERN else pattern
    tokenizer = HFTokenizer(models.BPE())
    # Split into chunks with our pattern ("isolated": every match is its own chunk), then map each chunk's UTF-8
    # bytes to the stand-in alphabet (use_regex=False: no second, GPT-2 split).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(hf_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=num_mergeable,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    char_to_byte = {char: b for b, char in byte_to_unicode().items()}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]

    def to_bytes(token: str) -> bytes:
        return bytes(char_to_byte[char] for char in token)

    def merged(merge: Any) -> bytes:
        # Older tokenizers releases store a merge as "left right", newer ones as ["left", "right"].
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        return to_bytes(left) + to_bytes(right)

    return _dense_ranks([bytes([b]) for b in range(256)] + [merged(m) for m in merges])


# ----------------------------------------------------------------------------------------------------------
# Conversation checks: user data, so every problem is a PicochatError naming the message.


def _messages_of(conversation: Any) -> list:
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise PicochatError('conversation: expected a "messages" field or a list of messages')
        conversation = conversation["messages"]
    if not isinstance(conversation, list):
        raise PicochatError(f"conversation: messages must be a list, got {type(conversation).__name__}")
    return conversation


def _conversation_turns(conversation: Any) -> list[tuple[int, str, Any]]:
    """(original message index, role, content) per turn, with a leading system message merged into the first user
    message, after checking that roles alternate user/assistant/... and that the contents have the right types."""
    messages = _messages_of(conversation)
    if not messages:
        raise PicochatError("conversation: it has no messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PicochatError(f'conversation: message {index} must be an object with "role" and "content"')
    turns = [(index, message["role"], message["content"]) for index, message in enumerate(messages)]
    if turns[0][1] == "system":
        system = turns[0][2]
        if not isinstance(system, str):
            raise PicochatError(
                f"conversation: message 0 (system) content must be a string, got {type(system).__name__}"
            )
        if len(turns) < 2 or turns[1][1] != "user":
            found = repr(turns[1][1]) if len(turns) > 1 else "nothing"
            raise PicochatError(f"conversation: message 1 must be a user message after the system message, got {found}")
        if not isinstance(turns[1][2], str):
            raise PicochatError("conversation: message 1 (user) content must be a string")
        turns = [(1, "user", system + SYSTEM_JOINER + turns[1][2]), *turns[2:]]
    for position, (index, role, content) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            previous = f"after a {turns[position - 1][1]} message" if position else "first"
            raise PicochatError(
                f"conversation: message {index} has role {role!r} but {expected!r} was expected {previous} "
                "(roles must alternate user, assistant, ..., with an optional leading system message)"
            )
        if role == "user" and not isinstance(content, str):
            raise PicochatError(f"conversation: message {index} (user) content must be a string")
        if role == "assistant" and not isinstance(content, (str, list)):
            raise PicochatError(
                f"conversation: message {index} (assistant) content must be a string or a list of parts, "
                f"got {type(content).__name__}"
            )
    return turns


def _check_part(part: Any, message_index: int, part_index: int) -> tuple[str, str]:
    where = f"conversation: message {message_index} part {part_index}"
    if not isinstance(part, dict):
        raise PicochatError(f'{where}: expected an object {{"type", "text"}}, got {type(part).__name__}')
    kind, text = part.get("type"), part.get("text")
    if kind not in ("text", "python", "python_output"):
        raise PicochatError(f'{where}: unknown part type {kind!r}; expected "text", "python" or "python_output"')
    if not isinstance(text, str):
        raise PicochatError(f'{where}: "text" must be a string')
    return kind, text
