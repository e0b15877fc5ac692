"""`picochat report`: the report card built from a run's JSON / JSONL files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from picochat.cli import main
from picochat.common import atomic_write_json
from picochat.tokenizer import Tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, events: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run as the stages leave it: tokenizer, a pretrained base (resumed once), an SFT stage, evaluations."""
    run = tmp_path / "myrun"
    atomic_write_json(run / "tokenizer" / "config.json", {"trainer": "rustbpe", "vocab_size": 32768})
    atomic_write_json(
        run / "eval" / "tokenizer.json",
        {
            "task": "tokenizer_compression",
            "sources": [{"source": "wikipedia", "ours_bytes_per_token": 4.7, "gpt2_bytes_per_token": 4.5}],
        },
    )
    atomic_write_json(
        run / "base" / "config.json",
        {
            "stage": "pretrain",
            "flags": {"depth": 4, "paths": [f"/data/shard_{i}.parquet" for i in range(40)]},
            "derived": {"total_batch_size": 1024, "flops_per_token": 1.5e6},
            "provenance": {"device": "cpu", "world_size": 2, "command": ["picochat", "pretrain", "--depth", "4"]},
        },
    )
    events = []
    for step in range(1, 41):
        # the run was stopped after step 20 and resumed: elapsed_seconds restarts from 0
        elapsed = step * 3.0 if step <= 20 else (step - 20) * 3.0
        events.append(
            {
                "event": "train",
                "step": step,
                "loss": 10.0 - step * 0.1,
                "smooth_loss": 10.2 - step * 0.1,
                "training_seconds": step * 2.5,
                "elapsed_seconds": elapsed,
            }
        )
        if step % 10 == 0:
            events.append({"event": "eval", "step": step, "val_bpb": 3.0 - step * 0.01})
    events.append(
        {
            "event": "sample",
            "step": 40,
            "samples": [
                {"prompt": "The capital of France is", "completion": " Paris ``` and | more"},
                {"prompt": "2+2=", "completion": "4\n"},
            ],
        }
    )
    write_jsonl(run / "base" / "metrics.jsonl", events)
    write_jsonl(
        run / "sft" / "metrics.jsonl",
        [
            {
                "event": "train",
                "step": s,
                "loss": 2.0 - s * 0.05,
                "training_seconds": s * 1.0,
                "elapsed_seconds": s * 1.0,
            }
            for s in range(1, 11)
        ],
    )
    atomic_write_json(
        run / "eval" / "core_base_step000040.json",
        {
            "kind": "core",
            "stage": "base",
            "step": 40,
            "metric": "CORE-18",
            "core": 0.1234,
            "metrics": {"CORE": 0.1234},
            "tasks_evaluated": 18,
            "tasks": {"copa": {"num_fewshot": 0, "examples": 100, "accuracy": 0.6, "centered": 0.2}},
        },
    )
    atomic_write_json(
        run / "eval" / "core_base_step000020.json",
        {"kind": "core", "stage": "base", "step": 20, "metric": "CORE-18", "metrics": {"CORE": 0.05}},
    )
    atomic_write_json(
        run / "eval" / "bpb_base_step000040.json",
        {
            "kind": "bpb",
            "stage": "base",
            "step": 40,
            "metrics": {"bpb": 2.61, "train_bpb": 2.5, "val_bpb": 2.61},
            "splits": {"train": {"bpb": 2.5, "tokens": 4096}, "val": {"bpb": 2.61, "tokens": 4096}},
        },
    )
    atomic_write_json(
        run / "eval" / "chat_sft.json",
        {
            "stage": "sft",
            "step": 10,
            "metrics": {
                "ARC-Easy": 0.31,
                "arc_challenge": 0.27,
                "MMLU": 0.3,
                "gsm8k": 0.02,
                "HumanEval": 0.05,
                "ChatCORE": 0.1,
                "unrelated": 5,
            },
        },
    )
    return run


