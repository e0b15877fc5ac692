"""The report card of a run: <run>/report.md with <run>/report/*.png, rebuilt from scratch every time.

Everything comes from the structured files the stages write -- never from logs:

    tokenizer/config.json      how the tokenizer was trained            eval/tokenizer.json   its compression
    <stage>/config.json        the stage's flags, derived plan ("derived"), data files ("data") and provenance
    <stage>/metrics.jsonl      one JSON event per line: {"event": "train", "step", "loss", "smooth_loss",
                               "training_seconds", "elapsed_seconds", ...}, {"event": "eval", "step", "val_bpb"},
                               {"event": "sample", "step", "samples": [{"prompt", "completion"}]}
    eval/*.json                one evaluation each: {"kind", "stage", "step", "metrics": {name: value}, ...}

Stages are base, mid, sft and rl, each optional. The summary table has a column per stage (BASE | SFT | RL, and
MID when there is one) and a row per metric found in eval/*.json; metric names are matched without regard to
case or punctuation (so "ARC-Easy", "arc_easy" and "arceasy" are the same row):

    CORE, bpb (the run's validation text), ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE

When several files report a metric for the same stage, the one of the highest step wins (then the newest file).
Missing files and missing keys leave a "-" in the table; a line of metrics.jsonl that is not JSON is an error
naming the file and line, except a cut-off last line (a run killed mid-write), which is skipped with a warning.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, atomic_write_bytes, atomic_write_text, read_json, read_jsonl

STAGES = [("base", "BASE"), ("mid", "MID"), ("sft", "SFT"), ("rl", "RL")]
ALWAYS_SHOWN = {"base", "sft", "rl"}  # the summary's columns even when a stage has not run yet
METRIC_ROWS = [  # (row name, normalized names that fill it)
    ("CORE", {"core"}),
    ("bpb", {"bpb", "valbpb"}),
    ("ARC-Easy", {"arceasy", "arce"}),
    ("ARC-Challenge", {"arcchallenge", "arcc"}),
    ("MMLU", {"mmlu"}),
    ("GSM8K", {"gsm8k"}),
    ("HumanEval", {"humaneval"}),
    ("ChatCORE", {"chatcore"}),
]
# Rough on-demand prices per GPU-hour (USD) for the cost estimate; --hourly-cost overrides.
GPU_HOURLY_USD = [("h200", 3.5), ("h100", 3.0), ("a100", 1.8), ("l40s", 1.0), ("a10", 0.75), ("l4", 0.5)]
PLOTS = {"loss": "training loss", "bpb": "validation bits per byte"}


def normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl ([] if there is none; a cut-off last line is skipped)."""
    if not path.is_file():
        return []
    return [event for _, event in read_jsonl(path, objects=True, cut_off_ok=True)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


@dataclass
class EvalValue:
    value: float
    step: int
    source: str  # file name under eval/
    label: str  # the row name, or e.g. "CORE-18" when the file says it covers fewer tasks
    modified: float


def collect_eval_metrics(run_dir: Path) -> dict[str, dict[str, EvalValue]]:
    """stage -> row name -> the value to show (see the module docstring for the choice)."""
    table: dict[str, dict[str, EvalValue]] = {}
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return table
    rows = {alias: name for name, aliases in METRIC_ROWS for alias in aliases}
    for path in sorted(eval_dir.glob("*.json")):
        document = read_json(path)
        if not isinstance(document, dict) or not isinstance(document.get("stage"), str):
            continue  # not a model evaluation (e.g. eval/tokenizer.json)
        metrics = document.get("metrics")
        if not isinstance(metrics, dict):
            continue
        step = document.get("step") if isinstance(document.get("step"), int) else -1
        for name, value in metrics.items():
            row = rows.get(normalize(str(name)))
            number = _number(value)
            if row is None or number is None:
                continue
            label = document.get("metric") if row == "CORE" and isinstance(document.get("metric"), str) else row
            candidate = EvalValue(number, step, path.name, label, path.stat().st_mtime)
            current = table.setdefault(document["stage"], {}).get(row)
            if current is None or (candidate.step, candidate.modified) >= (current.step, current.modified):
                table[document["stage"]][row] = candidate
    return table


def latest_eval_document(run_dir: Path, kind: str, stage: str) -> dict[str, Any] | None:
    """The eval/*.json of this kind and stage with the highest step (then the newest)."""
    best, best_key = None, None
    for path in sorted((run_dir / "eval").glob(f"{kind}_*.json")):
        document = read_json(path)
        if not isinstance(document, dict) or document.get("kind") != kind or document.get("stage") != stage:
            continue
        key = (document["step"] if isinstance(document.get("step"), int) else -1, path.stat().st_mtime)
        if best_key is None or key >= best_key:
            best, best_key = document, key
    return best


@dataclass
class StageSummary:
    name: str
    config: dict[str, Any]
    events: list[dict[str, Any]]
    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None
    training_seconds: float | None = None
    wall_seconds: float | None = None
    final_loss: float | None = None
    min_val_bpb: float | None = None
    world_size: int = 1
    device: str | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)


