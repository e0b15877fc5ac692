"""CORE's inputs: the eval bundle (task list, random baselines, item files; downloaded when missing), the items
a run evaluates and their few-shot prompts -- steps 1 to 3 of the protocol that picochat/evaluation/core.py
describes. Everything here is plain text and JSON; the model and torch only come in at the rows (core.py)."""

from __future__ import annotations

import csv
import os
import random
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, log, picochat_home, read_jsonl, resolve_data_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # items of a task are shuffled with this seed before max_per_task cuts them
FEWSHOT_SEED = 1234  # item i draws its shots with random.Random(FEWSHOT_SEED + i)


# ----------------------------------------------------------------------------------------------------------
# The eval bundle: core.yaml + eval_meta_data.csv + eval_data/<category>/<task>.jsonl


@dataclass(frozen=True)
class CoreTask:
    label: str
    dataset_uri: str  # path of the jsonl file under <bundle>/eval_data/
    num_fewshot: int
    task_type: str  # one of TASK_TYPES
    continuation_delimiter: str
    random_baseline: float  # percent


def load_core_tasks(core_dir: str | os.PathLike) -> list[CoreTask]:
    """The tasks of core.yaml with their random baselines from eval_meta_data.csv, in core.yaml's order."""
    import yaml

    core_dir = Path(core_dir)
    config_path = core_dir / "core.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PicochatError(f"{config_path}: cannot read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise PicochatError(f"{config_path}: not valid YAML ({str(error).splitlines()[0]})") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PicochatError(f"{config_path}: expected a non-empty list under 'icl_tasks'")
    baselines = load_random_baselines(core_dir / "eval_meta_data.csv")

    tasks = []
    for number, entry in enumerate(entries):
        where = f"{config_path}: icl_tasks[{number}]"
        if not isinstance(entry, dict):
            raise PicochatError(f"{where}: expected a mapping with label, dataset_uri, num_fewshot, icl_task_type")
        label, uri, task_type = entry.get("label"), entry.get("dataset_uri"), entry.get("icl_task_type")
        delimiter = entry.get("continuation_delimiter", " ")
        shots = entry.get("num_fewshot")
        shots = shots[0] if isinstance(shots, list) and len(shots) == 1 else shots  # llm-foundry writes [k]
        for name, value in (("label", label), ("dataset_uri", uri), ("continuation_delimiter", delimiter)):
            if not isinstance(value, str) or (not value and name != "continuation_delimiter"):
                raise PicochatError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
        if task_type not in TASK_TYPES:
            raise PicochatError(f"{where} ({label}): icl_task_type {task_type!r}, expected one of {TASK_TYPES}")
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise PicochatError(
                f"{where} ({label}): num_fewshot must be [k] with k >= 0, got {entry.get('num_fewshot')!r}"
            )
        if label not in baselines:
            raise PicochatError(f"{core_dir / 'eval_meta_data.csv'}: no 'Random baseline' row for task {label!r}")
        tasks.append(CoreTask(label, uri, shots, task_type, delimiter, baselines[label]))
    labels = [task.label for task in tasks]
    if len(set(labels)) != len(labels):
        raise PicochatError(f"{config_path}: a task label appears twice")
    return tasks


