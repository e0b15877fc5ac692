"""Documents for pretraining: text from local parquet / jsonl / txt files, in one deterministic order.

A *document* is one training text: a parquet row (the `text` column), a jsonl line (the `text` field), or a
txt file (or one piece of it, when the file is split on a delimiter). All documents of a list of files form
one global sequence:

    files in the given order  ->  row groups in file order  ->  rows in row-group order

and `iter_documents` walks that sequence. Three things are built on the global order:

- **Cursor**: the position (file, row group, row) of the next document to read, plus `document_index`, how
  many documents of the global sequence come before it. Saving a cursor and passing it back as `start`
  continues exactly after the last document read: no document lost, none repeated.
- **Striding across ranks**: rank r of N reads the documents whose global index i satisfies i % N == r.
  The ranks read disjoint documents whose union is everything, and because the rule only depends on the
  global index, a cursor saved by one world size resumes correctly under another.
- **Epochs**: with loop=True the sequence repeats forever and the cursor's `epoch` counts the passes;
  `document_index` keeps counting across epochs.

What a "row group" is, per format (it is what makes a cursor cheap to resume):
- parquet: the file's own row groups. Resuming opens the file and seeks straight to the row group (the
  footer says where it is); rows before the cursor inside that row group are decoded and dropped. A row group
  is streamed in batches of PARQUET_BATCH_ROWS rows, so a shard is never held in memory whole.
- jsonl / txt: fixed blocks of LINE_BLOCK_SIZE documents (document k of a file is in block k // 1024, row
  k % 1024). These formats have no index, so resuming re-scans the file from its start: skipped lines are
  only counted (bounded readline), not parsed as JSON or decoded, which costs roughly a read of the bytes.

Policies (user data is often messy; each choice is explicit, none is a silent skip):
- Invalid UTF-8 in jsonl / txt: the bad bytes are replaced with U+FFFD and `warn()` is called once per file
  with the number of documents affected. (Parquet string columns are UTF-8 by definition; a column that is not
  a string type is an error.)
- Blank lines in jsonl (whitespace only) are not records and are not counted. Empty pieces of a txt file
  split on a delimiter (e.g. after a trailing delimiter) and empty txt files are not documents.
  An empty string in a parquet row or a jsonl field *is* a document (the file says so explicitly).
- A document (parquet value, jsonl line, txt document) longer than `max_document_bytes` is an error naming
  the file and line / row, never a hang or an out-of-memory: lines are read with readline(limit + 1).
- Any unreadable, truncated or malformed file raises PicochatError with one line naming the file and the
  problem (the CLI prints it without a traceback).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from picochat.common import PicochatError, warn

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt", ".txt.gz")

LINE_BLOCK_SIZE = 1024  # documents per "row group" of a jsonl / txt file (as in nanochat's parquet shards)
PARQUET_BATCH_ROWS = 1024  # rows decoded at once from a parquet row group (bounds memory on huge row groups)
CHUNK_BYTES = 8 * 1024 * 1024  # a jsonl / txt chunk ends after this many raw bytes (bounds memory)
DEFAULT_MAX_DOCUMENT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class TextFormat:
    """Where the text is inside a file."""

    text_column: str = "text"  # parquet column / jsonl field holding the document
    txt_delimiter: str | None = None  # None: a txt file is one document; else split documents on this
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # longer documents / lines are an error, not a hang

    def __post_init__(self) -> None:
        if not self.text_column:
            raise PicochatError("--text-column: expected a non-empty column / field name")
        if self.txt_delimiter is not None and not self.txt_delimiter:
            raise PicochatError(
                "--txt-delimiter: expected a non-empty string (omit it for one document per file)"
            )
        if self.max_document_bytes < 1:
            raise PicochatError(f"--max-document-bytes: expected a size >= 1, got {self.max_document_bytes}")


# ----------------------------------------------------------------------------------------------------------
# Finding files and splitting them into train / validation.


def _has_supported_suffix(name: str) -> bool:
    return name.endswith(SUPPORTED_SUFFIXES)


def _unsupported(path: Path) -> PicochatError:
    return PicochatError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


def find_text_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Supported files among `paths`; folders are searched recursively (following symlinks, skipping hidden
    names such as `.cache` or half-written `.x.tmp` files). Returns a deterministic sorted list without
    duplicates. A missing path, an explicitly named unsupported file or finding nothing is a PicochatError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, Path] = {}  # resolved path -> path as the user spelled it (dedups ./a and a)
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            visited: set[Path] = set()
            for folder, subfolders, filenames in os.walk(path, followlinks=True):
                real = Path(folder).resolve()
                if real in visited:  # a symlink loop: stop descending
                    subfolders[:] = []
                    continue
                visited.add(real)
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                for name in filenames:
                    if not name.startswith(".") and _has_supported_suffix(name):
                        file = Path(folder) / name
                        found.setdefault(file.resolve(), file)
        elif path.is_file():
            if not _has_supported_suffix(path.name):
                raise _unsupported(path)
            found.setdefault(path.resolve(), path)
        else:
            raise PicochatError(f"{path}: no such file or folder")
    if not found:
        named = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise PicochatError(f"no data files ({', '.join(SUPPORTED_SUFFIXES)}) found in {named}")
    return sorted(found.values(), key=lambda p: p.parts)


def default_pretraining_files(data_dir: str | os.PathLike) -> list[Path]:
    """The pretraining corpus when the user names no files: every parquet shard under the data folder.

    Parquet is what the standard sets come as (`picochat data download` puts them in <data_dir>/<dataset>/),
    while jsonl / txt files in a data folder are often something else (evaluation or chat data), so those are
    used only when named explicitly.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PicochatError(
            f"data folder {data_dir} does not exist: set --data-dir or $PICOCHAT_DATA_DIR, give files, "
            "or fetch shards with `picochat data download`"
        )
    shards = sorted(path for path in data_dir.rglob("*.parquet") if path.is_file())
    if not shards:
        raise PicochatError(
            f"{data_dir}: no .parquet shards found; give text files or folders explicitly, "
            "or fetch shards with `picochat data download`"
        )
    return shards