def summarize_stage(stage_dir: Path) -> StageSummary:
    config_path = stage_dir / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise PicochatError(f"{config_path}: expected a JSON object")
    events = read_events(stage_dir / "metrics.jsonl")
    summary = StageSummary(stage_dir.name, config, events)
    derived = config.get("derived") if isinstance(config.get("derived"), dict) else {}
    provenance = config.get("provenance") if isinstance(config.get("provenance"), dict) else {}
    summary.world_size = provenance.get("world_size") if isinstance(provenance.get("world_size"), int) else 1
    summary.device = provenance.get("device") if isinstance(provenance.get("device"), str) else None

    train = [e for e in events if e.get("event", "train") == "train" and isinstance(e.get("step"), int)]
    if train:
        last = train[-1]
        summary.steps = last["step"]
        summary.final_loss = _number(last.get("smooth_loss", last.get("loss")))
        summary.training_seconds = _number(last.get("training_seconds"))
        # elapsed_seconds restarts when a run is resumed: add up the last value of every session.
        wall, previous = 0.0, None
        for event in train:
            elapsed = _number(event.get("elapsed_seconds"))
            if elapsed is None:
                continue
            if previous is not None and elapsed < previous:
                wall += previous
            previous = elapsed
        summary.wall_seconds = wall + previous if previous is not None else None
        batch = derived.get("total_batch_size")
        if isinstance(batch, int):
            summary.tokens = summary.steps * batch
            flops_per_token = _number(derived.get("flops_per_token"))
            summary.flops = summary.tokens * flops_per_token if flops_per_token else None
    bpbs = [_number(e.get("val_bpb", e.get("bpb"))) for e in events]
    bpbs = [b for b in bpbs if b is not None]
    summary.min_val_bpb = min(bpbs) if bpbs else None
    sampled = [e for e in events if isinstance(e.get("samples"), list)]
    if sampled:
        for sample in sampled[-1]["samples"]:
            if isinstance(sample, dict):
                summary.samples.append((str(sample.get("prompt", "")), str(sample.get("completion", ""))))
            else:
                summary.samples.append(("", str(sample)))
    return summary


# ----------------------------------------------------------------------------------------------------------
# The machine and the code


def git_info(folder: Path) -> dict[str, str]:
    """Branch, commit, dirty flag and message of the git checkout holding `folder` (read-only git commands)."""

    def git(*arguments: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "branch": git("rev-parse", "--abbrev-ref", "HEAD") or "?",
        "commit": commit,
        "dirty": "yes" if status else "no",
        "message": git("log", "-1", "--format=%s") or "",
    }


