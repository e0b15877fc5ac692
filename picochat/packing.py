"""Documents -> (B, T) training rows: BOS-aligned best-fit packing, for pretraining (crop) and SFT (pad).

A row holds T+1 tokens: the model reads row[:-1] and is trained to predict row[1:]. Every row starts with BOS,
because BOS is prepended to every document and every row starts with a (piece of a) document. A row is filled from
a buffer of documents kept sorted by length, by the best-fit rule:

    repeat: take the LARGEST buffered document that fits entirely in the space left in the row
    pretraining, when none fits: crop the SHORTEST buffered document to fill the row exactly (its rest is
                                 discarded) -> every slot holds a real token, some tokens are thrown away
    SFT, when none fits:         pad the rest of the row with BOS, targets -1 there (no loss); a conversation is
                                 never split across rows

Largest-that-fits places the big pieces first and leaves small gaps for small pieces; cropping the shortest
wastes the fewest tokens. With a sorted buffer both picks are a binary search (bisect), not a scan. One stream's
packing (the buffer, the pretraining and SFT streams, their counters and state) is picochat/bestfit.py.

Streams: what makes exact resume possible on a different number of ranks
    An optimizer step consumes S rows ("num_streams" = batch_size x world_size). Stream s receives the documents
    whose global index i has i % S == s, packs them with its own buffer and emits one row per step, so what stream
    s emits depends on s and the data only. Rank r owns the streams s with s % world_size == r (in increasing
    order), and each of its batches is one row of each of them. Gradient accumulation is not the loader's business:
    the trainer makes one loader per micro-step, each a rank of world_size x accumulation "virtual ranks"
    (trainer.py), so the rows of a step are the same for (1 rank, 2 micro-steps) and (2 ranks, 1 micro-step). A
    rank's streams need exactly the documents data.iter_documents(rank=r, world_size=world_size) reads.
    A stream takes documents into its buffer only when it needs them (before each pick, up to buffer_size); what
    the rank reads for its other streams waits in their own queues. So a stream's buffer depends only on its own
    documents and its own history, never on which other streams share its rank.

State
    With each batch comes a dict: everything needed to continue exactly after that batch -- where the document
    reader is, each stream's buffered and queued documents (numpy int32 arrays, flat tokens + lengths, for
    safetensors) and counters (plain JSON values). Pass it back as `state=` to resume; merge_loader_states
    combines the states of all ranks into one that any number of ranks can resume from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from picochat.bestfit import PackingStats, PretrainingStream, SFTStream, tokenize_documents
from picochat.common import PicochatError
from picochat.data import Cursor, TextFormat, find_text_files, iter_documents

# The reference buffers ~1,000 documents (pretraining) and 100 conversations (SFT) per rank. Here every stream has
# its own buffer: the default splits that budget over the streams of an optimizer step, with a floor so a stream
# always has enough candidates for a good fit. It depends on num_streams only, never on the number of ranks,
# because a different buffer size packs different rows.
PRETRAINING_BUFFER_DOCUMENTS, PRETRAINING_MIN_BUFFER = 1000, 64
SFT_BUFFER_CONVERSATIONS, SFT_MIN_BUFFER = 100, 16
PRETRAINING_FORMAT, SFT_FORMAT = "picochat-pretraining-loader", "picochat-sft-loader"


# ----------------------------------------------------------------------------------------------------------
# Streams over ranks; arguments; state


def owned_streams(rank: int, world_size: int, num_streams: int) -> list[int]:
    """The streams rank `rank` packs, in row order: s = rank, rank + world_size, ..."""
    return list(range(rank, num_streams, world_size))


def _check_positive_int(name: str, value: Any, example: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PicochatError(f"{name} must be a positive integer{example}, got {value!r}")
    return value


def _check_layout(
    batch_size: Any,
    seq_len: Any,
    rank: Any,
    world_size: Any,
    num_streams: Any,
    buffer_size: Any,
    default_buffer: tuple[int, int],
) -> tuple[int, int]:
    """Validate the shape arguments; returns (num_streams, buffer_size) with their defaults filled in."""
    _check_positive_int("batch_size", batch_size, " (rows per batch, e.g. 32)")
    _check_positive_int("seq_len", seq_len, " (tokens per row, e.g. 2048)")
    _check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise PicochatError(f"rank must be an integer in 0..{world_size - 1} (world_size={world_size}), got {rank!r}")
    unit = batch_size * world_size  # rows of one batch on every rank: one row of every stream
    num_streams = unit if num_streams is None else num_streams
    if num_streams != unit:
        # One accumulation story: the trainer runs a loader per micro-step, as a virtual rank (see trainer.py).
        raise PicochatError(
            f"num_streams={num_streams} (rows per optimizer step) must be batch_size x world_size = "
            f"{batch_size} x {world_size} = {unit}; to accumulate, make one loader per micro-step "
            "with world_size x accumulation ranks"
        )
    budget, floor = default_buffer
    buffer_size = max(floor, budget // num_streams) if buffer_size is None else buffer_size
    _check_positive_int("buffer_size", buffer_size, " (documents buffered per stream)")
    return num_streams, buffer_size


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise PicochatError(f"device {device!r}: expected a torch device such as 'cpu' or 'cuda:0'") from None


def _to_device(inputs: np.ndarray, targets: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as int64 tensors on `device`. Both go in one staging tensor, so a GPU gets them in a
    single copy; the staging memory is pinned, so that copy is asynchronous (the next batch is packed while it
    runs). The staging tensor is fresh each time (the caching host allocator makes that cheap, and waits for the
    copy before reusing the memory), so a batch is never overwritten by a later one."""
    staging = torch.empty((2, *inputs.shape), dtype=torch.int64, pin_memory=device.type == "cuda")
    staging[0].copy_(torch.from_numpy(inputs))
    staging[1].copy_(torch.from_numpy(targets))
    if device.type != "cpu":
        staging = staging.to(device, non_blocking=device.type == "cuda")
    return staging[0], staging[1]


