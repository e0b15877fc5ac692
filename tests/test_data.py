"""Local documents: file discovery, split, deterministic order, exact resume, rank striding, bad input."""

from __future__ import annotations

import gzip
import itertools
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import readers
from picochat.cli import main
from picochat.common import PicochatError
from picochat.data import (
    Cursor,
    TextFormat,
    check_file,
    find_text_files,
    iter_documents,
    split_train_val,
    summarize_file,
)

# ----------------------------------------------------------------------------------------------------------
# Helpers that write small files.


def write_parquet(path: Path, texts, row_group_size: int = 3, column: str = "text", **extra) -> Path:
    columns = {column: pa.array(texts, pa.string()), **extra}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records) -> Path:
    body = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    return write_bytes(path, body)


def write_bytes(path: Path, body: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def texts_of(files, **kwargs) -> list[str]:
    return [text for text, _ in iter_documents(files, **kwargs)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny jsonl/txt blocks and parquet batches, so a few documents cross every kind of boundary."""
    monkeypatch.setattr(readers, "LINE_BLOCK_SIZE", 2)
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 2)


@pytest.fixture
def mixed(tmp_path):
    """Four files of three formats (parquet with uneven row groups, jsonl.gz, txt) and the expected order."""
    expected = []

    def docs(name, count):
        made = [f"{name} document {i} — ünïcode ✓" for i in range(count)]
        expected.extend(made)
        return made

    files = [
        write_parquet(tmp_path / "a.parquet", docs("a", 7), row_group_size=5),
        write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t, "id": i} for i, t in enumerate(docs("b", 5))]),
        write_bytes(tmp_path / "c.txt", docs("c", 1)[0].encode("utf-8")),
        write_parquet(tmp_path / "d.parquet", docs("d", 4), row_group_size=2),
    ]
    return files, expected


@pytest.fixture
def warnings(monkeypatch):
    messages: list[str] = []
    monkeypatch.setattr(readers, "warn", messages.append)
    return messages


# ----------------------------------------------------------------------------------------------------------
# Finding files and the split.


def test_find_text_files_recursive_sorted_and_filtered(tmp_path):
    names = [
        "b/shard_1.parquet",
        "a.jsonl",
        "b/a.txt.gz",
        "z.txt",
        "notes.md",
        "b/x.csv",
        "c/d/e.jsonl.gz",
        ".hidden.txt",
        ".cache/inside.txt",
        "b/shard_0.parquet.part",
    ]
    for name in names:
        write_bytes(tmp_path / name, b"x")
    found = find_text_files([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.jsonl",
        "b/a.txt.gz",
        "b/shard_1.parquet",
        "c/d/e.jsonl.gz",
        "z.txt",
    ]
    # Same folder twice, and a file inside it: no duplicates, same order.
    assert find_text_files([tmp_path, str(tmp_path), tmp_path / "z.txt"]) == found


def test_find_text_files_errors(tmp_path):
    with pytest.raises(PicochatError, match="no data files"):
        find_text_files([tmp_path])
    write_bytes(tmp_path / "table.csv", b"a,b")
    with pytest.raises(PicochatError, match="no data files"):
        find_text_files([tmp_path])
    with pytest.raises(PicochatError, match="table.csv: unsupported file type"):
        find_text_files([tmp_path / "table.csv"])
    with pytest.raises(PicochatError, match="missing: no such file or folder"):
        find_text_files([tmp_path / "missing"])


def test_split_by_val_prefix_and_last_file():
    files = [Path(n) for n in ["shard_0.parquet", "val_0.parquet", "shard_1.parquet", "validation.jsonl"]]
    train, val = split_train_val(files)
    assert train == [Path("shard_0.parquet"), Path("shard_1.parquet")]
    assert val == [Path("val_0.parquet"), Path("validation.jsonl")]

    shards = [Path(f"shard_{i:05d}.parquet") for i in range(4)]
    assert split_train_val(shards) == (shards[:3], shards[3:])
    assert split_train_val(shards[:1]) == (shards[:1], [])


@pytest.mark.parametrize("count", range(0, 6))
def test_split_never_overlaps_and_covers_everything(count):
    for val_mask in itertools.product([False, True], repeat=count):
        files = [Path(("val" if v else "shard") + f"_{i}.txt") for i, v in enumerate(val_mask)]
        train, val = split_train_val(files)
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(files)


# ----------------------------------------------------------------------------------------------------------
# Order, cursor, exact resume.


def test_cursor_round_trip_and_validation():
    cursor = Cursor(epoch=2, file_index=3, row_group=4, row=5, document_index=600)
    assert Cursor.from_dict(json.loads(json.dumps(cursor.to_dict()))) == cursor
    with pytest.raises(PicochatError, match="data cursor"):
        Cursor.from_dict({"epoch": 0})
    with pytest.raises(PicochatError, match="'row'"):
        Cursor.from_dict({**cursor.to_dict(), "row": -1})
    with pytest.raises(PicochatError, match="data cursor"):
        Cursor.from_dict({**cursor.to_dict(), "row": "7"})


def test_reads_every_format_in_order(mixed):
    files, expected = mixed
    assert texts_of(files) == expected


def test_cursor_positions(mixed, small_blocks):
    files, expected = mixed
    positions = [(c.file_index, c.row_group, c.row, c.document_index) for _, c in iter_documents(files)]
    # a.parquet: row groups of 5 and 2 rows; b.jsonl.gz: blocks of 2; c.txt: one; d.parquet: groups of 2.
    assert positions == [
        (0, 0, 1, 1),
        (0, 0, 2, 2),
        (0, 0, 3, 3),
        (0, 0, 4, 4),
        (0, 1, 0, 5),
        (0, 1, 1, 6),
        (1, 0, 0, 7),
        (1, 0, 1, 8),
        (1, 1, 0, 9),
        (1, 1, 1, 10),
        (1, 2, 0, 11),
        (2, 0, 0, 12),
        (3, 0, 0, 13),
        (3, 0, 1, 14),
        (3, 1, 0, 15),
        (3, 1, 1, 16),
        (4, 0, 0, 17),
    ]
    # At the end of a pass: past the last file (no loop), or the start of the next epoch (loop).
    last = list(iter_documents(files))[-1][1]
    assert last == Cursor(epoch=0, file_index=4, row_group=0, row=0, document_index=len(expected))
    looped = next(itertools.islice(iter_documents(files, loop=True), len(expected) - 1, None))[1]
    assert looped == Cursor(epoch=1, file_index=0, row_group=0, row=0, document_index=len(expected))


@pytest.mark.parametrize("tiny", [True, False])
def test_exact_resume_after_every_document(mixed, monkeypatch, tiny):
    if tiny:
        monkeypatch.setattr(readers, "LINE_BLOCK_SIZE", 2)
        monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 2)
    files, expected = mixed
    cursors = [Cursor()] + [cursor for _, cursor in iter_documents(files)]
    for k, cursor in enumerate(cursors):
        saved = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))  # as a checkpoint stores it
        assert texts_of(files, start=saved) == expected[k:], f"resume after {k} documents"


def test_exact_resume_across_epochs(mixed, small_blocks):
    files, expected = mixed
    total = 3 * len(expected)
    stream = list(itertools.islice(iter_documents(files, loop=True), total))
    assert [t for t, _ in stream] == expected * 3
    assert [c.epoch for _, c in stream][len(expected) - 1 :: len(expected)] == [1, 2, 3]
    assert [c.document_index for _, c in stream] == list(range(1, total + 1))
    for k in [1, len(expected) - 1, len(expected), len(expected) + 5, 2 * len(expected)]:
        resumed = itertools.islice(iter_documents(files, loop=True, start=stream[k - 1][1]), total - k)
        assert [(t, c) for t, c in resumed] == stream[k:]


def test_txt_delimiter_documents_and_resume(tmp_path, small_blocks):
    body = "first\nstill first\n\nsecond\n\n\n\nthird ✓\n\n"  # the empty pieces are not documents
    files = [write_bytes(tmp_path / "book.txt.gz", body.encode()), write_bytes(tmp_path / "z.txt", b"x\n\ny")]
    text_format = TextFormat(txt_delimiter="\n\n")
    expected = ["first\nstill first", "second", "third ✓", "x", "y"]
    assert texts_of(files, text_format=text_format) == expected
    cursors = [Cursor()] + [c for _, c in iter_documents(files, text_format=text_format)]
    for k, cursor in enumerate(cursors):
        assert texts_of(files, text_format=text_format, start=cursor) == expected[k:]
    # Without a delimiter each txt file is one document.
    assert texts_of(files) == [body, "x\n\ny"]


def test_txt_delimiter_split_across_reads(tmp_path, monkeypatch):
    # Documents bigger than one 1 MiB read, and a delimiter that straddles two reads.
    first = "a" * (1024 * 1024 - 1)
    second = "b" * (3 * 1024 * 1024)
    path = write_bytes(tmp_path / "big.txt", f"{first}<SEP>{second}<SEP>c".encode())
    assert texts_of([path], text_format=TextFormat(txt_delimiter="<SEP>")) == [first, second, "c"]


def test_jsonl_blank_lines_and_byte_order_mark(tmp_path, small_blocks):
    body = '\ufeff{"text": "one"}\n\n  \n{"text": "two"}\r\n{"text": ""}\n{"text": "four"}'
    path = write_bytes(tmp_path / "x.jsonl", body.encode("utf-8"))
    documents = list(iter_documents([path]))
    assert [t for t, _ in documents] == ["one", "two", "", "four"]  # an empty string is still a document
    assert [(c.row_group, c.row) for _, c in documents[:3]] == [(0, 1), (1, 0), (1, 1)]
    assert texts_of([path], start=documents[1][1]) == ["", "four"]


# ----------------------------------------------------------------------------------------------------------
# Striding across ranks.


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_documents_covering_everything(mixed, small_blocks, world_size):
    files, expected = mixed
    per_rank = [texts_of(files, rank=r, world_size=world_size) for r in range(world_size)]
    for rank, texts in enumerate(per_rank):
        assert texts == expected[rank::world_size]
    everything = [t for texts in per_rank for t in texts]
    assert sorted(everything) == sorted(expected) and len(set(everything)) == len(expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_striding_with_loop_and_resume(mixed, small_blocks, world_size):
    files, expected = mixed
    rank = world_size - 1
    wanted = (expected * 6)[rank::world_size][:30]
    stream = list(itertools.islice(iter_documents(files, rank=rank, world_size=world_size, loop=True), 30))
    assert [t for t, _ in stream] == wanted
    for k in [1, 7, 13, 29]:
        resumed = iter_documents(files, rank=rank, world_size=world_size, loop=True, start=stream[k - 1][1])
        assert [t for t, _ in itertools.islice(resumed, 30 - k)] == wanted[k:]


def test_resume_under_a_different_world_size(mixed, small_blocks):
    # One rank reads 6 documents; 2 ranks continue from its cursor and together read exactly the rest.
    files, expected = mixed
    cursor = list(iter_documents(files))[5][1]
    rank0 = texts_of(files, start=cursor, rank=0, world_size=2)
    rank1 = texts_of(files, start=cursor, rank=1, world_size=2)
    assert rank0 == [expected[i] for i in range(6, len(expected)) if i % 2 == 0]
    assert rank1 == [expected[i] for i in range(6, len(expected)) if i % 2 == 1]


def test_bad_rank_and_cursor(mixed, tmp_path):
    files, _ = mixed
    with pytest.raises(PicochatError, match="rank 2 of world size 2"):
        texts_of(files, rank=2, world_size=2)
    with pytest.raises(PicochatError, match="only 4 files"):
        texts_of(files, start=Cursor(file_index=5))
    with pytest.raises(PicochatError, match="a.parquet: resume position row group 3"):
        texts_of(files, start=Cursor(file_index=0, row_group=3, row=0))
    assert texts_of(files, start=Cursor(file_index=0, row_group=2, row=0, document_index=7)) == texts_of(
        files, start=Cursor(file_index=1, document_index=7)
    )  # the very end of a file is a valid position
    with pytest.raises(PicochatError, match="a.parquet: resume position row group 0, row 6"):
        texts_of(files, start=Cursor(file_index=0, row_group=0, row=6))
    with pytest.raises(PicochatError, match=r"b.jsonl.gz: resume position .* past the end .*5 documents"):
        texts_of(files, start=Cursor(file_index=1, row_group=0, row=9))
    with pytest.raises(PicochatError, match="no data files"):
        texts_of([])


def test_loop_over_files_without_documents_is_an_error(tmp_path):
    files = [write_bytes(tmp_path / "empty.jsonl", b"\n\n"), write_bytes(tmp_path / "empty.txt", b"")]
    assert texts_of(files) == []
    with pytest.raises(PicochatError, match="contain no documents"):
        next(iter_documents(files, loop=True))


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear PicochatError naming the file and the problem.


def truncated_parquet(tmp_path: Path) -> Path:
    path = write_parquet(tmp_path / "cut.parquet", [f"document {i} " * 50 for i in range(200)])
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2])
    return path


def garbage_parquet(tmp_path: Path) -> Path:
    return write_bytes(tmp_path / "garbage.parquet", b"this is not parquet at all" * 10)


def missing_column_parquet(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "cols.parquet", ["a", "b"], column="content", title=pa.array(["x", "y"]))


def integer_column_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": pa.array([1, 2, 3])}), path)
    return path


def null_text_parquet(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "nulls.parquet", ["a", "b", "c", None, "e"], row_group_size=2)


def not_json_jsonl(tmp_path: Path) -> Path:
    return write_bytes(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')


def missing_field_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "fields.jsonl.gz", [{"text": "ok"}, {"content": "x", "id": 3}])


def not_object_jsonl(tmp_path: Path) -> Path:
    return write_bytes(tmp_path / "list.jsonl", b'["text", "a list"]\n')


def non_string_field_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "number.jsonl", [{"text": 42}])


def truncated_gzip(tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "cut.jsonl.gz", [{"text": f"document {i}" * 20} for i in range(500)])
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2])
    return path


BAD_INPUTS = [
    (truncated_parquet, "cut.parquet: not a readable parquet file"),
    (garbage_parquet, "garbage.parquet: not a readable parquet file"),
    (missing_column_parquet, r"cols.parquet: no column 'text' \(columns present: content, title\)"),
    (integer_column_parquet, "ints.parquet: column 'text' has type int64, expected a string type"),
    (null_text_parquet, "nulls.parquet: row group 1, row 1: column 'text' is null"),
    (not_json_jsonl, "bad.jsonl:3: not valid JSON"),
    (missing_field_jsonl, r"fields.jsonl.gz:2: no field 'text' \(fields present: content, id\)"),
    (not_object_jsonl, "list.jsonl:1: expected a JSON object, got list"),
    (non_string_field_jsonl, "number.jsonl:1: field 'text' is int, expected a string"),
    (truncated_gzip, "cut.jsonl.gz: cannot read"),
]


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS, ids=[m.__name__ for m, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(PicochatError, match=message) as caught:
        texts_of([path])
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("make", "message"), BAD_INPUTS, ids=[m.__name__ for m, _ in BAD_INPUTS])
def test_bad_input_through_the_cli(tmp_path, capsys, make, message):
    path = make(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    for action in ["check", "list"]:
        assert main(["data", action, str(path), str(good)]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("picochat: error:") == 1
        assert "Traceback" not in captured.err
        assert "ERROR" in captured.out and "good.jsonl" in captured.out  # the table still lists every file


def test_corrupt_parquet_page_is_a_clear_error(tmp_path):
    path = write_parquet(tmp_path / "flipped.parquet", [f"document {i} " * 40 for i in range(100)])
    body = bytearray(path.read_bytes())
    for i in range(100, 400):  # scribble over the first data page, keep the footer intact
        body[i] ^= 0x5A
    path.write_bytes(bytes(body))
    with pytest.raises(PicochatError, match="flipped.parquet: row group 0: cannot read"):
        texts_of([path])


def test_invalid_utf8_is_replaced_and_warned_once_per_file(tmp_path, warnings):
    jsonl = write_bytes(tmp_path / "a.jsonl", b'{"text": "caf\xe9"}\n{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    txt = write_bytes(tmp_path / "b.txt", b"bad \x80 byte")
    escaped = write_bytes(tmp_path / "c.jsonl", b'{"text": "lone \\ud800 surrogate"}\n')
    assert texts_of([jsonl, txt, escaped]) == [
        "caf\ufffd",
        "ok",
        "\ufffd\ufffd",
        "bad \ufffd byte",
        "lone \ufffd surrogate",
    ]
    assert len(warnings) == 3
    assert "a.jsonl: 2 document(s) had invalid UTF-8" in warnings[0]
    assert "b.txt: 1 document(s)" in warnings[1] and "U+FFFD" in warnings[1]
    assert "c.jsonl: 1 document(s)" in warnings[2]


def test_a_50_megabyte_line_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as file:
        file.write(b'{"text": "short"}\n{"text": "')
        file.write(b"x" * (50 * 1024 * 1024))
        file.write(b'"}\n')
    with pytest.raises(PicochatError, match=r"huge.jsonl:2: line is longer than max_document_bytes=33554432"):
        texts_of([path])
    # Memory stays bounded by the limit, not by the line: with a 1 MiB limit the 50 MB line costs ~1 MiB.
    tracemalloc.start()
    try:
        with pytest.raises(PicochatError, match=r"huge.jsonl:2: line is longer than .*=1048576"):
            texts_of([path], text_format=TextFormat(max_document_bytes=1024 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
    # Raising the limit makes the same file readable.
    raised = TextFormat(max_document_bytes=64 * 1024 * 1024)
    assert [len(t) for t in texts_of([path], text_format=raised)] == [5, 50 * 1024 * 1024]


def test_long_documents_in_every_format(tmp_path):
    small = TextFormat(max_document_bytes=100, txt_delimiter="\n\n")
    parquet = write_parquet(tmp_path / "p.parquet", ["ok", "y" * 101, "ok"], row_group_size=2)
    with pytest.raises(PicochatError, match=r"p.parquet: row group 0, row 1: document of 101 bytes .*=100 "):
        texts_of([parquet], text_format=small)
    txt = write_bytes(tmp_path / "t.txt", b"one\n\ntwo\nlines\n\n" + b"z" * 500 + b"\n\nend")
    with pytest.raises(PicochatError, match=r"t.txt:6: the document starting on this line is longer"):
        texts_of([txt], text_format=small)
    whole = write_bytes(tmp_path / "w.txt.gz", b"w" * 101)
    with pytest.raises(PicochatError, match=r"w.txt.gz:1: the document \(the whole file\) is longer"):
        texts_of([whole], text_format=TextFormat(max_document_bytes=100))
    exactly = write_bytes(tmp_path / "e.jsonl", b'{"text": "' + b"e" * 88 + b'"}\r\n')  # 100 bytes + CRLF
    assert texts_of([exactly], text_format=small) == ["e" * 88]


def test_text_format_validation():
    with pytest.raises(PicochatError, match="--text-column"):
        TextFormat(text_column="")
    with pytest.raises(PicochatError, match="--txt-delimiter"):
        TextFormat(txt_delimiter="")
    with pytest.raises(PicochatError, match="--max-document-bytes"):
        TextFormat(max_document_bytes=0)


def test_other_text_column(tmp_path):
    parquet = write_parquet(tmp_path / "p.parquet", ["p1", "p2"], column="content")
    jsonl = write_jsonl(tmp_path / "j.jsonl", [{"content": "j1"}])
    assert texts_of([parquet, jsonl], text_format=TextFormat(text_column="content")) == ["p1", "p2", "j1"]


# ----------------------------------------------------------------------------------------------------------
# Summaries and the CLI.


def test_summaries(mixed):
    files, expected = mixed
    for path in files:
        documents = [t for t in expected if t.startswith(path.name[0] + " ")]
        for summary in [summarize_file(path), check_file(path)]:
            assert summary.documents == len(documents)
            assert summary.characters == sum(len(t) for t in documents)
            assert summary.size_bytes == path.stat().st_size
    assert summarize_file(files[0], count_characters=False).characters is None


def test_cli_list_and_check(mixed, capsys, monkeypatch):
    files, expected = mixed
    folder = files[0].parent
    write_parquet(folder / "val_0.parquet", ["held out"])
    assert main(["data", "list", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["a.parquet"][:3] == ["a.parquet", "train", "7"]
    assert lines["b.jsonl.gz"][:3] == ["b.jsonl.gz", "train", "5"]
    assert lines["val_0.parquet"][:4] == ["val_0.parquet", "val", "1", "8"]
    assert main(["data", "check", str(folder)]) == 0
    assert "TOTAL" in capsys.readouterr().out
    # Without paths: the data folder (--data-dir, or $PICOCHAT_DATA_DIR).
    assert main(["data", "list", "--data-dir", str(folder), "--no-characters"]) == 0
    assert "d.parquet" in capsys.readouterr().out
    monkeypatch.setenv("PICOCHAT_DATA_DIR", str(folder))
    assert main(["data", "check"]) == 0
    capsys.readouterr()


def test_cli_reading_flags(tmp_path, capsys):
    write_parquet(tmp_path / "p.parquet", ["p1", "p2"], column="content")
    write_bytes(tmp_path / "t.txt", b"one\n\ntwo\n\nthree")
    assert main(["data", "check", str(tmp_path), "--text-column", "content", "--txt-delimiter", r"\n\n"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[3].split()[:3] == ["t.txt", "val", "3"]
    flags = ["--text-column", "content", "--max-document-bytes"]
    assert main(["data", "check", str(tmp_path), *flags, "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("picochat: error:") == 1 and "max_document_bytes=1 " in err
    assert main(["data", "check", str(tmp_path), *flags, "1K"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data"], "missing action"),
        (["data", "list", "--data-dir", "/nonexistent/picochat"], "does not exist"),
        (["data", "check", "/nonexistent/file.parquet"], "no such file or folder"),
        (["data", "check", "--text-column", ""], "--text-column"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("picochat: error:") == 1 and message in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# Real data (the small validation files, to stay fast).


def test_real_validation_files(data_dir):
    pretrain = data_dir / "pretrain"
    files = [pretrain / "wikipedia_en/val_00000.parquet", pretrain / "gutenberg_books/val_00000.parquet"]
    expected = []
    for path in files:
        expected += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    documents = list(iter_documents(files))
    assert [t for t, _ in documents] == expected
    assert documents[-1][1].document_index == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    for k in [1, 300, len(expected) - 3]:
        assert texts_of(files, start=documents[k - 1][1]) == expected[k:]
    rank0, rank1 = (texts_of(files, rank=r, world_size=2) for r in range(2))
    assert rank0 == expected[0::2] and rank1 == expected[1::2]
    assert all(isinstance(t, str) and t for t in expected)


def test_real_data_list_and_check(data_dir, capsys):
    folder = data_dir / "pretrain/wikipedia_en"
    assert main(["data", "list", str(folder), "--no-characters"]) == 0
    out = capsys.readouterr().out
    totals = {
        line.split()[1]: int(line.split()[3].replace(",", "")) for line in out.splitlines() if line.startswith("TOTAL")
    }
    train, val = split_train_val(find_text_files([folder]))
    assert totals == {
        "train": sum(pq.ParquetFile(f).metadata.num_rows for f in train),
        "val": sum(pq.ParquetFile(f).metadata.num_rows for f in val),
    }
    assert [f.name for f in val] == ["val_00000.parquet"]
    web = data_dir / "pretrain/c4_demo.jsonl"
    assert main(["data", "check", str(folder / "val_00000.parquet"), str(web)]) == 0
    capsys.readouterr()


def test_default_pretraining_files_are_the_parquet_shards(data_dir):
    from picochat.data import default_pretraining_files

    files = default_pretraining_files(data_dir)
    assert files and all(f.suffix == ".parquet" for f in files)
    names = {f.parent.name for f in files}
    assert names == {"wikipedia_en", "gutenberg_books"}
    train, val = split_train_val(files)
    assert {f.name for f in val} == {"val_00000.parquet"} and len(val) == 2 and len(train) == 9


def test_default_pretraining_files_errors(tmp_path):
    from picochat.data import default_pretraining_files

    with pytest.raises(PicochatError, match="does not exist"):
        default_pretraining_files(tmp_path / "missing")
    (tmp_path / "notes.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(PicochatError, match="no .parquet shards found"):
        default_pretraining_files(tmp_path)