def load_random_baselines(path: Path) -> dict[str, float]:
    """Task label -> random baseline in percent, from the 'Eval Task' and 'Random baseline' columns."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError as error:
        raise PicochatError(f"{path}: cannot read ({error.strerror or error})") from None
    baselines = {}
    for line, row in enumerate(rows, start=2):
        if "Eval Task" not in row or "Random baseline" not in row:
            raise PicochatError(f"{path}: expected the columns 'Eval Task' and 'Random baseline'")
        try:
            value = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise PicochatError(
                f"{path}:{line}: 'Random baseline' must be a number, got {row['Random baseline']!r}"
            ) from None
        if not 0 <= value < 100:
            raise PicochatError(f"{path}:{line}: 'Random baseline' must be a percentage below 100, got {value}")
        baselines[row["Eval Task"]] = value
    return baselines


def task_data_path(core_dir: str | os.PathLike, task: CoreTask) -> Path:
    return Path(core_dir) / "eval_data" / task.dataset_uri


def load_task_items(path: str | os.PathLike, task_type: str) -> list[dict]:
    """The items of one task file (one JSON object per line), checked against the task type's fields; a bad line
    is an error naming file:line."""
    path = Path(path)
    items = []
    for number, item in read_jsonl(path, objects=True):  # a blank line is not an item (and is not counted)
        _check_item(item, task_type, f"{path}:{number}")
        items.append(item)
    if not items:
        raise PicochatError(f"{path}: no items")
    return items


def _check_item(item: Any, task_type: str, where: str) -> None:
    def fail(expected: str) -> None:
        raise PicochatError(f"{where}: a {task_type} item needs {expected}")

    if not isinstance(item, dict):
        fail("to be a JSON object")
    if task_type == "multiple_choice":
        choices = item.get("choices")
        if not isinstance(item.get("query"), str):
            fail('"query": string')
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            fail('"choices": non-empty list of strings')
        if not _is_index(item.get("gold"), len(choices)):
            fail(f'"gold": an index into the {len(choices)} choices')
    elif task_type == "schema":
        options = item.get("context_options")
        if not isinstance(options, list) or not options or not all(isinstance(c, str) for c in options):
            fail('"context_options": non-empty list of strings')
        if not isinstance(item.get("continuation"), str):
            fail('"continuation": string')
        if not _is_index(item.get("gold"), len(options)):
            fail(f'"gold": an index into the {len(options)} context options')
    else:
        if not isinstance(item.get("context"), str) or not isinstance(item.get("continuation"), str):
            fail('"context" and "continuation": strings')


def _is_index(value: Any, length: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < length


def resolve_core_dir(
    core_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    url: str = EVAL_BUNDLE_URL,
) -> Path:
    """Where the CORE files are: --core-dir, else <data_dir>/core_eval, else $PICOCHAT_HOME/eval_bundle,
    downloading the bundle there first if it is not there yet."""
    if core_dir is not None:
        core_dir = Path(core_dir).expanduser()
        if not (core_dir / "core.yaml").is_file():
            raise PicochatError(f"--core-dir {core_dir}: no core.yaml there (expected an eval bundle folder)")
        return core_dir
    shared = resolve_data_dir(data_dir) / "core_eval"
    if (shared / "core.yaml").is_file():
        return shared
    bundle = picochat_home() / "eval_bundle"
    if (bundle / "core.yaml").is_file():
        return bundle
    return download_eval_bundle(url, bundle)


def download_eval_bundle(url: str, destination: str | os.PathLike) -> Path:
    """Fetch the bundle zip and unpack it into `destination` (atomically: a folder rename at the end)."""
    from picochat.download import download_file

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    zip_path = destination.parent / "eval_bundle.zip"
    log(f"downloading the CORE eval bundle from {url}")
    download_file(url, zip_path)
    work = destination.parent / f".{destination.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:  # the zip is deleted whatever happens: unpacked, or refused (a rerun then fetches it again)
        try:
            with zipfile.ZipFile(zip_path) as archive:
                for name in archive.namelist():
                    parts = Path(name).parts
                    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                        raise PicochatError(f"{url}: unsafe path {name!r} in the archive")
                archive.extractall(work)
        except zipfile.BadZipFile as error:
            raise PicochatError(f"{url}: not a zip file ({error})") from None
        # The reference zip holds one top folder (eval_bundle/); accept the files at the top level too.
        found = sorted(work.rglob("core.yaml"), key=lambda p: len(p.parts))
        if not found:
            raise PicochatError(f"{url}: the archive has no core.yaml")
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(found[0].parent, destination)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
    log(f"eval bundle ready in {destination}")
    return destination


# ----------------------------------------------------------------------------------------------------------
# Items -> prompts


def select_items(items: list[dict], max_per_task: int | None) -> list[dict]:
    """The items evaluated: shuffled with random.Random(1337), then the first max_per_task (all if None or <= 0)."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    if max_per_task is not None and max_per_task > 0:
        items = items[:max_per_task]
    return items


def fewshot_indices(index: int, num_items: int, num_fewshot: int) -> list[int]:
    """The shots of item `index`: random.Random(1234 + index).sample(every other index, k).

    With fewer than k other items (a tiny max_per_task), all other items are drawn, in sampled order.
    """
    if num_fewshot <= 0:
        return []
    others = [i for i in range(num_items) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, min(num_fewshot, len(others)))


def render_prompts(item: dict, task: CoreTask, shots: Sequence[dict]) -> list[str]:
    """The prompt texts of one item (step 3 of the protocol in core.py's docstring).

    multiple_choice: one per choice; schema: one per context option; language_modeling: [without, with] the
    continuation.
    """
    delimiter = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    # language_modeling: contexts are stripped (some datasets carry trailing whitespace), and the prompt without
    # the continuation is stripped as a whole, so that its tokens are a clean prefix of the full prompt's.
    head = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]
