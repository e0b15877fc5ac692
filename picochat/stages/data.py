"""`picochat data list | check | download`: see what text a folder holds, validate it, fetch public shards.

    picochat data list  [PATH ...]   files, train/val split, documents, characters, size (a table on stdout)
    picochat data check [PATH ...]   read every document of every file; exit 0 when all are clean
    picochat data download --dataset climbmix --num-shards 8

Without PATHs, list and check look in the data folder (--data-dir, else $PICOCHAT_DATA_DIR, else
$PICOCHAT_HOME/data). Only the standard library is imported here; the work is in picochat/data.py and
picochat/download.py.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DATA_DIR_HELP = "the data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)"


def _byte_count(text: str) -> int:
    """'33554432', '64M', '64MiB', '1G' -> bytes (K/M/G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)(?:i?[Bb])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a byte count like 33554432 or 64M, got {text!r}")
    return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")

    # Flags shared by list and check (where the files are and how to read them).
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or folders to read (default: every parquet shard under the data folder)",
    )
    reading.add_argument("--data-dir", help=DATA_DIR_HELP)
    reading.add_argument("--text-column", default="text", help="parquet column / jsonl field with the text")
    reading.add_argument(
        "--txt-delimiter",
        default=None,
        help=r"split txt files into documents on this string (\n \t \r \\ understood); "
        "default: one document per file",
    )
    reading.add_argument(
        "--max-document-bytes", type=_byte_count, default=None, help="longest document / line accepted (default 32M)"
    )

    list_parser = actions.add_parser(
        "list",
        parents=[reading],
        help="list data files with document counts",
        description="List data files: split, documents, characters, size.",
    )
    list_parser.add_argument(
        "--no-characters",
        action="store_true",
        help="don't count characters (that reads every parquet file; documents come from the footer)",
    )
    actions.add_parser(
        "check",
        parents=[reading],
        help="read every document and report problems",
        description="Read every document of every file; exit 0 when all are clean.",
    )

    download = actions.add_parser(
        "download",
        help="download public pretraining shards",
        description="Download parquet shards (Hugging Face, or a URL template).",
    )
    download.add_argument(
        "--dataset", default=None, help="climbmix (default) or fineweb-edu; with --url-template, a folder name"
    )
    which = download.add_mutually_exclusive_group()
    which.add_argument("--num-shards", type=int, help="download the first N train shards")
    which.add_argument("--shards", help="shard indices to download, e.g. '0-9,12'")
    download.add_argument("--url-template", help="any source, e.g. 'https://host/path/shard_{index:05d}.parquet'")
    download.add_argument("--data-dir", help=DATA_DIR_HELP)
    download.add_argument("--dest", help="destination folder (default: <data dir>/<dataset>)")
    download.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    download.add_argument("--retries", type=int, default=5, help="retries per file on transient errors (default 5)")
    download.add_argument(
        "--retry-delay", type=float, default=1.0, help="first retry delay in seconds, doubled each retry (default 1)"
    )
    download.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    download.add_argument("--sha256-manifest", help="verify files against 'sha256  filename' lines")


def _unescape(text: str) -> str:
    r"""Turn the escapes people type on a command line (\n, \t, \r, \\) into the characters."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: table.get(m.group(1), m.group(0)), text)


def _text_format(args):
    from picochat.data import TextFormat

    options = {"text_column": args.text_column}
    if args.txt_delimiter is not None:
        options["txt_delimiter"] = _unescape(args.txt_delimiter)
    if args.max_document_bytes is not None:
        options["max_document_bytes"] = args.max_document_bytes
    return TextFormat(**options)


def _find_files(args) -> tuple[list[Path], list[Path]]:
    """(files, roots): the given paths, else the data folder."""
    from picochat.common import resolve_data_dir
    from picochat.data import default_pretraining_files, find_text_files

    if args.paths:
        roots = [Path(p) for p in args.paths]
        return find_text_files(roots), roots
    data_dir = resolve_data_dir(args.data_dir)
    return default_pretraining_files(data_dir), [data_dir]


def _display_name(path: Path, roots: list[Path]) -> str:
    for root in roots:
        if root.is_dir():
            try:
                return str(path.relative_to(root))
            except ValueError:
                continue
    return str(path)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""  # unreachable


def _describe(args, full_check: bool) -> int:
    from picochat.common import PicochatError, print_table, progress
    from picochat.data import check_file, split_train_val, summarize_file

    text_format = _text_format(args)
    files, roots = _find_files(args)
    train, val = split_train_val(files)
    split_of = {**{f: "train" for f in train}, **{f: "val" for f in val}}
    rows, problems = [], []
    totals = {"train": [0, 0, 0], "val": [0, 0, 0]}
    for path in progress(files, desc="check" if full_check else "list", unit="file"):
        row = {"file": _display_name(path, roots), "split": split_of[path]}
        try:
            if full_check:
                summary = check_file(path, text_format)
            else:
                summary = summarize_file(path, text_format, count_characters=not args.no_characters)
        except PicochatError as error:
            problems.append(str(error))
            row.update(documents="?", characters="?", size=_human_bytes(path.stat().st_size), status="ERROR")
            rows.append(row)
            continue
        characters = "-" if summary.characters is None else f"{summary.characters:,}"
        row.update(
            documents=f"{summary.documents:,}",
            characters=characters,
            size=_human_bytes(summary.size_bytes),
            status="ok",
        )
        rows.append(row)
        total = totals[split_of[path]]
        total[0] += summary.documents
        total[1] += summary.characters or 0
        total[2] += summary.size_bytes
    for split, (documents, characters, size) in totals.items():
        counted = "-" if getattr(args, "no_characters", False) else f"{characters:,}"
        rows.append(
            {
                "file": f"TOTAL {split}",
                "split": split,
                "documents": f"{documents:,}",
                "characters": counted,
                "size": _human_bytes(size),
                "status": "",
            }
        )
    print(print_table(rows, ["file", "split", "documents", "characters", "size", "status"]))
    if problems:
        # The table shows which files; the one error line says what is wrong with the first.
        if len(problems) == 1:
            raise PicochatError(problems[0])
        raise PicochatError(f"{len(problems)} of {len(files)} files have problems; first: {problems[0]}")
    return 0


def _download(args) -> int:
    from picochat.common import resolve_data_dir
    from picochat.download import download_files, plan_downloads, read_sha256_manifest

    name = args.dataset or ("custom" if args.url_template else "climbmix")
    downloads = plan_downloads(name, num_shards=args.num_shards, shards=args.shards, url_template=args.url_template)
    dest = Path(args.dest) if args.dest else resolve_data_dir(args.data_dir) / name
    manifest = read_sha256_manifest(args.sha256_manifest) if args.sha256_manifest else None
    results = download_files(
        downloads,
        dest,
        workers=args.workers,
        retries=args.retries,
        retry_base_delay=args.retry_delay,
        timeout=args.timeout,
        sha256_manifest=manifest,
    )
    print(f"{len(results)} files in {dest}")
    return 0


def run(args: argparse.Namespace) -> int:
    from picochat.common import PicochatError

    action = getattr(args, "data_action", None)
    if action == "list":
        return _describe(args, full_check=False)
    if action == "check":
        return _describe(args, full_check=True)
    if action == "download":
        return _download(args)
    raise PicochatError("missing action: picochat data list | check | download (see picochat data --help)")