def system_info() -> dict[str, str]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "CPUs": str(os.cpu_count()),
    }
    try:
        info["memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["GPUs"] = f"{len(names)} x {names[0]} ({memory:.0f} GiB)" + (" (mixed)" if len(set(names)) > 1 else "")
        info["CUDA"] = str(torch.version.cuda)
    else:
        info["GPUs"] = "none"
    return info


def hourly_cost(summary: StageSummary, override: float | None) -> tuple[float | None, str]:
    """(USD per hour of the machine that trained the stage, how it was found)."""
    if override is not None:
        return override, f"${override:g}/hour (--hourly-cost)"
    if not summary.device or not summary.device.startswith("cuda"):
        return None, "n/a (not trained on GPUs; give --hourly-cost)"
    import torch

    provenance = summary.config.get("provenance")
    name = provenance.get("gpu_name") if isinstance(provenance, dict) else None
    if not isinstance(name, str) and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)  # assume the report runs where the stage ran
    for pattern, price in GPU_HOURLY_USD:
        if isinstance(name, str) and pattern in name.lower():
            return price * summary.world_size, f"{summary.world_size} x {name} at ${price:g}/GPU-hour"
    return None, "n/a (unknown GPU; give --hourly-cost)"


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend state)


def plot_curves(series: dict[str, tuple[list[float], list[float]]], title: str, ylabel: str) -> bytes:
    """A PNG of one line per label; x is the step."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PicochatError("the report's plots need matplotlib (pip install matplotlib)") from None
    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    for label, (steps, values) in series.items():
        faint = label.endswith("(raw)")  # raw training loss under its smoothed curve
        axes.plot(
            steps,
            values,
            label=label,
            linewidth=1.0 if faint else 1.6,
            alpha=0.45 if faint else 1.0,
            marker="o" if len(steps) <= 30 else None,
            markersize=3,
        )
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def curve(events: list[dict[str, Any]], keys: tuple[str, ...], event_kind: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the first key present in each event of this kind."""
    steps, values = [], []
    for event in events:
        if event.get("event", "train") != event_kind or not isinstance(event.get("step"), int):
            continue
        value = next((_number(event[k]) for k in keys if k in event), None)
        if value is not None:
            steps.append(event["step"])
            values.append(value)
    return steps, values


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, short text) for every leaf; long lists are summarised."""
    if isinstance(config, dict):
        rows = []
        for key, value in config.items():
            rows += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(config, list):
        text = ", ".join(str(v) for v in config)
        if len(text) > 100 or any(isinstance(v, (dict, list)) for v in config):
            shown = ", ".join(str(v) for v in config[:2])
            text = f"{len(config)} items: {shown}" + (", ..." if len(config) > 2 else "")
        return [(prefix, text or "[]")]
    text = json.dumps(config) if config is None or isinstance(config, bool) else str(config)
    return [(prefix, text if len(text) <= 100 else text[:97] + "...")]


def fenced(text: str) -> str:
    """A code block that the text cannot close (model output is shown as text, never as markdown)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------------------
# The report


