"""The tokenizer: training with both trainers, encoding, decoding, specials, files, and the CLI stage."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.cli import main
from picochat.common import PicochatError
from picochat.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    SPLIT_PATTERN_NO_POSSESSIVE,
    Tokenizer,
    byte_to_unicode,
)

SMALL_VOCAB = 1024


def parquet_texts(path: Path, max_chars: int | None = None, doc_cap: int = 10_000) -> list[str]:
    """Documents of a parquet shard (read directly, so these tests do not depend on picochat.data)."""
    texts, total = [], 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
        for text in batch.column("text").to_pylist():
            texts.append(text if max_chars is None else text[:doc_cap])
            total += len(texts[-1])
            if max_chars is not None and total >= max_chars:
                return texts
    return texts


@pytest.fixture(scope="session")
def corpus(data_dir) -> list[str]:
    """~300 KB of training text: Wikipedia articles and the opening of Gutenberg books."""
    wiki = parquet_texts(data_dir / "pretrain/wikipedia_en/shard_00000.parquet", max_chars=250_000)
    books = parquet_texts(data_dir / "pretrain/gutenberg_books/shard_00000.parquet", max_chars=50_000, doc_cap=5_000)
    return wiki + books


@pytest.fixture(scope="session")
def small_tokenizer(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=SMALL_VOCAB, trainer="rustbpe")


@pytest.fixture(scope="session")
def small_hf_tokenizer(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=SMALL_VOCAB, trainer="hf")


@pytest.fixture(scope="session")
def validation_documents(data_dir) -> list[str]:
    wiki = parquet_texts(data_dir / "pretrain/wikipedia_en/val_00000.parquet")
    books = parquet_texts(data_dir / "pretrain/gutenberg_books/val_00000.parquet")
    assert len(wiki) == 680 and len(books) == 8  # every document of both validation shards
    return wiki + books


# ----------------------------------------------------------------------------------------------------------
# Layout of the vocabulary


@pytest.mark.parametrize("tokenizer_name", ["small_tokenizer", "small_hf_tokenizer"])
def test_vocab_layout(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    assert tokenizer.vocab_size == SMALL_VOCAB
    # 256 bytes in byte order, then merges, then the 9 specials in order at the last ids.
    for b in range(256):
        assert tokenizer.mergeable_ranks[bytes([b])] == b
    assert [tokenizer.encode_special(name) for name in SPECIAL_TOKENS] == list(range(SMALL_VOCAB - 9, SMALL_VOCAB))
    assert tokenizer.bos_token_id == SMALL_VOCAB - 9
    # Every merged token is the concatenation of two tokens of lower rank (a valid BPE merge sequence).
    by_rank = sorted(tokenizer.mergeable_ranks, key=tokenizer.mergeable_ranks.get)
    for rank, token in enumerate(by_rank[256:], start=256):
        assert any(
            tokenizer.mergeable_ranks.get(token[:cut], rank) < rank
            and tokenizer.mergeable_ranks.get(token[cut:], rank) < rank
            for cut in range(1, len(token))
        ), token


def test_default_layout_matches_reference():
    # 32,768 = 256 bytes + 32,503 merges + 9 specials; BOS = 32,759 (REFERENCE A.7). Checked without training by
    # building ranks of the right size from synthetic three-byte tokens.
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(32_503):
        ranks[bytes([i % 256, i // 256 % 256, 255 - i // 65536])] = 256 + i
    tokenizer = Tokenizer(ranks)
    assert tokenizer.vocab_size == 32_768
    assert tokenizer.bos_token_id == 32_759
    assert tokenizer.encode_special("<|output_end|>") == 32_767


def test_small_corpus_gives_smaller_vocab_not_error():
    tokenizer = Tokenizer.train(["ab ab ab"], vocab_size=MIN_VOCAB_SIZE + 50)
    assert MIN_VOCAB_SIZE <= tokenizer.vocab_size < MIN_VOCAB_SIZE + 50
    assert tokenizer.decode(tokenizer.encode("ab abc")) == "ab abc"


@pytest.mark.parametrize("bad", [MIN_VOCAB_SIZE - 1, 0, -5, 1000.0, "1024", True])
def test_bad_vocab_size_is_a_clear_error(bad):
    with pytest.raises(PicochatError, match="vocab size"):
        Tokenizer.train(["hello"], vocab_size=bad)


def test_unknown_trainer_is_a_clear_error():
    with pytest.raises(PicochatError, match="unknown trainer"):
        Tokenizer.train(["hello"], vocab_size=300, trainer="sentencepiece")


# ----------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_every_validation_document(small_tokenizer, validation_documents):
    batch = small_tokenizer.encode(validation_documents)
    for text, ids in zip(validation_documents, batch):
        assert small_tokenizer.decode(ids) == text


def test_hf_tokenizer_round_trip_on_validation(small_hf_tokenizer, validation_documents):
    texts = validation_documents[:100] + validation_documents[-8:]
    for text, ids in zip(texts, small_hf_tokenizer.encode(texts)):
        assert small_hf_tokenizer.decode(ids) == text


# Text with the tricky parts: emoji (incl. ZWJ sequences and flags), combining marks, null bytes, CRLF, digits.
TRICKY_PIECES = [
    "\x00", "\r\n", "\n", "\r", "\t", " ", "  ", "\u00a0", "\u3000", "e\u0301", "\u0308", "🎉", "👩‍💻", "🇫🇷",
    "'s", "'LL", "123", "4567", "٣", "日本", "Привет", "<|bos|>", "<|endoftext|>", "\ufeff", "\U0010fffd",
]  # fmt: skip


def mixed_with_tricky_pieces(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(TRICKY_PIECES) | text, max_size=40).map("".join)


tricky_text = mixed_with_tricky_pieces(st.text(max_size=5))
any_text = st.text() | tricky_text  # st.text() draws arbitrary Unicode without surrogates


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_round_trip_arbitrary_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.decode_bytes(ids) == text.encode("utf-8")
    token_bytes = small_tokenizer.token_byte_lengths()
    assert sum(token_bytes[i] for i in ids) == len(text.encode("utf-8"))
    assert all(0 <= i < small_tokenizer.bos_token_id for i in ids)


# ----------------------------------------------------------------------------------------------------------
# Specials, prepend/append, batches


def test_special_token_text_is_never_a_special_token(small_tokenizer):
    for name in SPECIAL_TOKENS:
        text = f"before {name} after{name}"
        ids = small_tokenizer.encode(text)
        assert not any(small_tokenizer.is_special(i) for i in ids)
        assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.encode(["<|bos|>"])[0] == small_tokenizer.encode("<|bos|>")


def test_decode_accepts_tensors_and_arrays(small_tokenizer):
    import numpy as np
    import torch

    ids = small_tokenizer.encode("tensors too", prepend="<|bos|>")
    for container in (torch.tensor(ids), np.array(ids), tuple(ids)):
        assert small_tokenizer.decode(container) == "<|bos|>tensors too"
        assert small_tokenizer.decode_bytes(container) == b"<|bos|>tensors too"


def test_special_ids_decode_to_their_names(small_tokenizer):
    ids = [small_tokenizer.encode_special(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert small_tokenizer.decode(ids) == "".join(SPECIAL_TOKENS)


def test_unknown_special_is_a_clear_error(small_tokenizer):
    with pytest.raises(PicochatError, match="unknown special token"):
        small_tokenizer.encode_special("<|eos|>")
    with pytest.raises(PicochatError, match="unknown special token"):
        small_tokenizer.encode("hi", prepend="<|eos|>")


def test_prepend_and_append(small_tokenizer):
    plain = small_tokenizer.encode("hello world")
    bos = small_tokenizer.bos_token_id
    end = small_tokenizer.encode_special("<|assistant_end|>")
    assert small_tokenizer.encode("hello world", prepend="<|bos|>") == [bos, *plain]
    assert small_tokenizer.encode("hello world", prepend=bos, append=end) == [bos, *plain, end]
    assert small_tokenizer.encode("", prepend=bos) == [bos]
    batch = small_tokenizer.encode(["hello world", ""], prepend=bos, append="<|assistant_end|>")
    assert batch == [[bos, *plain, end], [bos, end]]


def test_batch_encode_equals_single(small_tokenizer, validation_documents):
    texts = validation_documents[:50] + ["", "a", "<|bos|>"]
    for num_threads in (1, 4):
        assert small_tokenizer.encode(texts, num_threads=num_threads) == [small_tokenizer.encode(t) for t in texts]


def test_encode_rejects_non_text(small_tokenizer):
    with pytest.raises(TypeError):
        small_tokenizer.encode(b"bytes")
    with pytest.raises(TypeError):
        small_tokenizer.encode(["ok", 3])


# ----------------------------------------------------------------------------------------------------------
# Pre-tokenization: the HF form of the pattern splits exactly like the possessive one


def hf_split(text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    splitter = pre_tokenizers.Split(Regex(SPLIT_PATTERN_NO_POSSESSIVE), behavior="isolated", invert=False)
    return [piece for piece, _ in splitter.pre_tokenize_str(text)]


def varied_texts(data_dir: Path) -> list[str]:
    import gzip

    texts = parquet_texts(data_dir / "pretrain/wikipedia_en/val_00000.parquet", max_chars=100_000)
    texts += [book[:20_000] for book in parquet_texts(data_dir / "pretrain/gutenberg_books/val_00000.parquet")]
    with gzip.open(data_dir / "chat_eval/humaneval/HumanEval.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["prompt"] for line in list(f)[:30]]
    language = data_dir / "core_eval/eval_data/language_understanding/bigbench_language_identification.jsonl"
    with open(language, encoding="utf-8") as f:
        texts += [json.loads(line)["query"] for _, line in zip(range(300), f)]
    return texts + ["It's   they'LL  don't\r\n\r\n  x\t\t\n 12345 a1b22c333 ?!?!\n\n\n", " \u00a0\u2003 end  "]


def test_no_possessive_pattern_splits_the_same(data_dir):
    texts = varied_texts(data_dir)
    for text in texts:
        reference = regex.findall(SPLIT_PATTERN, text)
        assert "".join(reference) == text
        assert regex.findall(SPLIT_PATTERN_NO_POSSESSIVE, text) == reference
        assert hf_split(text) == reference


# Code points still unassigned in Python's Unicode tables (category Cn) are left out: the regex engines ship
# different Unicode versions, so a character assigned only recently (e.g. U+0558, a letter since Unicode 16) is a
# letter to one engine and unassigned to another. That is a table difference, not a pattern difference; on every
# assigned character below U+30000, in several contexts, the splits were checked identical.
assigned_characters = st.characters(codec="utf-8", exclude_categories=["Cn", "Cs"])
assigned_text = st.text(alphabet=assigned_characters) | mixed_with_tricky_pieces(
    st.text(alphabet=assigned_characters, max_size=5)
)


@settings(max_examples=300, deadline=None)
@given(text=assigned_text)
def test_no_possessive_pattern_splits_the_same_on_arbitrary_text(text):
    reference = regex.findall(SPLIT_PATTERN, text)
    assert regex.findall(SPLIT_PATTERN_NO_POSSESSIVE, text) == reference
    assert hf_split(text) == reference


def test_both_trainers_learn_the_same_merges(small_tokenizer, small_hf_tokenizer):
    # Same chunks and same pair counts, so the two trainers learn the same tokens; only the order among pairs
    # with equal counts may differ (each trainer breaks ties its own way).
    ours, theirs = set(small_tokenizer.mergeable_ranks), set(small_hf_tokenizer.mergeable_ranks)
    assert len(ours & theirs) >= 0.98 * len(ours)
    text = "The quick brown fox jumps over the lazy dog, and then it's 12345 more.\n"
    assert small_hf_tokenizer.decode(small_hf_tokenizer.encode(text)) == text


def test_byte_to_unicode_is_a_bijection_of_printable_characters():
    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in mapping.values())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ"  # GPT-2's well-known stand-in for a space


# ----------------------------------------------------------------------------------------------------------
# token_bytes


def test_token_bytes_counts_raw_bytes(small_tokenizer, validation_documents):
    token_bytes = small_tokenizer.token_bytes()
    assert str(token_bytes.dtype) == "torch.int32"
    assert token_bytes.shape == (small_tokenizer.vocab_size,)
    assert token_bytes[small_tokenizer.bos_token_id :].tolist() == [0] * len(SPECIAL_TOKENS)
    for token, rank in small_tokenizer.mergeable_ranks.items():
        assert token_bytes[rank] == len(token)
    for text in validation_documents[:200]:
        ids = small_tokenizer.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_of_partial_utf8_token():
    # A token holding only the first two bytes of a 3-byte character counts 2 bytes, not len("\ufffd") = 3.
    ranks = {bytes([b]): b for b in range(256)}
    ranks["€".encode()[:2]] = 256
    tokenizer = Tokenizer(ranks)
    assert tokenizer.token_byte_lengths()[256] == 2
    assert tokenizer.decode([256]) == "\ufffd"


# ----------------------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip(small_tokenizer, tmp_path, validation_documents):
    json_path = small_tokenizer.save(tmp_path / "tok")
    assert json_path == tmp_path / "tok" / "tokenizer.json"
    document = json.loads(json_path.read_text())
    assert document["pattern"] == SPLIT_PATTERN
    assert document["special_tokens"]["<|bos|>"] == small_tokenizer.bos_token_id
    assert base64.b64decode(next(iter(document["mergeable_ranks"]))) == b"\x00"
    for path in (tmp_path / "tok", json_path):
        loaded = Tokenizer.load(path)
        assert loaded.mergeable_ranks == small_tokenizer.mergeable_ranks
        assert loaded.special_token_ids == small_tokenizer.special_token_ids
        texts = validation_documents[:20]
        assert loaded.encode(texts) == small_tokenizer.encode(texts)
    # token_bytes.safetensors holds the same counts as the in-memory tensor.
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "tok" / "token_bytes.safetensors"))["token_bytes"]
    assert saved.dtype == small_tokenizer.token_bytes().dtype
    assert saved.tolist() == small_tokenizer.token_byte_lengths()
    assert not list((tmp_path / "tok").glob("*.tmp"))  # atomic writes leave no temporary files


def corrupt(document: dict, how: str) -> dict | str:
    ranks = document["mergeable_ranks"]
    first = next(iter(ranks))
    if how == "missing byte":
        return {**document, "mergeable_ranks": {k: v for k, v in ranks.items() if k != first}}
    if how == "bad base64":
        return {**document, "mergeable_ranks": {**ranks, "!!notbase64": len(ranks)}}
    if how == "rank gap":
        return {**document, "mergeable_ranks": {**ranks, first: len(ranks) + 5}}
    if how == "rank not int":
        return {**document, "mergeable_ranks": {**ranks, first: "0"}}
    if how == "special ids":
        return {**document, "special_tokens": {name: i for i, name in enumerate(SPECIAL_TOKENS)}}
    if how == "special missing":
        specials = dict(list(document["special_tokens"].items())[:-1])
        return {**document, "special_tokens": specials}
    if how == "no pattern":
        return {k: v for k, v in document.items() if k != "pattern"}
    if how == "bad pattern":
        return {**document, "pattern": "(unclosed"}
    if how == "wrong format":
        return {**document, "format": "something-else"}
    if how == "not json":
        return '{"format": "picochat-tokenizer", "version": 1,'
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing byte", "bad base64", "rank gap", "rank not int", "special ids", "special missing",
        "no pattern", "bad pattern", "wrong format", "not json",
    ],
)  # fmt: skip
def test_load_rejects_corrupt_files(small_tokenizer, tmp_path, how):
    json_path = small_tokenizer.save(tmp_path)
    bad = corrupt(json.loads(json_path.read_text()), how)
    json_path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(PicochatError, match=str(json_path).replace("\\", "\\\\")):
        Tokenizer.load(tmp_path)


def test_load_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PicochatError, match="not found"):
        Tokenizer.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# The CLI stage


def only_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    wiki = data_dir / "pretrain/wikipedia_en/shard_00000.parquet"
    status = main(
        ["tokenizer", "train", str(wiki), "--run-dir", str(run_dir), "--vocab-size", "600", "--max-chars", "300_000"]
    )
    assert status == 0
    return run_dir


def test_cli_train_writes_the_tokenizer(trained_run, data_dir):
    folder = trained_run / "tokenizer"
    tokenizer = Tokenizer.load(folder)
    assert tokenizer.vocab_size == 600
    config = json.loads((folder / "config.json").read_text())
    assert config["characters"] == 300_000  # --max-chars is exact: the last document is cropped
    assert config["trainer"] == "rustbpe" and config["doc_cap"] == 10_000
    assert config["train_files"] == [str(data_dir / "pretrain/wikipedia_en/shard_00000.parquet")]
    assert (folder / "token_bytes.safetensors").is_file()


def test_training_texts_crop_and_stop(data_dir):
    from picochat.stages.tokenizer import training_texts

    stats: dict = {}
    wiki = data_dir / "pretrain/wikipedia_en/shard_00000.parquet"
    texts = list(training_texts([wiki], max_chars=50_000, doc_cap=300, stats=stats))
    assert max(len(t) for t in texts) == 300
    assert sum(len(t) for t in texts) == 50_000 == stats["characters"]
    assert stats["documents"] == len(texts)


def test_cli_train_hf_trainer(tmp_path, data_dir):
    wiki = data_dir / "pretrain/wikipedia_en/shard_00000.parquet"
    args = ["tokenizer", "train", str(wiki), "--run-dir", str(tmp_path), "--vocab-size", "400"]
    assert main([*args, "--max-chars", "100000", "--trainer", "hf", "--doc-cap", "2000"]) == 0
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == 400
    assert json.loads((tmp_path / "tokenizer/config.json").read_text())["trainer"] == "hf"


def test_cli_eval_prints_table_and_json(trained_run, data_dir, capsys):
    status = main(
        ["tokenizer", "eval", "--run-dir", str(trained_run), "--data-dir", str(data_dir), "--max-bytes", "50000"]
    )
    assert status == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert "ours_bytes_per_token" in out[0]
    sources = {row["source"]: row for row in result["sources"]}
    assert set(sources) == {"wikipedia_val", "gutenberg_val", "web", "code_humaneval", "multilingual"}
    for row in sources.values():
        assert row["bytes"] >= 50_000 and row["ours_tokens"] > 0 and row["gpt2_tokens"] > 0
        assert row["ours_bytes_per_token"] == pytest.approx(row["bytes"] / row["ours_tokens"], abs=1e-3)
        assert row["ratio_ours_over_gpt2"] == pytest.approx(
            row["ours_bytes_per_token"] / row["gpt2_bytes_per_token"], abs=1e-3
        )
    # A 600-token vocabulary compresses far worse than GPT-2's 50K on English prose.
    assert sources["wikipedia_val"]["ratio_ours_over_gpt2"] < 1
    assert json.loads((trained_run / "eval/tokenizer.json").read_text()) == result


def test_gpt2_reference_loads_and_checks(data_dir):
    from picochat.stages.tokenizer import load_gpt2

    gpt2 = load_gpt2(data_dir)
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert gpt2.n_vocab == 50_257


@pytest.mark.parametrize("value", ["100", "264", "abc", "32k", "1e4"])
def test_cli_rejects_bad_vocab_size_at_parse_time(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--vocab-size", value])
    assert exit_info.value.code == 2
    line = only_error_line(capsys.readouterr().err)
    assert "--vocab-size" in line and str(MIN_VOCAB_SIZE) in line


@pytest.mark.parametrize("flag", ["--max-chars", "--doc-cap"])
def test_cli_rejects_bad_counts_at_parse_time(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", flag, "0"])
    assert exit_info.value.code == 2
    assert flag in only_error_line(capsys.readouterr().err)


def test_cli_train_missing_path_is_a_clear_error(tmp_path, capsys):
    status = main(["tokenizer", "train", str(tmp_path / "missing.parquet"), "--run-dir", str(tmp_path)])
    assert status == 2
    assert only_error_line(capsys.readouterr().err).startswith("picochat: error:")


def test_cli_train_without_data_is_a_clear_error(tmp_path, capsys):
    status = main(["tokenizer", "train", "--data-dir", str(tmp_path / "empty"), "--run-dir", str(tmp_path)])
    assert status == 2
    line = only_error_line(capsys.readouterr().err)
    assert line.startswith("picochat: error:") and "does not exist" in line


def test_cli_train_malformed_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    status = main(["tokenizer", "train", str(bad), "--run-dir", str(tmp_path), "--vocab-size", "300"])
    assert status == 2
    line = only_error_line(capsys.readouterr().err)
    assert line.startswith("picochat: error:") and "bad.jsonl" in line


def test_cli_eval_without_tokenizer_is_a_clear_error(tmp_path, data_dir, capsys):
    status = main(["tokenizer", "eval", "--run-dir", str(tmp_path), "--data-dir", str(data_dir)])
    assert status == 2
    line = only_error_line(capsys.readouterr().err)
    assert line.startswith("picochat: error:") and "tokenizer.json" in line


def test_cli_eval_corrupt_tokenizer_is_a_clear_error(tmp_path, data_dir, capsys):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer/tokenizer.json").write_text("{not json")
    status = main(["tokenizer", "eval", "--run-dir", str(tmp_path), "--data-dir", str(data_dir)])
    assert status == 2
    assert "not a valid JSON" in only_error_line(capsys.readouterr().err)


def test_eval_source_readers(tmp_path):
    from picochat.stages.tokenizer import _humaneval_texts, _language_identification_texts

    language = tmp_path / "language.jsonl"
    rows = [{"query": "Pick\nSentence: Bonjour le monde\nA. French"}, {"query": "Pick\nSentence:\nA. X"}]
    language.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert list(_language_identification_texts(language)) == ["Bonjour le monde", ""]
    language.write_text(json.dumps({"query": "no sentence here"}) + "\n")
    with pytest.raises(PicochatError, match="language.jsonl:1: field 'query' has no 'Sentence:' line"):
        list(_language_identification_texts(language))

    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"prompt": "def f():\n", "canonical_solution": "    return 1\n"}) + "\n{oops\n")
    texts = _humaneval_texts(code)
    assert next(texts) == "def f():\n    return 1\n"
    with pytest.raises(PicochatError, match="code.jsonl:2: invalid JSON"):
        next(texts)
