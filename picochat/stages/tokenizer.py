"""`picochat tokenizer train|eval`: train the byte-level BPE tokenizer of a run, and measure its compression.

train: text from picochat.data (train files only, each document cropped to --doc-cap characters, --max-chars in
       all) -> rustbpe or HF tokenizers -> <run_dir>/tokenizer/{tokenizer.json, token_bytes.safetensors,
       config.json}, then a round-trip sanity check.
eval:  bytes per token of the run's tokenizer and of GPT-2 on held-out Wikipedia and Gutenberg, web pages, code
       and non-English text: a table, then one JSON line (also saved as <run_dir>/eval/tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

from picochat.common import (
    PicochatError,
    add_run_arguments,
    atomic_write_json,
    log,
    positive_int,
    print_table,
    progress,
    resolve_data_dir,
    resolve_run_dir,
    warn,
)

DEFAULT_MAX_CHARS = 2_000_000_000  # the reference's budget; our shared data has far less, so "everything"
DEFAULT_DOC_CAP = 10_000  # characters per document: one huge book must not dominate the merge statistics
DEFAULT_EVAL_BYTES = 3_000_000  # per evaluation source: enough for stable ratios, a few seconds to encode

# Two sentences the tokenizer must round-trip after training, touching every alternative of the split pattern.
SANITY_TEXT = (
    "Hello world! It's 2024, and we'll test 1234567 things: tabs\tand  spaces,\r\nnewlines\n\n"
    "unicode: café, naïve, Привет мир, 日本語のテキスト, 🎉👩‍💻, math ∑x² ≤ 10, and specials <|bos|> <|user_end|>."
)

# GPT-2's reference tokenizer, as /work/shared/data/README.md describes it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_HELLO_WORLD = [15496, 995]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train the run's tokenizer on text files",
        description="Train a byte-level BPE tokenizer (GPT-4-style split, 9 special tokens) into <run>/tokenizer/.",
    )
    train.add_argument(
        "paths",
        nargs="*",
        help="text files or folders (.parquet, .jsonl, .jsonl.gz, .txt, .txt.gz); files named val* are held out "
        "(see `picochat data`). Default: every parquet shard under <data-dir>",
    )
    _add_location_flags(train)
    train.add_argument(
        "--vocab-size",
        type=_vocab_size,
        default=32_768,
        help="total vocabulary: 256 bytes + merges + 9 special tokens (default 32768)",
    )
    train.add_argument(
        "--max-chars",
        type=positive_int,
        default=DEFAULT_MAX_CHARS,
        help=f"total characters fed to the trainer (default {DEFAULT_MAX_CHARS:,})",
    )
    train.add_argument(
        "--doc-cap",
        type=positive_int,
        default=DEFAULT_DOC_CAP,
        help=f"characters per document; longer documents are cropped (default {DEFAULT_DOC_CAP:,})",
    )
    train.add_argument(
        "--trainer",
        choices=["rustbpe", "hf"],
        default="rustbpe",
        help="BPE trainer: rustbpe (default, faster: see bench/tokenizer.py) or hf (Hugging Face tokenizers)",
    )
    train.add_argument(
        "--split-pattern",
        choices=["picochat", "llama-bpe"],
        default="picochat",
        help="how text is cut into chunks before BPE: picochat (GPT-4's, digits in 1-2; the default) or llama-bpe "
        "(Llama 3's, digits in 1-3), which llama.cpp knows: needed for `picochat export --format gguf`",
    )
    train.add_argument("--text-column", default="text", help="parquet column / jsonl field holding the text")

    evaluate = actions.add_parser(
        "eval",
        help="compare the run's tokenizer with GPT-2 (bytes per token)",
        description="Bytes per token of the run's tokenizer and GPT-2's on held-out and out-of-domain text.",
    )
    _add_location_flags(evaluate)
    evaluate.add_argument(
        "--max-bytes",
        type=positive_int,
        default=DEFAULT_EVAL_BYTES,
        help=f"UTF-8 bytes of text per source (default {DEFAULT_EVAL_BYTES:,})",
    )


def _add_location_flags(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")


def _vocab_size(value: str) -> int:
    from picochat.tokenizer import MIN_VOCAB_SIZE

    try:
        number = int(value.replace("_", ""))
    except ValueError:
        number = None
    if number is None or number < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + 9 special tokens), got {value!r}"
        )
    return number


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return train(args)
    return evaluate(args)


# ----------------------------------------------------------------------------------------------------------
# train


def training_texts(
    files: list[Path], *, max_chars: int, doc_cap: int, text_column: str = "text", stats: dict | None = None
) -> Iterator[str]:
    """The documents of `files` in order, each cropped to doc_cap characters, until max_chars characters in all
    (the last document is cropped to land exactly on it). `stats` (if given) receives the counts as we go."""
    from picochat.data import TextFormat, iter_documents

    stats = {} if stats is None else stats
    stats.update(characters=0, documents=0)
    bar = progress(total=max_chars, desc="tokenizer text", unit="char", unit_scale=True)
    try:
        for text, _cursor in iter_documents(files, text_format=TextFormat(text_column=text_column)):
            text = text[: min(doc_cap, max_chars - stats["characters"])]
            stats["characters"] += len(text)
            stats["documents"] += 1
            bar.update(len(text))
            yield text
            if stats["characters"] >= max_chars:
                break
    finally:
        bar.close()


def train(args: argparse.Namespace) -> int:
    from picochat import __version__
    from picochat.data import default_pretraining_files, find_text_files, split_train_val
    from picochat.tokenizer import MIN_VOCAB_SIZE, SPLIT_PATTERNS, TOKENIZER_FILE, Tokenizer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    paths = args.paths or default_pretraining_files(resolve_data_dir(args.data_dir))
    train_files, held_out = split_train_val(find_text_files(paths))
    if not train_files:
        raise PicochatError(f"no training files: all of {[str(p) for p in paths]} are validation files (val*)")
    log(f"tokenizer: training on {len(train_files)} files (held out: {len(held_out)}), trainer {args.trainer}")

    stats: dict = {}
    texts = training_texts(
        train_files, max_chars=args.max_chars, doc_cap=args.doc_cap, text_column=args.text_column, stats=stats
    )
    start = time.perf_counter()
    tokenizer = Tokenizer.train(
        texts, vocab_size=args.vocab_size, trainer=args.trainer, pattern=SPLIT_PATTERNS[args.split_pattern]
    )
    train_seconds = time.perf_counter() - start
    if stats["characters"] == 0:
        raise PicochatError(f"no text to train on in {[str(p) for p in train_files]}")
    if tokenizer.vocab_size < args.vocab_size:
        warn(
            f"the text supplied only {tokenizer.vocab_size - MIN_VOCAB_SIZE} merges: the vocabulary has "
            f"{tokenizer.vocab_size} tokens, not {args.vocab_size} (train on more text)"
        )
    sanity_check(tokenizer)

    folder = run_dir / "tokenizer"
    tokenizer.save(folder)
    atomic_write_json(
        folder / "config.json",
        {
            "picochat_version": __version__,
            "trainer": args.trainer,
            "split_pattern": args.split_pattern,
            "vocab_size_requested": args.vocab_size,
            "vocab_size": tokenizer.vocab_size,
            "max_chars": args.max_chars,
            "doc_cap": args.doc_cap,
            "text_column": args.text_column,
            "characters": stats["characters"],
            "documents": stats["documents"],
            "train_files": [str(p) for p in train_files],
            "train_seconds": round(train_seconds, 3),
        },
    )
    log(
        f"tokenizer: {tokenizer.vocab_size:,} tokens from {stats['characters']:,} characters "
        f"({stats['documents']:,} documents) in {train_seconds:.1f}s -> {folder / TOKENIZER_FILE}"
    )
    return 0


def sanity_check(tokenizer) -> None:
    """Round trip a mixed text, and check that special-token text stays ordinary text. A failure is a bug in
    picochat or a trainer, not a user mistake, hence RuntimeError."""
    ids = tokenizer.encode(SANITY_TEXT)
    if tokenizer.decode(ids) != SANITY_TEXT:
        raise RuntimeError("tokenizer sanity check failed: decode(encode(text)) != text")
    if tokenizer.bos_token_id in ids:
        raise RuntimeError("tokenizer sanity check failed: the text '<|bos|>' became the BOS token")


# ----------------------------------------------------------------------------------------------------------
# eval


def load_gpt2(data_dir: Path):
    """GPT-2's tokenizer from <data_dir>/tokenizers/gpt2.tiktoken, checked against its known encoding."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = data_dir / "tokenizers" / "gpt2.tiktoken"
    if not path.is_file():
        raise PicochatError(f"{path}: GPT-2 reference tokenizer not found (see --data-dir)")
    try:
        ranks = load_tiktoken_bpe(str(path))
        encoding = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
        )
    except ValueError as error:
        raise PicochatError(f"{path}: not a valid tiktoken rank file ({error})") from None
    got = encoding.encode_ordinary("Hello world")
    if got != GPT2_HELLO_WORLD:
        raise PicochatError(f"{path}: 'Hello world' encodes to {got}, expected GPT-2's {GPT2_HELLO_WORLD}")
    return encoding