def build_report(run_dir: str | os.PathLike, *, hourly_cost_usd: float | None = None) -> Path:
    """Write <run>/report.md and its plots; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"run folder {run_dir} does not exist (give --run NAME or --run-dir PATH)")
    stages = {name: summarize_stage(run_dir / name) for name, _ in STAGES if (run_dir / name).is_dir()}
    evals = collect_eval_metrics(run_dir)
    if not stages and not evals and not (run_dir / "tokenizer").is_dir():
        raise PicochatError(f"{run_dir}: nothing to report (no tokenizer/, stage folders or eval/ results)")

    out = [
        f"# picochat report card: {run_dir.name}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from the files in `{run_dir}`.",
        "",
    ]

    out += ["## Environment", ""]
    from picochat import __version__

    environment = {"picochat": __version__}
    git = git_info(Path(__file__).resolve().parent)
    if git:
        environment["git"] = f"{git['branch']} @ {git['commit']} (uncommitted changes: {git['dirty']}) {git['message']}"
    environment.update(system_info())
    out += [markdown_table(["", ""], [[k, v] for k, v in environment.items()]), ""]

    # Summary: metrics by stage, then time and cost.
    columns = [(name, title) for name, title in STAGES if name in ALWAYS_SHOWN or name in stages or name in evals]
    out += ["## Summary", ""]
    rows = []
    for row_name, _ in METRIC_ROWS:
        values = [evals.get(name, {}).get(row_name) for name, _ in columns]
        if any(v is not None for v in values):
            label = next((v.label for v in values if v is not None and v.label != row_name), row_name)
            rows.append([label] + ["-" if v is None else v.value for v in values])
    if rows:
        out += [markdown_table(["metric"] + [title for _, title in columns], rows), ""]
    else:
        out += ["No evaluation results yet (`picochat eval core|bpb` writes them to eval/).", ""]
    total_training = sum(s.training_seconds or 0.0 for s in stages.values())
    total_wall = sum(s.wall_seconds or 0.0 for s in stages.values())
    costs = []
    for summary in stages.values():
        price, _ = hourly_cost(summary, hourly_cost_usd)
        if price is not None and summary.wall_seconds is not None:
            costs.append(price * summary.wall_seconds / 3600)
    out += [
        f"Training time {_duration(total_training)}, wall time {_duration(total_wall)} over "
        f"{len(stages)} stage(s)" + (f", estimated cost ${sum(costs):.2f}." if costs else "."),
        "",
    ]

    out += _pipeline_section(run_dir)
    plotted = _write_plots(run_dir, stages)
    if plotted:
        out += ["## Training curves", ""]
        out += [f"![{PLOTS[plot]}](report/{plot}.png)" for plot in PLOTS if plot in plotted] + [""]
    out += _tokenizer_section(run_dir)
    for name, title in STAGES:
        if name in stages:
            out += _stage_section(run_dir, stages[name], title, hourly_cost_usd)

    report_path = run_dir / "report.md"
    atomic_write_text(report_path, "\n".join(out).rstrip() + "\n")
    return report_path


def _pipeline_section(run_dir: Path) -> list[str]:
    """Wall time of each stage of `picochat run` (from <run>/pipeline.json; absent for stages run by hand)."""
    path = run_dir / "pipeline.json"
    state = read_json(path) if path.is_file() else None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict) or not state["stages"]:
        return []
    rows, total = [], 0.0
    for name, info in state["stages"].items():
        if not isinstance(info, dict) or name == "report":  # the report cannot time itself while it is written
            continue
        seconds = _number(info.get("seconds"))
        total += seconds or 0.0
        rows.append([name, info.get("status", "-"), _duration(seconds)])
    out = [
        "## Pipeline",
        "",
        f"`picochat run --preset {state.get('preset', '?')}`: wall time of each stage "
        "(added up over interrupted attempts).",
        "",
    ]
    out += [markdown_table(["stage", "status", "wall time"], rows + [["total", "", _duration(total)]]), ""]
    return out


def _tokenizer_section(run_dir: Path) -> list[str]:
    config_path = run_dir / "tokenizer" / "config.json"
    results_path = run_dir / "eval" / "tokenizer.json"
    if not config_path.is_file() and not results_path.is_file():
        return []
    out = ["## Tokenizer", ""]
    if config_path.is_file():
        config = read_json(config_path)
        out += [markdown_table(["setting", "value"], [list(kv) for kv in flatten(config)]), ""]
    if results_path.is_file():
        results = read_json(results_path)
        sources = results.get("sources") if isinstance(results, dict) else None
        if isinstance(sources, list) and sources and all(isinstance(s, dict) for s in sources):
            header = list(sources[0].keys())
            out += [
                "Compression (bytes per token, higher is better):",
                "",
                markdown_table(header, [[s.get(k, "-") for k in header] for s in sources]),
                "",
            ]
    return out


def _write_plots(run_dir: Path, stages: dict[str, StageSummary]) -> set[str]:
    """report/loss.png and report/bpb.png from the stages' metrics; a plot without data is removed."""
    series = {
        "loss": {
            f"{name} ({kind})": curve(s.events, (key,), "train")
            for name, s in stages.items()
            for key, kind in (("loss", "raw"), ("smooth_loss", "smoothed"))
        },
        "bpb": {name: curve(s.events, ("val_bpb", "bpb"), "eval") for name, s in stages.items()},
    }
    written = set()
    for plot, lines in series.items():
        lines = {label: xy for label, xy in lines.items() if xy[0]}
        path = run_dir / "report" / f"{plot}.png"
        if lines:
            atomic_write_bytes(path, plot_curves(lines, PLOTS[plot], "bits per byte" if plot == "bpb" else "nats"))
            written.add(plot)
        else:
            path.unlink(missing_ok=True)
    return written


