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

How each format is read -- what a row group is per format, and the policies for messy data (invalid UTF-8,
blank lines, oversized documents, malformed files) -- is in picochat/readers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from picochat.common import PicochatError
from picochat.readers import (
    SUPPORTED_SUFFIXES,
    TextFormat,
    check_parquet_batch,
    file_chunks,
    has_supported_suffix,
    one_line,
    open_parquet,
    unsupported_file_error,
)

DEFAULT_TEXT_FORMAT = TextFormat()  # frozen: one shared default is safe


# ----------------------------------------------------------------------------------------------------------
# Finding files and splitting them into train / validation.


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
                    if not name.startswith(".") and has_supported_suffix(name):
                        file = Path(folder) / name
                        found.setdefault(file.resolve(), file)
        elif path.is_file():
            if not has_supported_suffix(path.name):
                raise unsupported_file_error(path)
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
    row_group: int = 0  # parquet row group; for jsonl / txt the block of readers.LINE_BLOCK_SIZE documents
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
# The global sequence.


def iter_documents(
    files: Sequence[str | os.PathLike],
    *,
    text_format: TextFormat = DEFAULT_TEXT_FORMAT,
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
        chunks = file_chunks(path, text_format, row_group, row, document_index, rank, world_size)
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


def summarize_file(
    path: str | os.PathLike, text_format: TextFormat = DEFAULT_TEXT_FORMAT, *, count_characters: bool = True
) -> FileSummary:
    """Documents / characters / size of one file, cheaply: a parquet file's document count comes from its
    footer (instant) and its characters from a vectorized count over the column; jsonl / txt are read."""
    path = Path(path)
    size_bytes = path.stat().st_size if path.exists() else 0
    if not path.name.endswith(".parquet"):
        return check_file(path, text_format)
    import pyarrow as pa
    import pyarrow.compute as pc

    parquet_file = open_parquet(path, text_format)
    try:
        metadata = parquet_file.metadata
        documents = metadata.num_rows
        characters = None
        if count_characters:  # reads the column, so the values are checked (nulls, sizes) as when training
            characters = 0
            for row_group in range(metadata.num_row_groups):
                row = 0
                try:
                    for batch in parquet_file.iter_batches(
                        batch_size=8192, row_groups=[row_group], columns=[text_format.text_column]
                    ):
                        column = check_parquet_batch(batch.column(0), path, row_group, row, text_format)
                        characters += pc.sum(pc.utf8_length(column)).as_py() or 0
                        row += len(column)
                except (pa.ArrowException, OSError) as error:
                    message = f"{path}: row group {row_group}: cannot read ({one_line(error)})"
                    raise PicochatError(message) from None
    finally:
        parquet_file.close()
    return FileSummary(path, documents, characters, size_bytes)


def check_file(path: str | os.PathLike, text_format: TextFormat = DEFAULT_TEXT_FORMAT) -> FileSummary:
    """Read every document of one file (all the checks above apply); returns its summary."""
    path = Path(path)
    documents = characters = 0
    for text, _ in iter_documents([path], text_format=text_format):
        documents += 1
        characters += len(text)
    return FileSummary(path, documents, characters, path.stat().st_size)
