"""Packing documents into rows: best-fit with cropping (pretraining), with padding (SFT), streams, exact resume."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import numpy as np
import pytest
import tiktoken.load
import torch

from picochat.bestfit import PackingStats, PretrainingStream, tokenize_documents
from picochat.common import PicochatError
from picochat.packing import merge_loader_states, owned_streams, pretraining_batches, sft_batches
from picochat.tokenizer import Tokenizer

BOS = 1000  # the BOS of the hand-made documents below
# GPT-2's split pattern (shared/data/README.md): the real tokenizer of these tests is GPT-2's ranks.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="session")
def tokenizer(data_dir) -> Tokenizer:
    ranks = tiktoken.load.load_tiktoken_bpe(str(data_dir / "tokenizers" / "gpt2.tiktoken"))
    return Tokenizer(ranks, pattern=GPT2_PATTERN)


@pytest.fixture(scope="session")
def wiki_shard(data_dir):
    return [data_dir / "pretrain" / "wikipedia_en" / "shard_00000.parquet"]


@pytest.fixture(scope="session")
def identity_conversations(data_dir) -> list:
    lines = (data_dir / "identity" / "identity_conversations.jsonl").read_text(encoding="utf-8").splitlines()
    # A few conversations end on a user turn (README): drop that turn, as a task adapter would.
    conversations = []
    for line in lines[:400]:
        messages = json.loads(line)
        conversations.append(messages[:-1] if messages[-1]["role"] == "user" else messages)
    return conversations


def random_documents(count: int, seed: int, max_length: int = 40) -> list[list[int]]:
    """BOS + 0..max_length-1 tokens; every token of a document is the document's number, so rows can be read."""
    rng = random.Random(seed)
    return [[BOS] + [number] * rng.randrange(max_length) for number in range(count)]


