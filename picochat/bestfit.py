"""One packing stream: documents in, rows out, by the best-fit rule of picochat/packing.py's docstring.

A stream keeps its documents in a LengthSortedBuffer, so that "the largest document that fits" and "the shortest
document" are binary searches. PretrainingStream fills rows exactly, cropping when nothing fits; SFTStream packs
whole conversations and pads the rest of a row with BOS. Each stream counts what packing did (PackingStats) and
saves / restores its buffer as flat numpy arrays (safetensors-friendly). Which stream gets which document, and
how streams make micro-batches on ranks, is picochat/packing.py's part.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from picochat.common import PicochatError

# English averages ~4-5 characters per token, so the first 8 x (T+2) characters of a document nearly always hold
# more tokens than a row (see tokenize_documents).
HEAD_CHARACTERS_PER_TOKEN = 8


@dataclass
class PackingStats:
    """What packing did to the data. "documents" are text documents (pretraining) or conversations (SFT)."""

    rows: int = 0  # rows emitted
    row_tokens: int = 0  # rows x (T+1): every slot of every row emitted
    documents_read: int = 0  # documents tokenized and handed to a stream
    tokens_read: int = 0  # their tokens, BOS included
    tokens_cropped: int = 0  # pretraining: tokens thrown away by cropping
    characters_skipped: int = 0  # pretraining: text at the end of documents longer than a row, never tokenized
    padding_tokens: int = 0  # SFT: BOS padding at the end of rows (pretraining never pads)
    supervised_targets: int = 0  # SFT: targets that carry a loss (mask 1)
    documents_truncated: int = 0  # SFT: conversations longer than a row, cut to the row
    documents_dropped: int = 0  # SFT: conversations left without a supervised token (never packed)

    @property
    def crop_fraction(self) -> float:
        """Discarded tokens / tokens read (tokens still buffered count as read, not as discarded)."""
        return self.tokens_cropped / self.tokens_read if self.tokens_read else 0.0

    @property
    def utilisation(self) -> float:
        """Fraction of row slots holding real tokens rather than padding (1.0 for pretraining)."""
        return 1.0 - self.padding_tokens / self.row_tokens if self.row_tokens else 1.0

    def add(self, other: PackingStats) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def counters(self) -> dict[str, int]:
        return dict(vars(self))  # (dataclasses.asdict deep-copies: ~10x slower, and this runs for every batch)

    def to_dict(self) -> dict[str, Any]:
        return {**self.counters(), "crop_fraction": self.crop_fraction, "utilisation": self.utilisation}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PackingStats:
        return cls(**{field.name: int(values[field.name]) for field in fields(cls)})


# ----------------------------------------------------------------------------------------------------------
# The best-fit buffer


class LengthSortedBuffer:
    """Documents kept in increasing order of length, so best-fit picks are binary searches.

    `lengths` is the sorted list of lengths and `items` the documents in the same order. Documents of equal length
    stay in arrival order and the oldest is taken first, so every choice is deterministic.
    """

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.items: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Any, length: int) -> None:
        index = bisect.bisect_right(self.lengths, length)  # after the documents of the same length
        self.lengths.insert(index, length)
        self.items.insert(index, item)

    def pop_largest_fitting(self, space: int) -> Any | None:
        """The longest document with length <= space (the oldest of that length), or None if none fits."""
        end = bisect.bisect_right(self.lengths, space)
        if end == 0:
            return None
        index = bisect.bisect_left(self.lengths, self.lengths[end - 1], 0, end)
        del self.lengths[index]
        return self.items.pop(index)

    def pop_shortest(self) -> Any:
        del self.lengths[0]
        return self.items.pop(0)


def _flatten(arrays: list[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list of 1-D arrays as (flat concatenation, lengths): the form the state stores them in."""
    lengths = np.fromiter(map(len, arrays), dtype=np.int32, count=len(arrays))
    return (np.concatenate(arrays, dtype=dtype) if arrays else np.zeros(0, dtype=dtype)), lengths