def _stage_section(run_dir: Path, summary: StageSummary, title: str, hourly_cost_usd: float | None) -> list[str]:
    out = [f"## {title} ({summary.name}/)", ""]
    price, price_source = hourly_cost(summary, hourly_cost_usd)
    cost = "-"
    if summary.wall_seconds is not None:
        cost = f"${price * summary.wall_seconds / 3600:.2f} ({price_source})" if price is not None else price_source
    facts = [
        ["steps", summary.steps if summary.steps is not None else "-"],
        ["tokens", f"{summary.tokens:,}" if summary.tokens is not None else "-"],
        ["FLOPs", f"{summary.flops:.3e}" if summary.flops is not None else "-"],
        ["training time (steps only)", _duration(summary.training_seconds)],
        ["wall time", _duration(summary.wall_seconds)],
        ["estimated cost", cost],
        ["final training loss (smoothed)", summary.final_loss if summary.final_loss is not None else "-"],
        ["best validation bpb", summary.min_val_bpb if summary.min_val_bpb is not None else "-"],
        ["ranks / device", f"{summary.world_size} / {summary.device or '-'}"],
    ]
    out += [markdown_table(["", ""], facts), ""]
    if summary.config:
        settings = flatten(summary.config)
        out += [
            f"<details><summary>configuration ({len(settings)} settings, from {summary.name}/config.json)</summary>",
            "",
            markdown_table(["setting", "value"], [list(kv) for kv in settings]),
            "",
            "</details>",
            "",
        ]
    core = latest_eval_document(run_dir, "core", summary.name)
    if core and isinstance(core.get("tasks"), dict):
        rows = [
            [label, t.get("num_fewshot", "-"), t.get("examples", "-"), t.get("accuracy", "-"), t.get("centered", "-")]
            for label, t in core["tasks"].items()
            if isinstance(t, dict)
        ]
        out += [
            f"{core.get('metric', 'CORE')} = {_cell(_number(core.get('core')) or 0.0)} at step "
            f"{core.get('step')} ({core.get('tasks_evaluated', len(rows))} of 22 tasks):",
            "",
            markdown_table(["task", "shots", "items", "accuracy", "centered"], rows),
            "",
        ]
    bpb = latest_eval_document(run_dir, "bpb", summary.name)
    if bpb and isinstance(bpb.get("splits"), dict):
        rows = [
            [split, r.get("bpb", "-"), r.get("tokens", "-")]
            for split, r in bpb["splits"].items()
            if isinstance(r, dict)
        ]
        out += [f"Bits per byte at step {bpb.get('step')}:", "", markdown_table(["split", "bpb", "tokens"], rows), ""]
    if summary.samples:
        text = "\n".join(f"{prompt!r} -> {completion!r}" for prompt, completion in summary.samples)
        out += ["Samples (greedy, from the last sampling during training):", "", fenced(text), ""]
    return out