def _batches(
    streams: list, make_batch: Callable, header: dict[str, Any], more_state: Callable[[], dict[str, Any]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """The loop both loaders share: a batch is one row of each of this rank's streams, and comes with the state to
    continue exactly after it. Ends when make_batch finds no data left (None)."""
    while True:
        batch = make_batch(streams)
        if batch is None:
            return
        stats = PackingStats()
        for stream in streams:
            stats.add(stream.stats)
        state = {**header, **more_state(), "streams": [s.state_dict() for s in streams], "stats": stats.to_dict()}
        yield batch[0], batch[1], state


def _restore(state: Any, header: dict[str, Any], streams: list) -> None:
    """Load the streams from a state saved by a loader of the same kind and shape (any other would silently pack
    differently)."""
    if not isinstance(state, dict) or not isinstance(state.get("streams"), list):
        raise PicochatError("loader state: expected the state dict yielded by the loader (with a 'streams' list)")
    for key, value in header.items():
        if state.get(key) != value:
            raise PicochatError(
                f"loader state: it was saved with {key}={state.get(key)!r} but this loader has "
                f"{key}={value!r}; resume with the same {key} (or start without the state)"
            )
    try:
        saved = {int(entry["stream"]): entry for entry in state["streams"]}
    except (KeyError, TypeError, ValueError):
        raise PicochatError("loader state: every entry of 'streams' needs a 'stream' number") from None
    for stream in streams:
        if stream.stream not in saved:
            raise PicochatError(
                f"loader state: no entry for stream {stream.stream} (the state of one rank of a multi-rank run "
                f"only holds that rank's streams; combine all ranks' states with merge_loader_states)"
            )
        try:
            stream.load_state_dict(saved[stream.stream])
        except (KeyError, TypeError, ValueError) as error:
            raise PicochatError(f"loader state: stream {stream.stream} is malformed ({error!r})") from None
    rows = {stream.stats.rows for stream in streams}
    if len(rows) > 1:
        raise PicochatError(f"loader state: stream row counts {sorted(rows)} differ (not saved between two batches)")


def merge_loader_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state holding every stream, from the states of all ranks at the same step. Any rank of any world size
    can resume from it, as long as num_streams stays the same: streams, not ranks, carry the packing state."""
    if not states:
        raise PicochatError("merge_loader_states: no states given")
    merged = {key: value for key, value in states[0].items() if key not in ("streams", "readers", "stats")}
    merged["streams"] = sorted((entry for state in states for entry in state["streams"]), key=lambda e: e["stream"])
    if "readers" in states[0]:
        merged["readers"] = [reader for state in states for reader in state["readers"]]
    stats = PackingStats()
    for entry in merged["streams"]:
        stats.add(PackingStats.from_dict(entry["stats"]))
    merged["stats"] = stats.to_dict()
    return merged


# ----------------------------------------------------------------------------------------------------------
# The two loaders


def pretraining_batches(
    files: Sequence[str | os.PathLike],
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_streams: int | None = None,
    text_format: TextFormat | None = None,
    state: dict[str, Any] | None = None,
    buffer_size: int | None = None,
    loop: bool = True,
    tokenizer_threads: int | None = None,
    tokenizer_batch_size: int = 256,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Pretraining batches (inputs, targets, state): int64 (batch_size, seq_len) tensors on `device`.

    files: text files or folders (data.find_text_files). Rows are BOS-aligned best-fit packed with cropping: no
    padding, every row starts with BOS. One batch per optimizer step (see the module docstring). loop=False: stop
    when the documents run out. state: one yielded earlier (or merge_loader_states of all ranks' states), to
    continue exactly. tokenizer_threads (default min(4, cpus)) tokenize tokenizer_batch_size documents at a time.
    """
    num_streams, buffer_size = _check_layout(
        batch_size,
        seq_len,
        rank,
        world_size,
        num_streams,
        buffer_size,
        (PRETRAINING_BUFFER_DOCUMENTS, PRETRAINING_MIN_BUFFER),
    )
    tokenizer_threads = _check_positive_int("tokenizer_threads", tokenizer_threads or min(4, os.cpu_count() or 1))
    _check_positive_int("tokenizer_batch_size", tokenizer_batch_size)
    paths, text_format, device = find_text_files(files), text_format or TextFormat(), _device(device)
    row_capacity = seq_len + 1
    streams = [PretrainingStream(s, buffer_size, row_capacity) for s in owned_streams(rank, world_size, num_streams)]
    by_id = {stream.stream: stream for stream in streams}
    header = {
        "format": PRETRAINING_FORMAT,
        "version": 1,
        "num_streams": num_streams,
        "seq_len": seq_len,
        "buffer_size": buffer_size,
    }
    cursor = None
    if state is not None:
        _restore(state, header, streams)
        cursor = _resume_cursor(state.get("readers", []), rank, world_size)
    documents: Iterator[tuple[str, Cursor]] | None = None  # opened at the first read: no work before

    def read_more() -> bool:
        """Read this rank's next documents (global index i = rank, rank + world_size, ...), tokenize them, hand
        each to its stream (i % num_streams). False when there are none left."""
        nonlocal documents, cursor
        if documents is None:
            start = Cursor.from_dict(cursor) if cursor else None
            documents = iter_documents(
                paths, text_format=text_format, start=start, rank=rank, world_size=world_size, loop=loop
            )
        texts, indices, last = [], [], None
        for text, last in documents:
            index = last.document_index - 1  # the cursor after a document counts the documents up to it
            # Resuming on another number of ranks starts a little early: skip what the stream already received.
            if index >= by_id[index % num_streams].next_document_index:
                texts.append(text)
                indices.append(index)
                if len(texts) == tokenizer_batch_size:
                    break
        if last is not None:
            cursor = last.to_dict()
        for index, (ids, skipped) in zip(
            indices, tokenize_documents(tokenizer, texts, row_capacity, tokenizer_threads)
        ):
            by_id[index % num_streams].receive(ids, index, skipped)
        return bool(texts)

    rows = np.empty((batch_size, row_capacity), dtype=np.int32)  # reused: each batch is copied out of it

    def make_batch(batch_streams: list[PretrainingStream]) -> tuple[torch.Tensor, torch.Tensor] | None:
        for row, stream in zip(rows, batch_streams):
            if not stream.fill_row(row, read_more):
                return None
        return _to_device(rows[:, :-1], rows[:, 1:], device)

    def reader_state() -> dict[str, Any]:
        return {"readers": [{"rank": rank, "world_size": world_size, "cursor": cursor}]}

    return _batches(streams, make_batch, header, reader_state)


def _resume_cursor(readers: list[dict[str, Any]], rank: int, world_size: int) -> dict | None:
    """Where this rank's reader restarts. Same ranks as when saved: exactly where it stopped. Otherwise: at the
    earliest saved position (every stream has received all its documents before it; the reader then skips what
    the streams already have)."""
    for reader in readers:
        if reader.get("rank") == rank and reader.get("world_size") == world_size:
            return reader.get("cursor")
    cursors = [reader.get("cursor") for reader in readers]
    if not cursors or any(cursor is None for cursor in cursors):
        return None
    return min(cursors, key=lambda cursor: int(cursor["document_index"]))


def sft_batches(
    conversations: Sequence[Any],
    tokenizer: Any,
    batch_size: int,
    seq_len: int,
    *,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_streams: int | None = None,
    state: dict[str, Any] | None = None,
    buffer_size: int | None = None,
    loop: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """SFT batches (inputs, targets, state): int64 (batch_size, seq_len) tensors on `device`; targets are -1
    where there is no loss (render mask 0, and BOS padding).

    conversations: an indexable sequence in a fixed order, each rendered by tokenizer.render_conversation with
    max_tokens = seq_len + 1 (a longer one is cut to the row; one left without a supervised token is dropped and
    counted). Whole conversations are best-fit into rows, the rest of a row is BOS padding. loop=False: one pass,
    ending when one of this rank's streams runs out (the trainer should all-reduce "done" so ranks stop together).
    """
    num_streams, buffer_size = _check_layout(
        batch_size, seq_len, rank, world_size, num_streams, buffer_size, (SFT_BUFFER_CONVERSATIONS, SFT_MIN_BUFFER)
    )
    if (
        isinstance(conversations, (str, bytes, dict))
        or not hasattr(conversations, "__getitem__")
        or not hasattr(conversations, "__len__")
    ):
        raise PicochatError(
            f"conversations must be an indexable sequence (a list, a task), got {type(conversations).__name__}"
        )
    if len(conversations) == 0:
        raise PicochatError("conversations: the sequence is empty, there is nothing to train on")
    num_conversations, row_capacity, device = len(conversations), seq_len + 1, _device(device)

    def render(position: int) -> tuple[np.ndarray, np.ndarray, bool]:
        try:  # one token more than a row holds, only to learn whether the conversation was cut
            ids, mask = tokenizer.render_conversation(conversations[position], max_tokens=row_capacity + 1)
        except PicochatError as error:
            raise PicochatError(f"conversation {position}: {error}") from None
        return (
            np.array(ids[:row_capacity], dtype=np.int32),
            np.array(mask[:row_capacity], dtype=np.uint8),
            len(ids) > row_capacity,
        )

    streams = [
        SFTStream(s, num_streams, buffer_size, render, num_conversations, loop, tokenizer.bos_token_id)
        for s in owned_streams(rank, world_size, num_streams)
    ]
    header = {
        "format": SFT_FORMAT,
        "version": 1,
        "num_streams": num_streams,
        "seq_len": seq_len,
        "buffer_size": buffer_size,
        "num_conversations": num_conversations,
    }
    if state is not None:
        _restore(state, header, streams)
    ids = np.empty((batch_size, row_capacity), dtype=np.int32)  # reused: each batch is copied out of it
    mask = np.empty((batch_size, row_capacity), dtype=np.uint8)

    def make_batch(batch_streams: list[SFTStream]) -> tuple[torch.Tensor, torch.Tensor] | None:
        for j, stream in enumerate(batch_streams):
            if not stream.fill_row(ids[j], mask[j]):
                return None
        # Target t is the token at t+1, kept only where that token is supervised (padding has mask 0 too).
        return _to_device(ids[:, :-1], np.where(mask[:, 1:] == 1, ids[:, 1:], -1), device)

    def epoch() -> dict[str, Any]:
        return {"epoch": min(stream.next_index for stream in streams) // num_conversations}

    return _batches(streams, make_batch, header, epoch)