def _capped(texts: Iterator[str], max_bytes: int) -> list[str]:
    """Whole documents until max_bytes UTF-8 bytes are reached (the last one may overshoot a little)."""
    kept, total = [], 0
    for text in texts:
        kept.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return kept


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PicochatError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise PicochatError(f"{path}:{line_number}: expected a JSON object")
            yield line_number, record


def _string_field(path: Path, line_number: int, record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise PicochatError(f"{path}:{line_number}: field {field!r} must be a string")
    return value


def _document_texts(paths: list[Path]) -> Iterator[str]:
    from picochat.data import iter_documents

    for text, _cursor in iter_documents(paths):
        yield text


def _humaneval_texts(path: Path) -> Iterator[str]:
    # A function signature with its docstring, then the reference body: ordinary Python source.
    for line_number, record in _jsonl_records(path):
        yield _string_field(path, line_number, record, "prompt") + _string_field(
            path, line_number, record, "canonical_solution"
        )


def _language_identification_texts(path: Path) -> Iterator[str]:
    # Each query holds one sentence in one of ~1,000 languages on a line "Sentence: ...": keep only that sentence
    # (a few rows have an empty one; they add nothing).
    for line_number, record in _jsonl_records(path):
        query = _string_field(path, line_number, record, "query")
        for line in query.splitlines():
            if line.startswith("Sentence:"):
                yield line.removeprefix("Sentence:").removeprefix(" ")
                break
        else:
            raise PicochatError(f"{path}:{line_number}: field 'query' has no 'Sentence:' line")


def evaluation_sources(data_dir: Path) -> list[tuple[str, list[Path], object]]:
    """(name, files, texts function) per source; the function maps the files to an iterator of texts."""
    pretrain = data_dir / "pretrain"
    language = data_dir / "core_eval/eval_data/language_understanding/bigbench_language_identification.jsonl"
    return [
        ("wikipedia_val", [pretrain / "wikipedia_en/val_00000.parquet"], _document_texts),
        ("gutenberg_val", [pretrain / "gutenberg_books/val_00000.parquet"], _document_texts),
        ("web", [pretrain / "c4_demo.jsonl", *sorted(pretrain.glob("dclm_web_*.jsonl"))], _document_texts),
        ("code_humaneval", [data_dir / "chat_eval/humaneval/HumanEval.jsonl.gz"], lambda p: _humaneval_texts(p[0])),
        ("multilingual", [language], lambda p: _language_identification_texts(p[0])),
    ]


def compression_table(tokenizer, gpt2, data_dir: Path, max_bytes: int) -> list[dict]:
    rows = []
    for name, files, texts_of in evaluation_sources(data_dir):
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            warn(f"tokenizer eval: skipping source {name}: {', '.join(missing)} not found")
            continue
        texts = _capped(texts_of(files), max_bytes)
        total_bytes = sum(len(text.encode("utf-8")) for text in texts)
        ours = sum(len(ids) for ids in tokenizer.encode(texts))
        theirs = sum(len(ids) for ids in gpt2.encode_ordinary_batch(texts, num_threads=4))
        ours_bpt, gpt2_bpt = total_bytes / max(ours, 1), total_bytes / max(theirs, 1)
        rows.append(
            {
                "source": name,
                "bytes": total_bytes,
                "ours_tokens": ours,
                "gpt2_tokens": theirs,
                "ours_bytes_per_token": round(ours_bpt, 4),
                "gpt2_bytes_per_token": round(gpt2_bpt, 4),
                "ratio_ours_over_gpt2": round(ours_bpt / gpt2_bpt, 4),
            }
        )
    if not rows:
        raise PicochatError(f"{data_dir}: none of the evaluation sources was found (see --data-dir)")
    return rows


def evaluate(args: argparse.Namespace) -> int:
    from picochat.tokenizer import Tokenizer

    run_dir = resolve_run_dir(args.run, args.run_dir)
    data_dir = resolve_data_dir(args.data_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    gpt2 = load_gpt2(data_dir)
    start = time.perf_counter()
    rows = compression_table(tokenizer, gpt2, data_dir, args.max_bytes)
    log(f"tokenizer eval: {len(rows)} sources in {time.perf_counter() - start:.1f}s")

    print(print_table(rows))
    result = {
        "task": "tokenizer_compression",
        "vocab_size": tokenizer.vocab_size,
        "gpt2_vocab_size": gpt2.n_vocab,
        "sources": rows,
    }
    atomic_write_json(run_dir / "eval" / "tokenizer.json", result)
    print(json.dumps(result), flush=True)
    return 0