def split_train_val(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split by file, so train and validation never share a document: files whose name starts with "val" are
    validation; if there are none and at least 2 files, the last file is validation (nanochat's convention
    for `shard_*` folders). The order of `files` is kept in both lists."""
    files = [Path(f) for f in files]
    val = [f for f in files if f.name.startswith("val")]
    if not val and len(files) >= 2:
        val = [files[-1]]
    val_set = set(val)
    train = [f for f in files if f not in val_set]
    return train, val


# ----------------------------------------------------------------------------------------------------------
# The cursor.


@dataclass
class Cursor:
    """Position of the NEXT document to read (see the module docstring)."""

    epoch: int = 0
    file_index: int = 0
    row_group: int = 0  # parquet row group; for jsonl / txt the block of LINE_BLOCK_SIZE documents
    row: int = 0  # row inside the row group / block
    document_index: int = 0  # documents of the global order (all ranks) before this position

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Cursor:
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PicochatError(f"data cursor: expected the fields {names}, got {got}")
        for name in names:
            value = data[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PicochatError(f"data cursor: field {name!r} must be an integer >= 0, got {value!r}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------
# Reading: every format is turned into *chunks*. A chunk is a run of consecutive documents inside ONE row
# group / block; it carries only this rank's texts (the others are never decoded), plus enough positions for
# the caller to build cursors.


@dataclass
class _Chunk:
    row_group: int
    first_row: int  # row (inside the row group) of the chunk's first document
    num_documents: int  # documents in the chunk, all ranks together
    offset: int  # texts[k] is the document at row first_row + offset + k * world_size
    texts: list[str]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _first_owned(document_index: int, rank: int, world_size: int) -> int:
    # The first j >= 0 with (document_index + j) % world_size == rank.
    return (rank - document_index) % world_size


def _string_column_type_ok(pa, arrow_type) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_ = pa.types
    return is_.is_string(arrow_type) or is_.is_large_string(arrow_type) or is_.is_string_view(arrow_type)


def _open_parquet(path: Path, text_format: TextFormat):
    """Open a parquet file and check its text column; returns the ParquetFile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise PicochatError(f"{path}: not a readable parquet file ({_one_line(error)})") from None
    schema = parquet_file.schema_arrow
    column = text_format.text_column
    if column not in schema.names:
        parquet_file.close()
        raise PicochatError(
            f"{path}: no column {column!r} (columns present: {', '.join(schema.names) or 'none'}); "
            "choose one with --text-column"
        )
    arrow_type = schema.field(column).type
    if not _string_column_type_ok(pa, arrow_type):
        parquet_file.close()
        raise PicochatError(f"{path}: column {column!r} has type {arrow_type}, expected a string type")
    return parquet_file


def _check_parquet_batch(column, path: Path, row_group: int, first_row: int, text_format: TextFormat):
    """Nulls and oversized documents are errors; returns the column with dictionary / view types decoded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    where = f"{path}: row group {row_group}, row"
    if column.null_count:
        row = first_row + pc.indices_nonzero(pc.is_null(column))[0].as_py()
        raise PicochatError(f"{where} {row}: column {text_format.text_column!r} is null, expected a string")
    lengths = pc.binary_length(column)
    limit = text_format.max_document_bytes
    if len(column) and pc.max(lengths).as_py() > limit:
        row = first_row + pc.indices_nonzero(pc.greater(lengths, limit))[0].as_py()
        size = lengths[row - first_row].as_py()
        raise PicochatError(
            f"{where} {row}: document of {size} bytes is longer than max_document_bytes={limit} "
            "(raise it with --max-document-bytes)"
        )
    return column


def _parquet_chunks(
    path: Path, text_format: TextFormat, start_row_group: int, start_row: int,
    document_index: int, rank: int, world_size: int,
) -> Iterator[_Chunk]:
    import pyarrow as pa

    parquet_file = _open_parquet(path, text_format)
    try:
        metadata = parquet_file.metadata
        num_row_groups = metadata.num_row_groups
        _check_start_in_parquet(path, metadata, start_row_group, start_row)
        for row_group in range(start_row_group, num_row_groups):
            skip = start_row if row_group == start_row_group else 0
            row = 0  # row (inside the row group) of the batch's first row
            try:
                batches = parquet_file.iter_batches(
                    batch_size=PARQUET_BATCH_ROWS, row_groups=[row_group], columns=[text_format.text_column]
                )
                for batch in batches:
                    column = batch.column(0)
                    batch_rows = len(column)
                    if row + batch_rows <= skip:  # entirely before the resume position
                        row += batch_rows
                        continue
                    if row < skip:
                        column = column.slice(skip - row)
                    first_row = max(row, skip)
                    column = _check_parquet_batch(column, path, row_group, first_row, text_format)
                    offset = _first_owned(document_index, rank, world_size)
                    owned = column if world_size == 1 else column[offset::world_size]
                    yield _Chunk(row_group, first_row, len(column), offset, owned.to_pylist())
                    document_index += len(column)
                    row += batch_rows
            except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
                message = f"{path}: row group {row_group}: cannot read ({_one_line(error)})"
                raise PicochatError(message) from None
    finally:
        parquet_file.close()


def _check_start_in_parquet(path: Path, metadata, start_row_group: int, start_row: int) -> None:
    # A cursor may point at an existing row, or at the very end of a row group / file (nothing left there).
    num_row_groups = metadata.num_row_groups
    if start_row_group < num_row_groups:
        rows = metadata.row_group(start_row_group).num_rows
        if start_row <= rows:
            return
    elif start_row_group == num_row_groups and start_row == 0:
        return
    raise PicochatError(
        f"{path}: resume position row group {start_row_group}, row {start_row} is past the end of the file "
        f"({num_row_groups} row groups, {metadata.num_rows} rows); did the data change since it was saved?"
    )


# jsonl and txt: a file is read as a stream of raw *records* (line number, bytes), bounded in size.


def _open_binary(path: Path):
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb", buffering=1024 * 1024)
    except OSError as error:
        raise PicochatError(f"{path}: cannot open ({error.strerror or _one_line(error)})") from None


def _too_long(path: Path, line_number: int, what: str, limit: int) -> PicochatError:
    return PicochatError(
        f"{path}:{line_number}: {what} is longer than max_document_bytes={limit} bytes "
        "(raise it with --max-document-bytes)"
    )


def _jsonl_records(path: Path, limit: int) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers. readline(limit + 2) never reads more than the limit
    plus a line ending, however long the line really is."""
    with _open_binary(path) as file:
        line_number = 0
        while True:
            line = file.readline(limit + 2)
            if not line:
                return
            line_number += 1
            content = len(line) - (2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0)
            if content > limit:
                raise _too_long(path, line_number, "line", limit)
            if line_number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not text
                line = line[3:]
            if line.isspace() or not line:
                continue
            yield line_number, line


def _txt_records(path: Path, delimiter: str | None, limit: int) -> Iterator[tuple[int, bytes]]:
    """Documents of a txt file as raw bytes, with the line number where each starts. Without a delimiter the
    whole file is one document; with one, the byte stream is split on the delimiter's UTF-8 bytes (safe: a
    valid UTF-8 sequence never matches inside another character), holding at most one document in memory."""
    with _open_binary(path) as file:
        if delimiter is None:
            data = file.read(limit + 1)
            if len(data) > limit:
                raise _too_long(path, 1, "the document (the whole file)", limit)
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if data:
                yield 1, data
            return
        separator = delimiter.encode("utf-8")
        buffer = bytearray()
        line_number = 1  # line on which the document in `buffer` starts
        search_from = 0
        at_start = True
        while True:
            data = file.read(1024 * 1024)
            if at_start and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            at_start = False
            buffer += data
            while True:
                end = buffer.find(separator, search_from)
                if end < 0:
                    break
                if end > limit:
                    raise _too_long(path, line_number, "the document starting on this line", limit)
                piece = bytes(buffer[:end])
                del buffer[: end + len(separator)]
                if piece:
                    yield line_number, piece
                line_number += piece.count(b"\n") + separator.count(b"\n")
                search_from = 0
            # Only the last len(separator) - 1 bytes can start a separator completed by the next read.
            search_from = max(0, len(buffer) - len(separator) + 1)
            if len(buffer) > limit + len(separator):
                raise _too_long(path, line_number, "the document starting on this line", limit)
            if not data:
                break
        if len(buffer) > limit:
            raise _too_long(path, line_number, "the document starting on this line", limit)
        if buffer:
            yield line_number, bytes(buffer)


class _Utf8Decoder:
    """Decode bytes as UTF-8; invalid bytes become U+FFFD and are counted (warned once per file)."""

    def __init__(self) -> None:
        self.bad_documents = 0

    def __call__(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_documents += 1
            return raw.decode("utf-8", errors="replace")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _jsonl_text(path: Path, line_number: int, raw: bytes, decode: _Utf8Decoder, field: str) -> str:
    try:
        record = json.loads(decode(raw))
    except json.JSONDecodeError as error:
        message = f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})"
        raise PicochatError(message) from None
    if not isinstance(record, dict):
        raise PicochatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        present = ", ".join(map(str, record)) or "none"
        raise PicochatError(
            f"{path}:{line_number}: no field {field!r} (fields present: {present}); "
            "choose one with --text-column"
        )
    text = record[field]
    if not isinstance(text, str):
        kind = type(text).__name__
        raise PicochatError(f"{path}:{line_number}: field {field!r} is {kind}, expected a string")
    if b"\\u" in raw and not text.isascii():
        # JSON escapes can spell lone surrogates (\\ud800), which are not text and break every tokenizer.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            decode.bad_documents += 1
            text = _LONE_SURROGATE.sub("\ufffd", text)
    return text


