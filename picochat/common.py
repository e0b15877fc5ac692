"""Things every stage needs: user-facing errors, paths, flag parsers, atomic writes and readers, logging, progress.

One rule runs through this file: library code never prints. It logs through `log()` (rank 0 only, one
logger named "picochat") and shows long work with `progress()` (a tqdm bar with rate and ETA, rank 0 only).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class PicochatError(Exception):
    """A mistake the user can fix (bad flag, missing file, malformed data).

    The CLI prints the message as one line, `picochat: error: <message>`, and exits with status 2 — no traceback.
    Messages should say which file / field / flag is wrong and what was expected.
    """


def typable_command(program: str = "picochat", module: str = "picochat") -> str:
    """How the user types one of this environment's console scripts (`picochat`, `torchrun`) in the shell that
    started us: the bare name when that name on $PATH is this environment's own script; otherwise its full path
    (a virtual environment that was never activated, as runs/cpu.sh makes); `python -m module` as a last resort."""
    installed = Path(sys.executable).parent / program  # not resolved: a venv's python is a symlink out of the venv
    on_path = shutil.which(program)
    if on_path and installed.exists() and Path(on_path).resolve() == installed.resolve():
        return program
    if installed.exists():
        return shlex.quote(str(installed.absolute()))
    return f"{shlex.quote(sys.executable)} -m {module}"


# ----------------------------------------------------------------------------------------------------------
# Paths. Runs live in $PICOCHAT_HOME/runs/<name>; shared data shards in $PICOCHAT_HOME/data unless the user
# names another folder (--data-dir or $PICOCHAT_DATA_DIR).


def picochat_home() -> Path:
    """$PICOCHAT_HOME, default ~/.cache/picochat. Not created here (creating folders is work)."""
    return Path(os.environ.get("PICOCHAT_HOME") or Path.home() / ".cache" / "picochat").expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: the explicit argument, else $PICOCHAT_DATA_DIR, else $PICOCHAT_HOME/data."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("PICOCHAT_DATA_DIR"):
        return Path(os.environ["PICOCHAT_DATA_DIR"]).expanduser()
    return picochat_home() / "data"


def resolve_run_dir(run: str | None = None, run_dir: str | os.PathLike | None = None) -> Path:
    """The run folder: --run-dir PATH wins, else $PICOCHAT_HOME/runs/<run> (default run name: "default")."""
    if run_dir:
        return Path(run_dir).expanduser()
    name = run or "default"
    if not name or "/" in name or name in (".", ".."):
        raise PicochatError(f"--run {name!r}: expected a plain folder name (use --run-dir for a path)")
    return picochat_home() / "runs" / name


def add_run_arguments(parser: argparse.ArgumentParser, default_name: str = "default") -> None:
    """--run NAME / --run-dir PATH, the same on every command (resolve_run_dir reads them)."""
    parser.add_argument("--run", help=f"run name: the folder $PICOCHAT_HOME/runs/<run> (default: {default_name})")
    parser.add_argument("--run-dir", help="run folder path (overrides --run)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """What every training stage takes besides its settings: where the run is, the data, --resume and --device."""
    add_run_arguments(parser)
    parser.add_argument("--data-dir", help="data folder (default: $PICOCHAT_DATA_DIR or $PICOCHAT_HOME/data)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        type=resume_step,
        metavar="STEP",
        help="continue from the latest checkpoint (or from STEP), exactly; flags not given again are "
        "taken from the run's config.json",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")


def add_model_arguments(parser: argparse.ArgumentParser, stage_help: str = "which model of the run") -> None:
    """--run/--run-dir plus --stage and --step: which trained model a command loads (checkpoint.find_stage_dir)."""
    add_run_arguments(parser)
    parser.add_argument("--stage", choices=["base", "mid", "sft", "rl"],
                        help=f"{stage_help} (default: the newest stage that has weights)")  # fmt: skip
    parser.add_argument("--step", type=non_negative_int, help="checkpoint step of that stage (default: its latest "
                        "weights)")  # fmt: skip


def add_tool_argument(parser: argparse.ArgumentParser) -> None:
    """--tool: what runs the model's <|python_start|> calls (tools.tool_named turns the name into the function)."""
    parser.add_argument("--tool", choices=["calculator", "python", "none"], default="calculator",
                        help="what runs the model's <|python_start|> calls: the calculator (default), sandboxed "
                        "Python, nothing")  # fmt: skip


def resume_step(text: str) -> str | int:
    """The value of --resume [STEP]: "latest" (the flag alone) or a checkpoint step."""
    return text if text == "latest" else non_negative_int(text)