def summary_rows(report: str) -> dict[str, list[str]]:
    section = report.split("## Summary")[1].split("##")[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| metric"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_report_has_the_table_plots_configuration_and_samples(run_dir, capsys):
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# picochat report card: myrun")
    assert "| metric | BASE | SFT | RL |" in report
    rows = summary_rows(report)
    assert rows["CORE-18"] == ["0.1234", "-", "-"]  # the step-40 file wins over the step-20 one
    assert rows["bpb"] == ["2.6100", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.3100", "-"] and rows["ARC-Challenge"] == ["-", "0.2700", "-"]
    assert {"MMLU", "GSM8K", "HumanEval", "ChatCORE"} <= set(rows) and "unrelated" not in report
    for plot in ("loss", "bpb"):
        assert f"](report/{plot}.png)" in report
        width, height = png_size(run_dir / "report" / f"{plot}.png")
        assert width > 300 and height > 200
    # training facts from config.json + metrics.jsonl: 40 steps x 1024 tokens, wall time over both sessions
    assert "| tokens | 40,960 |" in report and "| FLOPs | 6.144e+10 |" in report
    assert "| wall time | 2.0 min |" in report  # 60 s before the resume + 60 s after
    assert "| training time (steps only) | 1.7 min |" in report
    assert "| best validation bpb | 2.6000 |" in report
    assert "| flags.paths | 40 items: /data/shard_0.parquet, /data/shard_1.parquet, ... |" in report
    assert "| provenance.command | picochat, pretrain, --depth, 4 |" in report
    assert "| copa | 0 | 100 | 0.6000 | 0.2000 |" in report
    # samples are shown as text: a fence longer than any backtick run inside
    assert "````text\n'The capital of France is' -> ' Paris ``` and | more'\n'2+2=' -> '4\\n'\n````" in report
    assert "estimated cost | n/a (not trained on GPUs" in report
    assert "ours_bytes_per_token" in report  # the tokenizer's compression table


def test_report_is_regenerated_and_stale_plots_removed(run_dir):
    assert main(["report", "--run-dir", str(run_dir), "--hourly-cost", "24"]) == 0
    report = (run_dir / "report.md").read_text()
    assert "$0.80 ($24/hour (--hourly-cost))" in report  # base: 2 min of wall time at $24/hour
    events = [
        e
        for e in map(json.loads, (run_dir / "base" / "metrics.jsonl").read_text().splitlines())
        if e["event"] != "eval"
    ]
    write_jsonl(run_dir / "base" / "metrics.jsonl", events)
    for path in (run_dir / "eval").glob("bpb_*.json"):
        path.unlink()
    atomic_write_json(
        run_dir / "eval" / "core_base_step000060.json",
        {"kind": "core", "stage": "base", "step": 60, "metric": "CORE-18", "metrics": {"CORE": 0.2}},
    )
    time.sleep(0.01)
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert summary_rows(report)["CORE-18"] == ["0.2000", "-", "-"] and "bpb" not in summary_rows(report)
    assert not (run_dir / "report" / "bpb.png").exists() and (run_dir / "report" / "loss.png").is_file()
    assert "report/bpb.png" not in report


def test_bad_metrics_lines(run_dir, capsys):
    path = run_dir / "base" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"event": "train", "st')  # a run killed mid-write: skipped, with a warning
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert "cut-off last line" in capsys.readouterr().err
    path.write_text('{"event": "train", "step": 1}\nnot json\n{"event": "train", "step": 2}\n')
    assert main(["report", "--run-dir", str(run_dir)]) == 2
    assert f"{path}:2: not a JSON object" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(run_dir.parent / "missing")]) == 2
    with pytest.raises(SystemExit):
        main(["report", "--run-dir", str(run_dir), "--hourly-cost", "-1"])
    assert "non-negative price" in capsys.readouterr().err


def test_report_after_a_real_pretraining_run(tmp_path, data_dir, capsys):
    """The pretrain stage's own files (config.json, metrics.jsonl with evals and samples) make a full report."""
    run = tmp_path / "run"
    Tokenizer({bytes([i]): i for i in range(256)}).save(run / "tokenizer")
    train, val = data_dir / "pretrain" / "c4_demo.jsonl", data_dir / "pretrain" / "dclm_web_agreement.jsonl"
    code = main(
        [
            "pretrain",
            "--run-dir",
            str(run),
            str(train),
            "--val",
            str(val),
            "--depth",
            "1",
            "--max-seq-len",
            "64",
            "--device-batch-size",
            "2",
            "--total-batch-size",
            "128",
            "--num-iterations",
            "6",
            "--eval-every",
            "3",
            "--eval-tokens",
            "128",
            "--sample-every",
            "6",
            "--window-pattern",
            "L",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    assert main(["report", "--run-dir", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| steps | 6 |" in report and "| tokens | 768 |" in report
    assert (run / "report" / "loss.png").is_file() and (run / "report" / "bpb.png").is_file()
    assert "Samples (greedy" in report and "'The capital of France is' -> " in report
    assert "No evaluation results yet" in report
