"""Reading one data file: parquet / jsonl / txt turned into *chunks* of documents, each format by its own reader.

picochat/data.py orders the documents of many files into one global sequence (cursors, rank striding,
epochs); this module reads a single file from a position (row group, row) and hands over only the texts
of one rank.

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
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
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
            raise PicochatError("--txt-delimiter: expected a non-empty string (omit it for one document per file)")
        if self.max_document_bytes < 1:
            raise PicochatError(f"--max-document-bytes: expected a size >= 1, got {self.max_document_bytes}")


def has_supported_suffix(name: str) -> bool:
    return name.endswith(SUPPORTED_SUFFIXES)


def unsupported_file_error(path: Path) -> PicochatError:
    return PicochatError(f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


# ----------------------------------------------------------------------------------------------------------
# Reading: every format is turned into *chunks*. A chunk is a run of consecutive documents inside ONE row
# group / block; it carries only this rank's texts (the others are never decoded), plus enough positions for
# the caller to build cursors.


@dataclass
class Chunk:
    row_group: int
    first_row: int  # row (inside the row group) of the chunk's first document
    num_documents: int  # documents in the chunk, all ranks together
    offset: int  # texts[k] is the document at row first_row + offset + k * world_size
    texts: list[str]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _first_owned(document_index: int, rank: int, world_size: int) -> int:
    # The first j >= 0 with (document_index + j) % world_size == rank.
    return (rank - document_index) % world_size


def _string_column_type_ok(pa, arrow_type) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_ = pa.types
    return is_.is_string(arrow_type) or is_.is_large_string(arrow_type) or is_.is_string_view(arrow_type)


def open_parquet(path: Path, text_format: TextFormat):
    """Open a parquet file and check its text column; returns the ParquetFile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise PicochatError(f"{path}: not a readable parquet file ({one_line(error)})") from None
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


def check_parquet_batch(column, path: Path, row_group: int, first_row: int, text_format: TextFormat):
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
    path: Path,
    text_format: TextFormat,
    start_row_group: int,
    start_row: int,
    document_index: int,
    rank: int,
    world_size: int,
) -> Iterator[Chunk]:
    import pyarrow as pa

    parquet_file = open_parquet(path, text_format)
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
                    column = check_parquet_batch(column, path, row_group, first_row, text_format)
                    offset = _first_owned(document_index, rank, world_size)
                    owned = column if world_size == 1 else column[offset::world_size]
                    yield Chunk(row_group, first_row, len(column), offset, owned.to_pylist())
                    document_index += len(column)
                    row += batch_rows
            except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
                message = f"{path}: row group {row_group}: cannot read ({one_line(error)})"
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
        raise PicochatError(f"{path}: cannot open ({error.strerror or one_line(error)})") from None


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
            f"{path}:{line_number}: no field {field!r} (fields present: {present}); choose one with --text-column"
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
    path: Path,
    text_format: TextFormat,
    start_row_group: int,
    start_row: int,
    document_index: int,
    rank: int,
    world_size: int,
) -> Iterator[Chunk]:
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

    def make_chunk() -> Chunk:
        row_group, first_row = divmod(number - len(pending), LINE_BLOCK_SIZE)
        offset = _first_owned(document_index, rank, world_size)
        texts = [to_text(line_number, raw) for line_number, raw in pending[offset::world_size]]
        return Chunk(row_group, first_row, len(pending), offset, texts)

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
        raise PicochatError(f"{path}: cannot read ({one_line(error)})") from None
    finally:
        if decode.bad_documents:
            warn(
                f"{path}: {decode.bad_documents} document(s) had invalid UTF-8; the bad bytes were replaced with U+FFFD"
            )


def file_chunks(
    path: Path,
    text_format: TextFormat,
    start_row_group: int,
    start_row: int,
    document_index: int,
    rank: int,
    world_size: int,
) -> Iterator[Chunk]:
    if not has_supported_suffix(path.name):
        raise unsupported_file_error(path)
    reader = _parquet_chunks if path.name.endswith(".parquet") else _record_chunks
    return reader(path, text_format, start_row_group, start_row, document_index, rank, world_size)