def number_parser(kind: type, minimum: float | None = None, maximum: float | None = None, *,
                  strict_minimum: bool = False):  # fmt: skip
    """An argparse `type` for numbers of `kind` (int or float) within bounds: a bad value is a usage error (exit
    status 2) that says what was expected. "_" separators are accepted (--tokens 1_000_000)."""

    def parse(text: str):
        try:
            value = kind(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'number' if kind is float else 'whole number'}, "
                                             f"got {text!r}") from None  # fmt: skip
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
            raise argparse.ArgumentTypeError(f"expected a value {'>' if strict_minimum else '>='} {minimum}, "
                                             f"got {text!r}")  # fmt: skip
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected a value <= {maximum}, got {text!r}")
        return value

    return parse


def nonempty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


positive_int = number_parser(int, 1)
non_negative_int = number_parser(int, 0)
positive_float = number_parser(float, 0, strict_minimum=True)
non_negative_float = number_parser(float, 0)
fraction = number_parser(float, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same folder, fsync, then rename over the target. A crash
# leaves either the old file or the new one, never half of one.


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX; a no-op elsewhere).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# Reading: the one reader of each format picochat's own files use (text, JSON, JSONL). Every problem is a
# PicochatError naming the file (and line).


def open_text(path: Path):
    """A text file for reading, gzip-aware (by the .gz suffix), UTF-8 with a byte order mark tolerated."""
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as error:
        raise PicochatError(f"{path}: cannot open ({error.strerror or error})") from None


def read_text(path: Path) -> str:
    try:
        with open_text(path) as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise PicochatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, EOFError) as error:  # e.g. a truncated or corrupt .gz
        raise PicochatError(f"{path}: cannot read ({error})") from None


def read_json(path: str | os.PathLike) -> Any:
    """The value a JSON file holds."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except ValueError as error:
        raise PicochatError(f"{path}: unreadable ({' '.join(str(error).split())})") from None


def read_jsonl(path: str | os.PathLike, *, objects: bool = False, cut_off_ok: bool = False) -> Iterator[tuple]:
    """(line number, parsed value) for every non-blank line of a .jsonl / .jsonl.gz file. objects: every line must
    be a JSON object. cut_off_ok: a last line that is not JSON (a writer killed mid-line) is skipped with a
    warning rather than an error."""
    path = Path(path)
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other characters splitlines() breaks on.
    lines = read_text(path).split("\n")
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            if cut_off_ok and number == last:
                warn(f"{path}:{number}: skipping a cut-off last line")
                return
            problem = "not a JSON object" if objects else "not valid JSON"
            raise PicochatError(f"{path}:{number}: {problem} ({error.msg} at column {error.colno})") from None
        if objects and not isinstance(value, dict):
            raise PicochatError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value


# ----------------------------------------------------------------------------------------------------------
# Logging and progress: the one place output is produced.

_logger = logging.getLogger("picochat")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is logged, not the stream of the first call.

    Test runners and progress bars swap sys.stderr; a handler holding on to an old (closed) stream would fail.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Called once by the CLI. Messages go to stderr so stdout stays clean for tables and JSON lines."""
    if _logger.handlers:
        return
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s picochat: %(message)s", datefmt="%H:%M:%S"))
    _logger.addHandler(handler)
    _logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    _logger.propagate = False


def log(message: str, *, all_ranks: bool = False) -> None:
    """Log one informational line (rank 0 only unless all_ranks)."""
    from picochat.hardware import is_main_process

    if all_ranks or is_main_process():
        _logger.info(message)


def warn(message: str) -> None:
    from picochat.hardware import is_main_process

    if is_main_process():
        _logger.warning("warning: " + message)


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    disable: bool | None = None,
) -> Iterator[T]:
    """A tqdm progress bar (rate and ETA) on rank 0; silent on other ranks and when PICOCHAT_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    from picochat.hardware import is_main_process

    if disable is None:
        disable = not is_main_process() or os.environ.get("PICOCHAT_NO_PROGRESS") == "1"
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        dynamic_ncols=True,
        # When stderr is not a terminal (CI, logs) redraw rarely so logs are not flooded.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Format rows of dicts as an aligned plain-text table (returned, so stages decide where it goes)."""
    if not rows:
        return ""
    columns = columns or list(rows[0].keys())

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# The compiler backend behind every torch.compile picochat makes (model, optimizer updates, FlexAttention).
# "inductor" generates kernels and is what a GPU run uses. The CPU tests choose "aot_eager" through the environment:
# it runs the same graph capture and autograd tracing (where graph breaks, recompiles and untraceable code show up)
# without generating C++ kernels, which costs minutes per model on a 2-core machine.
_COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def compile_backend() -> str:
    """$PICOCHAT_COMPILE_BACKEND (inductor | aot_eager | eager), default inductor."""
    name = os.environ.get("PICOCHAT_COMPILE_BACKEND", "").strip() or "inductor"
    if name not in _COMPILE_BACKENDS:
        raise PicochatError(f"$PICOCHAT_COMPILE_BACKEND={name!r}: expected one of {', '.join(_COMPILE_BACKENDS)}")
    return name