def _record_chunks(
    path: Path, text_format: TextFormat, start_row_group: int, start_row: int,
    document_index: int, rank: int, world_size: int,
) -> Iterator[_Chunk]:
    """Chunks of a jsonl / txt file. Records before the resume position are counted, never parsed."""
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    limit = text_format.max_document_bytes
    if is_jsonl:
        records = _jsonl_records(path, limit)
    else:
        records = _txt_records(path, text_format.txt_delimiter, limit)
    decode = _Utf8Decoder()

    def to_text(line_number: int, raw: bytes) -> str:
        if is_jsonl:
            return _jsonl_text(path, line_number, raw, decode, text_format.text_column)
        return decode(raw)

    skip = start_row_group * LINE_BLOCK_SIZE + start_row
    number = 0  # index (inside the file) of the next record
    pending: list[tuple[int, bytes]] = []
    pending_bytes = 0

    def make_chunk() -> _Chunk:
        row_group, first_row = divmod(number - len(pending), LINE_BLOCK_SIZE)
        offset = _first_owned(document_index, rank, world_size)
        texts = [to_text(line_number, raw) for line_number, raw in pending[offset::world_size]]
        return _Chunk(row_group, first_row, len(pending), offset, texts)

    try:
        for line_number, raw in records:
            if number < skip:
                number += 1
                continue
            pending.append((line_number, raw))
            pending_bytes += len(raw)
            number += 1
            if number % LINE_BLOCK_SIZE == 0 or pending_bytes >= CHUNK_BYTES:
                chunk = make_chunk()
                document_index += chunk.num_documents
                pending, pending_bytes = [], 0
                yield chunk
        if number < skip:
            raise PicochatError(
                f"{path}: resume position row group {start_row_group}, row {start_row} is past the end "
                f"of the file ({number} documents); did the data change since it was saved?"
            )
        if pending:
            yield make_chunk()
    except (OSError, EOFError, zlib.error) as error:  # truncated / corrupt gzip, I/O errors
        raise PicochatError(f"{path}: cannot read ({_one_line(error)})") from None
    finally:
        if decode.bad_documents:
            warn(
                f"{path}: {decode.bad_documents} document(s) had invalid UTF-8; "
                "the bad bytes were replaced with U+FFFD"
            )