def _unflatten(flat: Any, lengths: Any, dtype: type) -> list[np.ndarray]:
    flat, lengths = np.asarray(flat, dtype=dtype), np.asarray(lengths, dtype=np.int64)
    if lengths.sum() != len(flat):
        raise ValueError(f"{len(flat)} stored tokens but the lengths add up to {lengths.sum()}")
    # Copies, so that one stream's documents do not keep the whole stored array alive.
    return [piece.copy() for piece in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []


# ----------------------------------------------------------------------------------------------------------
# Pretraining: one stream, best-fit with cropping


class PretrainingStream:
    """One stream of documents (token arrays, BOS first) packed into rows of exactly T+1 tokens, no padding.

    A document longer than a row never fits, so it is only ever cropped, once, and at most T+1 of its tokens are
    used: the stream keeps only its first T+2 tokens (one more than a row, so it still never fits). Memory and
    saved state stay bounded however long the documents (a book is ~300K tokens). The rows are the same as with
    whole documents, except that all documents longer than a row count as equally long: when one of them has to
    be cropped, it is the oldest rather than the shortest.
    """

    def __init__(self, stream: int, buffer_size: int, row_capacity: int) -> None:
        self.stream = stream
        self.buffer_size = buffer_size
        self.row_capacity = row_capacity
        self.buffer = LengthSortedBuffer()
        self.queue: deque[np.ndarray] = deque()  # received, not yet taken into the buffer
        # Every document of this stream with a smaller global index has been received (so a reader resuming with
        # a different number of ranks knows what not to hand over again).
        self.next_document_index = 0
        self.stats = PackingStats()

    def receive(self, document: np.ndarray, index: int, characters_skipped: int = 0) -> None:
        """Take the tokens of document number `index` (characters_skipped: its text left untokenized)."""
        self.stats.documents_read += 1
        self.stats.tokens_read += len(document)
        self.stats.characters_skipped += characters_skipped
        if len(document) > self.row_capacity + 1:
            self.stats.tokens_cropped += len(document) - (self.row_capacity + 1)  # can never be used
            document = document[: self.row_capacity + 1].copy()
        self.queue.append(document)
        self.next_document_index = index + 1

    def fill_row(self, row: np.ndarray, read_more: Callable[[], bool]) -> bool:
        """Fill `row` completely. read_more() asks the reader for documents when the queue is empty (False: there
        are none left). Returns False if the documents ran out first (the row is then incomplete)."""
        capacity, position = len(row), 0
        while position < capacity:
            while len(self.buffer) < self.buffer_size and (self.queue or read_more()):
                if self.queue:
                    document = self.queue.popleft()
                    self.buffer.add(document, len(document))
            if not self.buffer:
                return False
            space = capacity - position
            document = self.buffer.pop_largest_fitting(space)
            if document is None:  # nothing fits: crop the shortest document to the space left, drop its rest
                document = self.buffer.pop_shortest()
                row[position:] = document[:space]
                self.stats.tokens_cropped += len(document) - space
                position = capacity
            else:
                row[position : position + len(document)] = document
                position += len(document)
        self.stats.rows += 1
        self.stats.row_tokens += capacity
        return True

    def state_dict(self) -> dict[str, Any]:
        tokens, lengths = _flatten([*self.buffer.items, *self.queue], np.int32)  # one copy per stream and batch
        return {
            "stream": self.stream,
            "next_document_index": self.next_document_index,
            "stats": self.stats.counters(),
            "tokens": tokens,
            "lengths": lengths,
            "buffered": len(self.buffer),
        }  # the first `buffered` documents are the buffer, the rest the queue

    def load_state_dict(self, state: dict[str, Any]) -> None:
        documents = _unflatten(state["tokens"], state["lengths"], np.int32)
        buffered = int(state["buffered"])
        self.buffer = LengthSortedBuffer()
        for document in documents[:buffered]:  # stored in sorted order, ties included: re-adding rebuilds it exactly
            self.buffer.add(document, len(document))
        self.queue = deque(documents[buffered:])
        self.next_document_index = int(state["next_document_index"])
        self.stats = PackingStats.from_dict(state["stats"])


def tokenize_documents(
    tokenizer: Any, texts: list[str], row_capacity: int, num_threads: int = 1
) -> list[tuple[np.ndarray, int]]:
    """(token ids with BOS first, characters left untokenized) for each text.

    A document longer than a row is only ever cropped to at most a row, so tokenizing all of it (a whole book)
    would be wasted work: only its head is tokenized. If the head turns out to fit in a row after all (an unusually
    dense text), the whole document is tokenized, so whether a document fits is always decided exactly.
    """
    head_characters = HEAD_CHARACTERS_PER_TOKEN * (row_capacity + 1)
    heads = [text[:head_characters] for text in texts]
    token_lists = _encode_with_bos(tokenizer, heads, num_threads)
    redo = [k for k, ids in enumerate(token_lists) if len(texts[k]) > head_characters and len(ids) <= row_capacity + 1]
    for k, ids in zip(redo, _encode_with_bos(tokenizer, [texts[k] for k in redo], num_threads)):
        token_lists[k], heads[k] = ids, texts[k]
    return [
        (np.array(ids, dtype=np.int32), len(text) - len(head)) for ids, text, head in zip(token_lists, texts, heads)
    ]


def _encode_with_bos(tokenizer: Any, texts: list[str], num_threads: int) -> list[list[int]]:
    """Tokenizer.encode of each text with BOS prepended, on num_threads threads, one contiguous slice per thread.

    (Tokenizer.encode(list) hands every text to its thread pool separately; that round trip costs about as much as
    encoding a short document, and one task per thread measured ~1.7x faster on 2 cores. tiktoken releases the
    GIL while it encodes, so the threads do run in parallel.)"""

    def encode_slice(part: list[str]) -> list[list[int]]:
        return [tokenizer.encode(text, prepend=tokenizer.bos_token_id) for text in part]

    if num_threads == 1 or len(texts) < 2 * num_threads:
        return encode_slice(texts)
    size = -(-len(texts) // num_threads)
    with ThreadPoolExecutor(num_threads) as pool:
        return [
            ids
            for part in pool.map(encode_slice, [texts[i : i + size] for i in range(0, len(texts), size)])
            for ids in part
        ]


# ----------------------------------------------------------------------------------------------------------
# SFT: one stream, best-fit of whole conversations with BOS padding


class SFTStream:
    """One stream of rendered conversations packed whole into rows of T+1 tokens, the rest padded with BOS.

    The stream reads its conversations straight from the sequence, global index g = s, s+S, s+2S, ... (conversation
    g % num_conversations, over epochs), so it shares no reader with other streams. render(position) returns the
    (ids int32, mask uint8, truncated) of conversation `position`, cut to one row.
    """

    def __init__(
        self,
        stream: int,
        num_streams: int,
        buffer_size: int,
        render: Callable,
        num_conversations: int,
        loop: bool,
        bos: int,
    ) -> None:
        self.stream, self.num_streams, self.buffer_size = stream, num_streams, buffer_size
        self.render, self.num_conversations, self.loop, self.bos = render, num_conversations, loop, bos
        self.buffer = LengthSortedBuffer()  # items: (ids, mask)
        self.next_index = stream
        self.stats = PackingStats()
        self.drops_in_a_row = 0

    def _top_up(self) -> None:
        while len(self.buffer) < self.buffer_size and (self.loop or self.next_index < self.num_conversations):
            position = self.next_index % self.num_conversations
            ids, mask, truncated = self.render(position)
            self.next_index += self.num_streams
            self.stats.documents_read += 1
            self.stats.tokens_read += len(ids)
            self.stats.documents_truncated += int(truncated)
            # A conversation's first token is not a target when it starts a row, so it needs a supervised token
            # after its first. Without one it could only make all-padding rows (loss 0/0 = NaN, the reference's
            # bug A.25 #1) or clog the buffer: drop it, and count it.
            if mask[1:].any():
                self.buffer.add((ids, mask), len(ids))
                self.drops_in_a_row = 0
                continue
            self.stats.documents_dropped += 1
            self.drops_in_a_row += 1
            if self.drops_in_a_row > self.num_conversations:  # a whole cycle of this stream's share, all dropped
                raise PicochatError(
                    f"conversations: none of the conversations packing stream {self.stream} reads (e.g. conversation "
                    f"{position}) has a supervised token within a row of {len(ids)} tokens; use a longer seq_len"
                )

    def fill_row(self, ids_row: np.ndarray, mask_row: np.ndarray) -> bool:
        """Fill one row with whole conversations, then BOS padding. False if no conversation is left."""
        capacity, position = len(ids_row), 0
        while True:
            self._top_up()
            item = self.buffer.pop_largest_fitting(capacity - position)
            if item is None:
                break
            ids, mask = item
            ids_row[position : position + len(ids)] = ids
            mask_row[position : position + len(ids)] = mask
            position += len(ids)
        if position == 0:
            return False  # every conversation fits an empty row, so an empty row means none is left
        ids_row[position:] = self.bos
        mask_row[position:] = 0
        self.stats.rows += 1
        self.stats.row_tokens += capacity
        self.stats.padding_tokens += capacity - position
        self.stats.supervised_targets += int(mask_row[1:].sum())
        return True

    def state_dict(self) -> dict[str, Any]:
        ids, lengths = _flatten([ids for ids, _ in self.buffer.items], np.int32)
        mask, _ = _flatten([mask for _, mask in self.buffer.items], np.uint8)
        return {
            "stream": self.stream,
            "next_index": self.next_index,
            "stats": self.stats.counters(),
            "tokens": ids,
            "mask": mask,
            "lengths": lengths,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        all_ids = _unflatten(state["tokens"], state["lengths"], np.int32)
        all_masks = _unflatten(state["mask"], state["lengths"], np.uint8)
        self.buffer = LengthSortedBuffer()
        for ids, mask in zip(all_ids, all_masks):
            self.buffer.add((ids, mask), len(ids))
        self.next_index = int(state["next_index"])
        self.stats = PackingStats.from_dict(state["stats"])