def take(iterator: Iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def pack_documents(documents: list[list[int]], capacity: int, buffer_size: int) -> Iterator[np.ndarray]:
    """Rows from one PretrainingStream fed from a plain list of token lists."""
    stream = PretrainingStream(0, buffer_size, capacity)
    feed = iter(enumerate(documents))

    def read_more() -> bool:
        for index, document in feed:
            stream.receive(np.array(document, dtype=np.int32), index)
            return True
        return False

    row = np.empty(capacity, dtype=np.int32)
    while stream.fill_row(row, read_more):
        yield row.copy()


# ----------------------------------------------------------------------------------------------------------
# The best-fit rule on plain token lists


def test_best_fit_takes_the_largest_document_that_fits_then_crops_the_shortest():
    documents = [[BOS, 1, 1, 1, 1], [BOS, 2, 2], [BOS] + [3] * 7, [BOS] + [4] * 9]
    # Buffer of 3: lengths 5, 3, 8. Row of 10: 8 fits and is the largest; 2 left, nothing fits (3, 5), so the
    # shortest (3) is cropped to 2 and its last token is discarded.
    stream = PretrainingStream(0, buffer_size=3, row_capacity=10)
    feed = iter(documents)

    def read_more() -> bool:
        for index, document in enumerate(feed):
            stream.receive(np.array(document, dtype=np.int32), index)
            return True
        return False

    row = np.empty(10, dtype=np.int32)
    assert stream.fill_row(row, read_more)
    assert row.tolist() == [BOS] + [3] * 7 + [BOS, 2]
    assert stream.stats.tokens_cropped == 1
    # Next row: the buffer is topped up with the 10-token document, which fills the row exactly (largest fit).
    assert stream.fill_row(row, read_more)
    assert row.tolist() == [BOS] + [4] * 9
    assert stream.stats.tokens_cropped == 1
    # What is left (5 tokens) cannot fill a row: the stream says it ran out.
    assert not stream.fill_row(row, read_more)


def reference_scan_packing(documents: list[list[int]], capacity: int, buffer_size: int) -> list[list[int]]:
    """The same rule written the slow, obvious way: an unsorted buffer scanned for every pick. A document longer
    than a row is kept as its first capacity + 1 tokens: all such documents count as equally long."""
    source = iter(document[: capacity + 1] for document in documents)
    buffer: list[list[int]] = []  # arrival order
    rows = []
    while True:
        row: list[int] = []
        while len(row) < capacity:
            for document in source:
                buffer.append(document)
                if len(buffer) == buffer_size:
                    break
            if not buffer:
                return rows
            space = capacity - len(row)
            fitting = [d for d in buffer if len(d) <= space]
            if fitting:
                longest = max(len(d) for d in fitting)
                choice = next(d for d in buffer if len(d) == longest)  # the oldest of that length
                row += choice
            else:
                shortest = min(len(d) for d in buffer)
                choice = next(d for d in buffer if len(d) == shortest)
                row += choice[:space]
            buffer.remove(choice)
        rows.append(row)


@pytest.mark.parametrize("capacity,buffer_size", [(33, 8), (65, 1), (17, 50)])
def test_sorted_buffer_makes_the_same_choices_as_a_scan(capacity, buffer_size):
    documents = random_documents(600, seed=capacity)
    rows = [row.tolist() for row in pack_documents(documents, capacity, buffer_size)]
    assert rows == reference_scan_packing(documents, capacity, buffer_size)
    assert len(rows) > 50


def test_rows_are_full_start_with_bos_and_every_token_is_accounted_for():
    documents = random_documents(500, seed=7, max_length=60)
    capacity = 48
    stream = PretrainingStream(0, buffer_size=16, row_capacity=capacity)
    feed = iter(enumerate(documents))

    def read_more() -> bool:
        for index, document in feed:
            stream.receive(np.array(document, dtype=np.int32), index)
            return True
        return False

    row = np.empty(capacity, dtype=np.int32)
    while stream.fill_row(row, read_more):
        assert row[0] == BOS  # no padding token exists here: every slot is a document token
        stats = stream.stats
        buffered = sum(stream.buffer.lengths) + sum(len(d) for d in stream.queue)
        assert stats.tokens_read == stats.rows * capacity + stats.tokens_cropped + buffered
        # Every row is whole documents and (at most) one cropped document: a run of one number after each BOS.
        pieces = np.split(row, np.flatnonzero(row == BOS))[1:]
        assert all(len(set(piece[1:].tolist())) <= 1 for piece in pieces)
    assert stream.stats.rows > 100
    assert 0 < stream.stats.crop_fraction < 0.5
    assert stream.stats.utilisation == 1.0


# ----------------------------------------------------------------------------------------------------------
# The pretraining loader on real parquet


def test_pretraining_batches_are_shifted_rows_of_real_documents(tokenizer, wiki_shard):
    batches = take(pretraining_batches(wiki_shard, tokenizer, 4, 64), 5)
    bos = tokenizer.bos_token_id
    import pyarrow.parquet as pq

    texts = pq.ParquetFile(wiki_shard[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
    encoded = [[bos] + ids for ids in tokenizer.encode(texts)]
    for inputs, targets, _ in batches:
        assert inputs.shape == targets.shape == (4, 64)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # one row, read shifted by one
        assert (inputs[:, 0] == bos).all()
        assert (targets >= 0).all()  # no padding, no ignored target
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            # Split at BOS: every piece is a whole document or the start of one (a crop).
            starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
            for begin, end in zip(starts, starts[1:]):
                piece = row[begin:end]
                assert any(document[: len(piece)] == piece for document in encoded), "a row piece is no document"
    stats = batches[-1][2]["stats"]
    assert stats["rows"] == 20 and stats["utilisation"] == 1.0 and stats["padding_tokens"] == 0
    assert stats["crop_fraction"] == stats["tokens_cropped"] / stats["tokens_read"]


def test_documents_longer_than_a_row_are_tokenized_and_kept_only_at_their_head(tokenizer, data_dir, tmp_path):
    import pyarrow.parquet as pq

    book = pq.ParquetFile(data_dir / "pretrain/gutenberg_books/shard_00000.parquet").read_row_group(0)["text"][0]
    book = book.as_py()[:200_000]
    short = [f"Short note number {i}." for i in range(20)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in [book, *short]))
    seq_len = 40
    batches = list(pretraining_batches([path], tokenizer, 1, seq_len, loop=False, buffer_size=4))
    bos = tokenizer.bos_token_id
    whole_book = [bos] + tokenizer.encode(book)
    encoded = [whole_book] + [[bos] + ids for ids in tokenizer.encode(short)]
    book_pieces = 0
    for x, y, _ in batches:
        row = x[0].tolist() + [int(y[0, -1])]
        starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
        for begin, end in zip(starts, starts[1:]):
            piece = row[begin:end]
            assert any(document[: len(piece)] == piece for document in encoded)
            book_pieces += len(piece) > 1 and whole_book[: len(piece)] == piece
    assert book_pieces == 1  # the book's head, exactly as if the whole book had been tokenized
    stats = batches[-1][2]["stats"]
    head = 8 * (seq_len + 2)  # HEAD_CHARACTERS_PER_TOKEN x (row + 1)
    assert stats["characters_skipped"] == len(book) - head  # the rest of the book was never tokenized
    assert stats["tokens_read"] < len(whole_book) // 10
    for entry in batches[-1][2]["streams"]:  # never more than a row + 1 tokens kept per document
        assert entry["lengths"].max(initial=0) <= seq_len + 2


def test_only_the_head_of_a_long_text_is_tokenized_unless_it_might_fit(tokenizer, data_dir):
    import pyarrow.parquet as pq

    book = pq.ParquetFile(data_dir / "pretrain/gutenberg_books/shard_00000.parquet").read_row_group(0)["text"][0]
    book = book.as_py()[:50_000]
    dashes = "-" * 4000  # GPT-2 has 32-dash tokens: far fewer tokens per character than the head assumes
    capacity = 200
    (book_ids, book_skipped), (dash_ids, dash_skipped) = tokenize_documents(tokenizer, [book, dashes], capacity, 2)
    bos = tokenizer.bos_token_id
    head = 8 * (capacity + 1)
    assert book_skipped == len(book) - head and len(book_ids) > capacity + 1
    assert book_ids.tolist() == ([bos] + tokenizer.encode(book))[: len(book_ids)]
    assert dash_skipped == 0 and dash_ids.tolist() == [bos] + tokenizer.encode(dashes)  # fits: tokenized whole
    assert len(dash_ids) <= capacity + 1


def collect_rows_per_stream(
    loader_per_rank: list[Iterator], world_size: int, batch_size: int, num_streams: int, steps: int
) -> dict[int, list[list[int]]]:
    """Run each rank's loader for `steps` optimizer steps; return every stream's rows (inputs + last target)."""
    rows: dict[int, list[list[int]]] = {s: [] for s in range(num_streams)}
    for _ in range(steps):
        for rank, loader in enumerate(loader_per_rank):
            inputs, targets, _ = next(loader)
            for stream, x, y in zip(owned_streams(rank, world_size, num_streams), inputs, targets, strict=True):
                rows[stream].append(x.tolist() + [int(y[-1])])
    return rows


def test_pretraining_rows_of_a_step_do_not_depend_on_ranks(tokenizer, wiki_shard):
    # (The trainer accumulates with one loader per micro-step as a virtual rank: this covers accumulation too.)
    num_streams, seq_len, steps = 8, 32, 6
    results = []
    for world_size, batch_size in [(1, 8), (2, 4), (4, 2)]:
        loaders = [
            # Small tokenizer batches: many reads, so the streams' queues fill and drain unevenly.
            pretraining_batches(
                wiki_shard,
                tokenizer,
                batch_size,
                seq_len,
                rank=rank,
                world_size=world_size,
                num_streams=num_streams,
                buffer_size=8,
                tokenizer_batch_size=8,
            )
            for rank in range(world_size)
        ]
        results.append(collect_rows_per_stream(loaders, world_size, batch_size, num_streams, steps))
    assert results[0] == results[1] == results[2]
    assert len({tuple(rows[0]) for rows in results[0].values()}) == num_streams  # streams do differ


def as_checkpoint(state: dict) -> dict:
    """What a checkpoint does to a state: numpy arrays to safetensors, the rest through JSON."""
    arrays: dict[str, np.ndarray] = {}

    def strip(value, path):
        if isinstance(value, np.ndarray):
            assert value.dtype in (np.int32, np.uint8)
            arrays[path] = value.copy()
            return {"__array__": path}
        if isinstance(value, dict):
            return {key: strip(item, f"{path}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [strip(item, f"{path}.{i}") for i, item in enumerate(value)]
        return value

    def restore(value):
        if isinstance(value, dict):
            return arrays[value["__array__"]] if "__array__" in value else {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(item) for item in value]
        return value

    return restore(json.loads(json.dumps(strip(state, "state"))))


def test_pretraining_resume_continues_exactly(tokenizer, wiki_shard):
    def loader(state=None):
        return pretraining_batches(wiki_shard, tokenizer, 4, 48, buffer_size=16, state=state, tokenizer_batch_size=8)

    uninterrupted = take(loader(), 14)
    state = as_checkpoint(uninterrupted[2][2])
    resumed = take(loader(state), 11)
    for (x1, y1, s1), (x2, y2, s2) in zip(uninterrupted[3:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert s1["stats"] == s2["stats"] and s1["readers"] == s2["readers"]


def test_pretraining_resume_on_a_different_number_of_ranks(tokenizer, wiki_shard):
    num_streams, seq_len = 4, 32

    def loader(rank, world_size, batch_size, state=None):
        return pretraining_batches(
            wiki_shard,
            tokenizer,
            batch_size,
            seq_len,
            rank=rank,
            world_size=world_size,
            num_streams=num_streams,
            state=state,
            buffer_size=8,
            tokenizer_batch_size=8,
        )

    # Two ranks run 3 steps; their states are merged; one rank takes over.
    two_ranks = [loader(rank, 2, 2) for rank in range(2)]
    states = [take(two_ranks[rank], 3)[-1][2] for rank in range(2)]
    one_rank = loader(0, 1, 4, state=merge_loader_states([as_checkpoint(s) for s in states]))
    continued = collect_rows_per_stream([one_rank], 1, 4, num_streams, steps=20)
    reference = collect_rows_per_stream([loader(0, 1, 4)], 1, 4, num_streams, steps=23)
    assert continued == {s: rows[3:] for s, rows in reference.items()}


def test_pretraining_without_loop_stops_when_documents_run_out(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * (i % 7 + 1)}) + "\n" for i in range(60)))
    batches = list(pretraining_batches([path], tokenizer, 2, 16, loop=False, buffer_size=4))
    stats = batches[-1][2]["stats"]
    assert stats["documents_read"] == 60
    assert 0 < len(batches) * 2 * 17 <= stats["tokens_read"] - stats["tokens_cropped"]
    looping = take(pretraining_batches([path], tokenizer, 2, 16, buffer_size=4), len(batches) + 20)
    assert looping[-1][2]["readers"][0]["cursor"]["epoch"] >= 1  # loop=True goes on into the next epochs


# ----------------------------------------------------------------------------------------------------------
# SFT


class ListRenderer:
    """A stand-in tokenizer whose "conversations" are already (ids, mask) pairs, to test packing rules exactly."""

    bos_token_id = 0

    def render_conversation(self, conversation, max_tokens=2048):
        ids, mask = conversation
        return list(ids[:max_tokens]), list(mask[:max_tokens])


def conversation(number: int, length: int, supervised: slice) -> tuple[list[int], list[int]]:
    mask = np.zeros(length, dtype=int)
    mask[supervised] = 1
    return [0] + [number] * (length - 1), mask.tolist()


def test_sft_rows_hold_whole_conversations_with_masked_targets_and_bos_padding():
    rng = random.Random(3)
    conversations = [conversation(n, rng.randrange(3, 30), slice(rng.randrange(1, 3), None)) for n in range(1, 200)]
    seq_len = 40
    batches = list(sft_batches(conversations, ListRenderer(), 4, seq_len, loop=False, buffer_size=8))
    placed: list[int] = []
    for inputs, targets, _ in batches:
        for x, y in zip(inputs.tolist(), targets.tolist()):
            # The row's last token is only visible as the last target; conversations end supervised here.
            row = x + [y[-1] if y[-1] != -1 else 0]
            mask = [0] * len(row)
            position = 0
            while position < len(row) and row[position + 1 : position + 2] not in ([], [0]):
                number = row[position + 1]
                ids, conversation_mask = conversations[number - 1]
                assert row[position : position + len(ids)] == ids  # the whole conversation, in one row
                mask[position : position + len(ids)] = conversation_mask
                placed.append(number)
                position += len(ids)
            assert position > 0 and row[position:] == [0] * (len(row) - position)  # then only BOS padding
            assert y == [row[t + 1] if mask[t + 1] else -1 for t in range(seq_len)]
            assert any(target != -1 for target in y)
    assert sorted(placed) == sorted(set(placed)) and len(placed) > 150  # each conversation at most once
    stats = batches[-1][2]["stats"]
    assert stats["documents_dropped"] == 0 and stats["rows"] == 4 * len(batches)
    assert 0 < stats["utilisation"] < 1 and stats["padding_tokens"] > 0


def test_sft_truncates_long_conversations_and_drops_those_left_without_supervision():
    seq_len = 15  # rows of 16 tokens
    conversations = [
        conversation(1, 40, slice(2, 5)),  # too long, supervised early: cut to 16 tokens, kept
        conversation(2, 40, slice(30, 35)),  # too long, supervised only past the row: dropped
        conversation(3, 6, slice(0, 0)),  # nothing supervised at all: dropped
        conversation(4, 6, slice(0, 1)),  # only its first token: never a target at a row start, dropped
        conversation(5, 8, slice(3, 8)),
    ]
    batches = list(sft_batches(conversations, ListRenderer(), 1, seq_len, loop=False))
    stats = batches[-1][2]["stats"]
    assert stats["documents_read"] == 5 and stats["documents_truncated"] == 2 and stats["documents_dropped"] == 3
    assert [x[0].tolist() for x, _, _ in batches] == [[0] + [1] * 14, [0] + [5] * 7 + [0] * 7]
    assert all((y != -1).any() for _, y, _ in batches)


def test_sft_unplaceable_conversations_never_clog_the_buffer():
    # The reference's NaN bug: conversations longer than a row piled up in the buffer until every row was
    # padding. Here most conversations are long and unsupervised within the row, yet rows keep coming.
    conversations = [conversation(n, 300, slice(250, None)) for n in range(1, 49)] + [
        conversation(49, 10, slice(1, None)),  # one good conversation for each of the two streams
        conversation(50, 20, slice(5, None)),
    ]
    loader = sft_batches(conversations, ListRenderer(), 2, 63, buffer_size=4)
    batches = take(loader, 10)
    assert all((targets != -1).any(dim=1).all() for _, targets, _ in batches)
    state = batches[-1][2]
    assert state["stats"]["documents_dropped"] >= 9 * 48


def test_sft_fails_clearly_when_no_conversation_can_be_supervised():
    conversations = [conversation(n, 300, slice(250, None)) for n in range(1, 10)]
    with pytest.raises(PicochatError, match="no supervised token|supervised token within"):
        next(sft_batches(conversations, ListRenderer(), 1, 63))
    assert list(sft_batches(conversations, ListRenderer(), 1, 63, loop=False)) == []


def test_sft_with_a_real_tokenizer_resumes_exactly_and_ignores_ranks(tokenizer, identity_conversations):
    def loader(rank=0, world_size=1, batch_size=4, state=None):
        return sft_batches(
            identity_conversations, tokenizer, batch_size, 128, rank=rank, world_size=world_size, state=state
        )

    uninterrupted = take(loader(), 12)
    for inputs, targets, _ in uninterrupted:
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (4, 128)
        assert (inputs[:, 0] == tokenizer.bos_token_id).all() and (targets != -1).any(dim=1).all()
    # Resume after batch 5, through a checkpoint round trip.
    resumed = take(loader(state=as_checkpoint(uninterrupted[4][2])), 7)
    for (x1, y1, s1), (x2, y2, s2) in zip(uninterrupted[5:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1["stats"] == s2["stats"]
    # Same rows per step with 2 ranks, and when resuming on one from merged states.
    one_rank = collect_rows_per_stream([loader()], 1, 4, 4, steps=6)
    two_ranks = collect_rows_per_stream([loader(r, 2, 2) for r in range(2)], 2, 2, 4, steps=6)
    assert one_rank == two_ranks
    states = [take(loader(r, 2, 2), 3)[-1][2] for r in range(2)]
    resumed_on_one = collect_rows_per_stream([loader(state=merge_loader_states(states))], 1, 4, 4, steps=3)
    assert resumed_on_one == {s: rows[3:] for s, rows in one_rank.items()}
    stats = uninterrupted[-1][2]["stats"]
    assert stats["supervised_targets"] > 0 and 0 < stats["utilisation"] <= 1


# ----------------------------------------------------------------------------------------------------------
# Arguments and states


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"seq_len": -1}, "seq_len must be a positive integer"),
        ({"rank": 2, "world_size": 2}, r"rank must be an integer in 0..1"),
        ({"num_streams": 6}, "num_streams=6 .* must be batch_size x world_size = 4 x 1 = 4"),
        ({"buffer_size": 0}, "buffer_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_clear_errors(tokenizer, wiki_shard, identity_conversations, arguments, message):
    settings = {"batch_size": 4, "seq_len": 32, **arguments}
    batch_size, seq_len = settings.pop("batch_size"), settings.pop("seq_len")
    with pytest.raises(PicochatError, match=message):
        pretraining_batches(wiki_shard, tokenizer, batch_size, seq_len, **settings)
    with pytest.raises(PicochatError, match=message):
        sft_batches(identity_conversations, tokenizer, batch_size, seq_len, **settings)


def test_bad_inputs_and_mismatched_states_are_clear_errors(tokenizer, wiki_shard, tmp_path):
    with pytest.raises(PicochatError, match="no such file"):
        pretraining_batches([tmp_path / "missing.parquet"], tokenizer, 2, 16)
    with pytest.raises(PicochatError, match="empty"):
        sft_batches([], tokenizer, 2, 16)
    with pytest.raises(PicochatError, match="indexable sequence"):
        sft_batches(iter([[]]), tokenizer, 2, 16)
    with pytest.raises(PicochatError, match="conversation 1: "):
        good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        next(sft_batches([good, [{"role": "robot", "content": "x"}]], tokenizer, 1, 16))
    state = next(pretraining_batches(wiki_shard, tokenizer, 2, 16))[2]
    with pytest.raises(PicochatError, match="seq_len=16 but this loader has seq_len=32"):
        pretraining_batches(wiki_shard, tokenizer, 2, 32, state=state)
    rank_state = next(pretraining_batches(wiki_shard, tokenizer, 2, 16, rank=1, world_size=2, num_streams=4))[2]
    with pytest.raises(PicochatError, match="no entry for stream 0.*merge_loader_states"):
        pretraining_batches(wiki_shard, tokenizer, 4, 16, state=rank_state)
    with pytest.raises(PicochatError, match="device 'gpu7'"):
        pretraining_batches(wiki_shard, tokenizer, 2, 16, device="gpu7")
    with pytest.raises(PicochatError, match="expected the state dict"):
        pretraining_batches(wiki_shard, tokenizer, 2, 16, state={"cursor": 3})


def test_stats_derive_crop_fraction_and_utilisation():
    stats = PackingStats(rows=2, row_tokens=20, tokens_read=40, tokens_cropped=10, padding_tokens=5)
    assert stats.crop_fraction == 0.25 and stats.utilisation == 0.75
    assert PackingStats.from_dict(stats.to_dict()) == stats
    assert PackingStats().crop_fraction == 0.0 and PackingStats().utilisation == 1.0