def _file_chunks(path: Path, text_format: TextFormat, start_row_group: int, start_row: int,
                 document_index: int, rank: int, world_size: int) -> Iterator[_Chunk]:
    if not _has_supported_suffix(path.name):
        raise _unsupported(path)
    reader = _parquet_chunks if path.name.endswith(".parquet") else _record_chunks
    return reader(path, text_format, start_row_group, start_row, document_index, rank, world_size)


# ----------------------------------------------------------------------------------------------------------
# The global sequence.


def iter_documents(
    files: Sequence[str | os.PathLike],
    *,
    text_format: TextFormat = TextFormat(),
    start: Cursor | None = None,
    rank: int = 0,
    world_size: int = 1,
    loop: bool = False,
) -> Iterator[tuple[str, Cursor]]:
    """Yield (text, cursor_after) for this rank's documents (global index % world_size == rank), in the global
    order. cursor_after is where reading resumes to continue exactly after this document. After the last
    document of a pass, the cursor points past the last file (loop=False) or at the start of the next epoch
    (loop=True); both resume correctly with loop=True."""
    files = [Path(f) for f in files]
    if not files:
        raise PicochatError("no data files to read")
    if world_size < 1 or not 0 <= rank < world_size:
        raise PicochatError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
    start = start or Cursor()
    if min(start.epoch, start.file_index, start.row_group, start.row, start.document_index) < 0:
        raise PicochatError(f"data cursor {start.to_dict()}: fields must be non-negative")
    if start.file_index > len(files):
        raise PicochatError(
            f"data cursor points at file {start.file_index} but there are only {len(files)} files; "
            "did the data change since it was saved?"
        )
    epoch, file_index = start.epoch, start.file_index
    row_group, row, document_index = start.row_group, start.row, start.document_index
    pass_from_start = file_index == 0 and row_group == 0 and row == 0
    documents_this_pass = 0

    while True:
        if file_index >= len(files):  # end of a pass
            if not loop:
                return
            if pass_from_start and documents_this_pass == 0:
                raise PicochatError(f"the {len(files)} data files contain no documents")
            epoch, file_index, row_group, row = epoch + 1, 0, 0, 0
            pass_from_start, documents_this_pass = True, 0

        last_file = file_index == len(files) - 1
        if last_file and loop:
            end_of_file = (epoch + 1, 0)  # (epoch, file_index) of the position after the file's last document
        else:
            end_of_file = (epoch, file_index + 1)

        path = files[file_index]
        chunks = _file_chunks(path, text_format, row_group, row, document_index, rank, world_size)
        try:
            chunk = next(chunks, None)
            while chunk is not None:
                # Look one chunk ahead: the position after a chunk's last document is where the next
                # chunk starts.
                following = next(chunks, None)
                for k, text in enumerate(chunk.texts):
                    j = chunk.offset + k * world_size
                    index_after = document_index + j + 1
                    if j + 1 < chunk.num_documents:
                        row_after = chunk.first_row + j + 1
                        after = Cursor(epoch, file_index, chunk.row_group, row_after, index_after)
                    elif following is not None:
                        next_group, next_row = following.row_group, following.first_row
                        after = Cursor(epoch, file_index, next_group, next_row, index_after)
                    else:
                        after = Cursor(end_of_file[0], end_of_file[1], 0, 0, index_after)
                    yield text, after
                document_index += chunk.num_documents
                documents_this_pass += chunk.num_documents
                chunk = following
        finally:
            chunks.close()  # release the file now (and emit its UTF-8 warning), not whenever GC runs
        file_index, row_group, row = file_index + 1, 0, 0


# ----------------------------------------------------------------------------------------------------------
# Summaries for `picochat data list` and `picochat data check`.


@dataclass
class FileSummary:
    path: Path
    documents: int
    characters: int | None  # None when not counted
    size_bytes: int


def summarize_file(path: str | os.PathLike, text_format: TextFormat = TextFormat(), *,
                   count_characters: bool = True) -> FileSummary:
    """Documents / characters / size of one file, cheaply: a parquet file's document count comes from its
    footer (instant) and its characters from a vectorized count over the column; jsonl / txt are read."""
    path = Path(path)
    size_bytes = path.stat().st_size if path.exists() else 0
    if not path.name.endswith(".parquet"):
        return check_file(path, text_format)
    import pyarrow as pa
    import pyarrow.compute as pc

    parquet_file = _open_parquet(path, text_format)
    try:
        metadata = parquet_file.metadata
        documents = metadata.num_rows
        characters = None
        if count_characters:  # reads the column, so the values are checked (nulls, sizes) as when training
            characters = 0
            for row_group in range(metadata.num_row_groups):
                row = 0
                try:
                    for batch in parquet_file.iter_batches(batch_size=8192, row_groups=[row_group],
                                                           columns=[text_format.text_column]):
                        column = _check_parquet_batch(batch.column(0), path, row_group, row, text_format)
                        characters += pc.sum(pc.utf8_length(column)).as_py() or 0
                        row += len(column)
                except (pa.ArrowException, OSError) as error:
                    message = f"{path}: row group {row_group}: cannot read ({_one_line(error)})"
                    raise PicochatError(message) from None
    finally:
        parquet_file.close()
    return FileSummary(path, documents, characters, size_bytes)


def check_file(path: str | os.PathLike, text_format: TextFormat = TextFormat()) -> FileSummary:
    """Read every document of one file (all the checks above apply); returns its summary."""
    path = Path(path)
    documents = characters = 0
    for text, _ in iter_documents([path], text_format=text_format):
        documents += 1
        characters += len(text)
    return FileSummary(path, documents, characters, path.stat().st_size)
