"""CORE evaluation (protocol, scoring, batching, ranks, the eval bundle) and the `picochat eval` stage (core, bpb)."""

from __future__ import annotations

import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import tiktoken.load
import torch
import torch.nn.functional as F

from picochat.cli import main
from picochat.common import PicochatError, atomic_write_json
from picochat.evaluation import core, core_tasks
from picochat.evaluation.core import Row, RowScore
from picochat.evaluation.core_tasks import CoreTask
from picochat.tokenizer import Tokenizer

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# Real tasks of every kind for the end-to-end tests: (label, file under eval_data/)
SMALL_TASKS = ["copa", "arc_easy", "winograd", "bigbench_operators"]


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir) -> Tokenizer:
    ranks = tiktoken.load.load_tiktoken_bpe(str(data_dir / "tokenizers" / "gpt2.tiktoken"))
    return Tokenizer(ranks, pattern=GPT2_PATTERN)


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """One token per byte (BOS = 256): scored ranges can be read off the text."""
    return Tokenizer({bytes([i]): i for i in range(256)})


def tiny_model(vocab_size: int, sequence_len: int, seed: int = 0):
    """A small GPT whose every weight is random (the real init zeroes the output projections, which would make
    the model ignore all context), so that batching and caching mistakes would show."""
    from picochat.gpt import GPT, GPTConfig

    config = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=64,
        window_pattern="SL",
    )
    torch.manual_seed(seed)
    model = GPT.build(config, "cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tasks(data_dir) -> dict[str, CoreTask]:
    return {task.label: task for task in core_tasks.load_core_tasks(data_dir / "core_eval")}


def task_items(data_dir, task: CoreTask, count: int) -> list[dict]:
    path = core_tasks.task_data_path(data_dir / "core_eval", task)
    return core_tasks.select_items(core_tasks.load_task_items(path, task.task_type), count)


# ----------------------------------------------------------------------------------------------------------
# The bundle and the protocol


def test_shared_bundle_has_the_22_core_tasks_with_their_settings(data_dir, tasks):
    assert len(tasks) == core.TOTAL_CORE_TASKS == 22
    assert (tasks["jeopardy"].num_fewshot, tasks["jeopardy"].task_type) == (10, "language_modeling")
    assert tasks["jeopardy"].continuation_delimiter == "\nAnswer: "
    assert tasks["copa"].continuation_delimiter == " " and tasks["copa"].num_fewshot == 0
    assert tasks["winogrande"].task_type == "schema" and tasks["agi_eval_lsat_ar"].num_fewshot == 3
    assert tasks["boolq"].random_baseline == 62 and tasks["commonsense_qa"].random_baseline == 40.3
    core_dir = data_dir / "core_eval"
    present = [label for label, task in tasks.items() if core_tasks.task_data_path(core_dir, task).is_file()]
    assert len(present) == 18
    assert set(tasks) - set(present) == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}


def test_items_are_shuffled_with_1337_and_shots_drawn_with_1234_plus_index():
    items = [{"n": i} for i in range(50)]
    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert core_tasks.select_items(items, 20) == expected[:20]
    assert core_tasks.select_items(items, None) == expected
    for index in (0, 7, 19):
        shots = core_tasks.fewshot_indices(index, 20, 10)
        others = [i for i in range(20) if i != index]
        assert shots == random.Random(1234 + index).sample(others, 10)
        assert index not in shots
    assert core_tasks.fewshot_indices(3, 20, 0) == []
    assert sorted(core_tasks.fewshot_indices(1, 4, 10)) == [0, 2, 3]  # fewer items than shots: all the others


def test_prompts_are_rendered_exactly():
    mc = CoreTask("mc", "x.jsonl", 2, "multiple_choice", "\nAnswer: ", 25.0)
    shots = [{"query": "Q1?", "choices": ["a", "b"], "gold": 1}, {"query": "Q2?", "choices": ["c", "d"], "gold": 0}]
    assert core_tasks.render_prompts({"query": "Q?", "choices": ["yes", "no"], "gold": 0}, mc, shots) == [
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ?\nAnswer: yes",
        "Q1?\nAnswer: b\n\nQ2?\nAnswer: c\n\nQ?\nAnswer: no",
    ]
    schema = CoreTask("schema", "x.jsonl", 1, "schema", " ", 50.0)
    shot = {"context_options": ["Ann won", "Bob won"], "continuation": "so he smiled.", "gold": 1}
    item = {"context_options": ["Cat sat", "Dog sat"], "continuation": "on it.", "gold": 0}
    assert core_tasks.render_prompts(item, schema, [shot]) == [
        "Bob won so he smiled.\n\nCat sat on it.",
        "Bob won so he smiled.\n\nDog sat on it.",
    ]
    lm = CoreTask("lm", "x.jsonl", 1, "language_modeling", " ", 0.0)
    shot = {"context": "  2+2 = \n", "continuation": "4"}
    item = {"context": "3+3 =  ", "continuation": "6"}
    # contexts are stripped; the prompt without the continuation is stripped as a whole (no trailing space)
    assert core_tasks.render_prompts(item, lm, [shot]) == ["2+2 = 4\n\n3+3 =", "2+2 = 4\n\n3+3 = 6"]
    assert core_tasks.render_prompts(item, CoreTask("lm", "x", 0, "language_modeling", "\nAnswer: ", 0.0), []) == [
        "3+3 =\nAnswer:",
        "3+3 =\nAnswer: 6",
    ]


def test_scored_ranges(byte_tokenizer):
    bos = byte_tokenizer.bos_token_id

    def rows(prompts, task_type, max_tokens=None):
        return core.item_rows(byte_tokenizer.encode(prompts, prepend=bos), task_type, max_tokens)

    def scored(row):
        return bytes(row.tokens[row.start : row.end]).decode()

    # multiple choice: after the common prefix of the choices (here inside the shared "b" of "bat"/"bee")
    assert [scored(r) for r in rows(["Q: cat", "Q: bat", "Q: bee"], "multiple_choice")] == ["cat", "bat", "bee"]
    assert [scored(r) for r in rows(["Q: bat", "Q: bee"], "multiple_choice")] == ["at", "ee"]
    # a choice that is a prefix of another still scores its last token
    assert [scored(r) for r in rows(["Q: yes", "Q: yes sir"], "multiple_choice")] == ["s", "s sir"]
    # schema: the common suffix (the shared continuation)
    assert [scored(r) for r in rows(["Ann so he ran.", "Bob so he ran."], "schema")] == [" so he ran."] * 2
    # language modeling: what follows the prompt without continuation
    (row,) = rows(["3+3 =", "3+3 = 6"], "language_modeling")
    assert scored(row) == " 6" and row.tokens[0] == bos
    # left truncation keeps the last tokens and moves the range with them
    (row,) = rows(["abcdefgh =", "abcdefgh = 42"], "language_modeling", max_tokens=6)
    assert bytes(row.tokens).decode() == "h = 42" and scored(row) == " 42"
    (row,) = rows(["x =", "x = 123456789"], "language_modeling", max_tokens=5)
    assert row.start == 1 and scored(row) == "6789"  # the first kept token cannot be scored: nothing before it


class StubScorer:
    """Loss 0 (and greedy match) for rows whose text ends with one of `preferred`, loss 1 for the others."""

    def __init__(self, tokenizer: Tokenizer, preferred: set[str]):
        self.tokenizer, self.preferred = tokenizer, preferred
        self.calls = 0

    def __call__(self, items: list[list[Row]]) -> list[list[RowScore]]:
        self.calls += 1
        scores = []
        for rows in items:
            texts = [self.tokenizer.decode(row.tokens[1:]) for row in rows]
            good = [any(text.endswith(p) for p in self.preferred) for text in texts]
            scores.append([RowScore(0.0 if g else 1.0, g, 1.0 if g else -1.0) for g in good])
        return scores


def hand_built_tasks():
    mc_items = [
        {"query": f"Question {i}?", "choices": [f"right{i}", f"wrong{i}", f"bad{i}", f"no{i}"], "gold": i % 4}
        for i in range(8)
    ]
    for item in mc_items:  # put the right answer where gold says
        choices = [c for c in item["choices"] if not c.startswith("right")]
        choices.insert(item["gold"], next(c for c in item["choices"] if c.startswith("right")))
        item["choices"] = choices
    schema_items = [
        {"context_options": [f"Option{i}a", f"Option{i}b"], "continuation": f"ends {i}.", "gold": i % 2}
        for i in range(6)
    ]
    lm_items = [{"context": f"Count {i} +1 =", "continuation": f"{i + 1} exactly"} for i in range(6)]
    return [
        (
            CoreTask("mc", "-", 3, "multiple_choice", "\nAnswer: ", 25.0),
            mc_items,
            {f"right{i}" for i in range(8)},
            {f"wrong{i}" for i in range(8)},
        ),
        (
            CoreTask("schema", "-", 0, "schema", " ", 50.0),
            schema_items,
            {f"Option{i}{'ab'[i % 2]} ends {i}." for i in range(6)},
            {f"Option{i}{'ba'[i % 2]} ends {i}." for i in range(6)},
        ),
        (
            CoreTask("lm", "-", 2, "language_modeling", " ", 0.0),
            lm_items,
            {f"{i + 1} exactly" for i in range(6)},
            {"never"},
        ),
    ]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_stub_scorers_score_one_for_gold_and_zero_for_wrong_with_the_expected_centering(byte_tokenizer, batch_size):
    for task, items, gold, wrong in hand_built_tasks():
        right = core.evaluate_task(StubScorer(byte_tokenizer, gold), byte_tokenizer, task, items, batch_size=batch_size)
        assert right.accuracy == 1.0 and right.centered == 1.0 and right.examples == len(items)
        bad = core.evaluate_task(StubScorer(byte_tokenizer, wrong), byte_tokenizer, task, items, batch_size=batch_size)
        assert bad.accuracy == 0.0
        assert bad.centered == pytest.approx(-task.random_baseline / (100 - task.random_baseline))
    assert core.centered_accuracy(0.25, 25.0) == 0.0 and core.centered_accuracy(0.5, 25.0) == pytest.approx(1 / 3)


def test_near_ties_are_rescored_alone(byte_tokenizer):
    """A decision within float noise is taken from a forward pass of the item alone, whatever the batch."""
    task, items, gold, _ = hand_built_tasks()[0]

    class NoisyScorer(StubScorer):
        # gold rows lose by 1e-7 when scored with other items and win by 1e-7 when alone
        def __call__(self, batch):
            scores = super().__call__(batch)
            sign = 1.0 if len(batch) > 1 else -1.0
            return [[RowScore(0.5 + sign * 1e-7 * (s.mean_loss == 0.0), True, 0.0) for s in row] for row in scores]

    alone = core.evaluate_task(NoisyScorer(byte_tokenizer, gold), byte_tokenizer, task, items, batch_size=1)
    batched = core.evaluate_task(NoisyScorer(byte_tokenizer, gold), byte_tokenizer, task, items, batch_size=8)
    assert alone.accuracy == batched.accuracy == 1.0


# ----------------------------------------------------------------------------------------------------------
# Scoring with a real model


@torch.no_grad()
def plain_scores(model, rows: list[Row]) -> list[RowScore]:
    """The reference computation: one row at a time, full logits, nothing shared or batched."""
    scores = []
    for row in rows:
        logits = model(torch.tensor([row.tokens]))[0, row.start - 1 : row.end - 1]
        targets = torch.tensor(row.tokens[row.start : row.end])
        losses = F.cross_entropy(logits, targets, reduction="none")
        scores.append(RowScore(losses.mean().item(), bool((logits.argmax(1) == targets).all()), 0.0))
    return scores


@pytest.mark.parametrize("window", [1024, 96])
def test_model_scorer_matches_a_plain_forward_pass(data_dir, tasks, gpt2_tokenizer, window):
    model = tiny_model(gpt2_tokenizer.vocab_size, window)
    scorer = core.ModelScorer(model, gpt2_tokenizer.bos_token_id)
    shared = 0
    for label in SMALL_TASKS:
        task = tasks[label]
        items = task_items(data_dir, task, 4)
        groups = []
        for index, item in enumerate(items):
            shots = [items[j] for j in core_tasks.fewshot_indices(index, len(items), task.num_fewshot)]
            prompts = core_tasks.render_prompts(item, task, shots)
            groups.append(
                core.item_rows(
                    gpt2_tokenizer.encode(prompts, prepend=gpt2_tokenizer.bos_token_id), task.task_type, window
                )
            )
        shared += sum(core._shared_context_length(rows) >= core.SHARED_CONTEXT_MIN_TOKENS for rows in groups)
        for rows, scores in zip(groups, scorer(groups)):
            assert all(len(row.tokens) <= window for row in rows)
            for ours, reference in zip(scores, plain_scores(model, rows)):
                assert ours.mean_loss == pytest.approx(reference.mean_loss, abs=1e-4)
                assert ours.greedy_match == reference.greedy_match
    if window == 1024:
        assert shared >= 4  # the 10-shot arc_easy items went through the KV-cache path


def test_results_do_not_depend_on_the_batch_size(data_dir, tasks, gpt2_tokenizer):
    model = tiny_model(gpt2_tokenizer.vocab_size, 512, seed=1)
    scorer = core.ModelScorer(model, gpt2_tokenizer.bos_token_id)
    for label in SMALL_TASKS:
        task = tasks[label]
        items = task_items(data_dir, task, 14)
        results = [
            core.evaluate_task(scorer, gpt2_tokenizer, task, items, max_tokens=512, batch_size=b) for b in (1, 16)
        ]
        assert results[0].correct == results[1].correct
        assert results[0].accuracy == results[1].accuracy


# ----------------------------------------------------------------------------------------------------------
# Files: errors, the bundle download


def test_malformed_task_files_are_one_line_errors(tmp_path, data_dir):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"], "gold": 3}\n')
    with pytest.raises(PicochatError, match=r"t.jsonl:2: .*gold"):
        core_tasks.load_task_items(path, "multiple_choice")
    path.write_text('{"context": "c", "continuation": "x"}\nnot json\n')
    with pytest.raises(PicochatError, match=r"t.jsonl:2: not a JSON object"):
        core_tasks.load_task_items(path, "language_modeling")
    path.write_text('{"context_options": "ab", "continuation": "x", "gold": 0}\n')
    with pytest.raises(PicochatError, match="context_options"):
        core_tasks.load_task_items(path, "schema")

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n- label: mystery\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
    )
    shutil.copy(data_dir / "core_eval" / "eval_meta_data.csv", bundle)
    with pytest.raises(PicochatError, match="no 'Random baseline' row for task 'mystery'"):
        core_tasks.load_core_tasks(bundle)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n- label: copa\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n  icl_task_type: essay\n"
    )
    with pytest.raises(PicochatError, match="icl_task_type 'essay'"):
        core_tasks.load_core_tasks(bundle)


def make_bundle(folder: Path, data_dir: Path, labels: list[str], extra: str = "") -> Path:
    """A small eval bundle: core.yaml with the real settings of `labels`, the real baselines and data files."""
    all_tasks = {t.label: t for t in core_tasks.load_core_tasks(data_dir / "core_eval")}
    lines = ["icl_tasks:"]
    for label in labels:
        task = all_tasks[label]
        lines += [
            f"- label: {label}",
            f"  dataset_uri: {task.dataset_uri}",
            f"  num_fewshot: [{task.num_fewshot}]",
            f"  icl_task_type: {task.task_type}",
            f"  continuation_delimiter: {json.dumps(task.continuation_delimiter)}",
        ]
        target = folder / "eval_data" / task.dataset_uri
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "core_eval" / "eval_data" / task.dataset_uri, target)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "core.yaml").write_text("\n".join(lines) + "\n" + extra)
    shutil.copy(data_dir / "core_eval" / "eval_meta_data.csv", folder)
    return folder


@pytest.fixture
def http_server(tmp_path):
    """Serves the files of tmp_path/served on 127.0.0.1 (never the internet)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bundle_is_downloaded_and_unpacked_when_there_is_no_local_copy(tmp_path, data_dir, http_server, monkeypatch):
    served, url = http_server
    source = make_bundle(tmp_path / "source", data_dir, ["copa", "winograd"])
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, Path("eval_bundle") / path.relative_to(source))
    empty_data = tmp_path / "no_data"
    empty_data.mkdir()
    core_dir = core_tasks.resolve_core_dir(None, empty_data, url=f"{url}/eval_bundle.zip")
    assert core_dir == Path(os.environ["PICOCHAT_HOME"]) / "eval_bundle"
    assert [t.label for t in core_tasks.load_core_tasks(core_dir)] == ["copa", "winograd"]
    assert (core_dir / "eval_data" / "commonsense_reasoning" / "copa.jsonl").is_file()
    assert not (core_dir.parent / "eval_bundle.zip").exists()
    # once there, it is used as is (the server is not asked again)
    (served / "eval_bundle.zip").unlink()
    assert core_tasks.resolve_core_dir(None, empty_data, url=f"{url}/eval_bundle.zip") == core_dir
    # the shared data folder's core_eval wins over the download
    assert core_tasks.resolve_core_dir(None, data_dir) == data_dir / "core_eval"


def test_bad_bundle_archives_are_refused(tmp_path, http_server):
    served, url = http_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../escape/core.yaml", "icl_tasks: []")
    (served / "evil.zip").write_bytes(buffer.getvalue())
    with pytest.raises(PicochatError, match="unsafe path"):
        core_tasks.download_eval_bundle(f"{url}/evil.zip", tmp_path / "home" / "eval_bundle")
    assert not (tmp_path / "escape").exists()
    (served / "html.zip").write_text("<html>not a zip</html>")
    with pytest.raises(PicochatError, match="not a zip file"):
        core_tasks.download_eval_bundle(f"{url}/html.zip", tmp_path / "home" / "eval_bundle")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("eval_bundle/readme.txt", "no config here")
    (served / "empty.zip").write_bytes(buffer.getvalue())
    with pytest.raises(PicochatError, match="no core.yaml"):
        core_tasks.download_eval_bundle(f"{url}/empty.zip", tmp_path / "home" / "eval_bundle")


# ----------------------------------------------------------------------------------------------------------
# The stage: picochat eval core | bpb


@pytest.fixture
def run_dir(tmp_path, gpt2_tokenizer) -> Path:
    """A run with the GPT-2 tokenizer and a tiny random base model saved at step 7."""
    from picochat.checkpoint import save_checkpoint

    run = tmp_path / "run"
    gpt2_tokenizer.save(run / "tokenizer")
    model = tiny_model(gpt2_tokenizer.vocab_size, 1024, seed=2)
    atomic_write_json(run / "base" / "config.json", {"model": model.config.to_dict()})
    save_checkpoint(run / "base", 7, model.state_dict(), {})
    return run


def test_eval_core_writes_json_and_csv_and_ranks_agree(tmp_path, data_dir, run_dir, capsys):
    bundle = make_bundle(tmp_path / "bundle", data_dir, SMALL_TASKS)
    # hellaswag's real file is not in the shared data; its 4-row fixture stands in to test that path
    shutil.copy(
        data_dir / "core_eval/eval_data/language_understanding/hellaswag_small.jsonl",
        bundle / "eval_data/language_understanding/hellaswag.jsonl",
    )
    with open(bundle / "core.yaml", "a") as file:
        file.write(
            "- label: hellaswag\n  dataset_uri: language_understanding/hellaswag.jsonl\n  num_fewshot: [10]\n"
            "  icl_task_type: multiple_choice\n  continuation_delimiter: ' '\n- label: squad\n"
            "  dataset_uri: reading_comprehension/squad.jsonl\n  num_fewshot: [10]\n"
            "  icl_task_type: language_modeling\n"
        )
    arguments = ["eval", "core", "--run-dir", str(run_dir), "--core-dir", str(bundle), "--max-per-task", "10"]
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert "CORE-5: " in output and "(5 of 22 tasks" in output
    result = json.loads((run_dir / "eval" / "core_base_step000007.json").read_text())
    assert result["kind"] == "core" and result["stage"] == "base" and result["step"] == 7
    assert result["metric"] == "CORE-5" and result["tasks_evaluated"] == 5 and result["tasks_total"] == 22
    assert result["missing_tasks"] == ["squad"]
    assert result["tasks"]["hellaswag"]["examples"] == 4 and result["tasks"]["copa"]["examples"] == 10
    centered = [t["centered"] for t in result["tasks"].values()]
    assert result["core"] == pytest.approx(sum(centered) / 5) == result["metrics"]["CORE"]
    csv_lines = (run_dir / "eval" / "core_base_step000007.csv").read_text().splitlines()
    assert csv_lines[0].startswith("Task") and len(csv_lines) == 7 and csv_lines[-1].startswith("CORE-5")

    # Two ranks (gloo) stride over the items and add up their results: the same per-task numbers.
    env = {**os.environ, "PICOCHAT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "picochat",
         *arguments, "--batch-size", "3"], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    two_ranks = json.loads((run_dir / "eval" / "core_base_step000007.json").read_text())
    assert two_ranks["world_size"] == 2
    for label, task in result["tasks"].items():
        assert two_ranks["tasks"][label]["accuracy"] == task["accuracy"], label
    assert two_ranks["core"] == result["core"]


def test_eval_core_errors_are_one_line(tmp_path, data_dir, run_dir, capsys):
    bundle = make_bundle(tmp_path / "bundle", data_dir, ["copa"])
    base = ["eval", "core", "--run-dir", str(run_dir), "--core-dir", str(bundle)]
    assert main(base + ["--tasks", "copa,nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err
    (bundle / "eval_data/commonsense_reasoning/copa.jsonl").unlink()
    assert main(base + ["--tasks", "copa"]) == 2
    assert "copa.jsonl not found" in capsys.readouterr().err
    assert main(["eval", "core", "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "core", "--run-dir", str(run_dir), "--core-dir", str(tmp_path)]) == 2
    assert "no core.yaml" in capsys.readouterr().err


def test_eval_bpb_on_named_files_and_on_the_runs_data(tmp_path, run_dir, gpt2_tokenizer, data_dir, capsys):
    from picochat.checkpoint import load_model
    from picochat.evaluation.bpb import evaluate_bpb
    from picochat.packing import pretraining_batches

    text = tmp_path / "notes.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 5}) + "\n"
            for i in range(40)
        )
    )
    assert (
        main(
            [
                "eval",
                "bpb",
                "--run-dir",
                str(run_dir),
                str(text),
                "--tokens",
                "256",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    result = json.loads((run_dir / "eval" / "bpb_base_step000007_notes.json").read_text())
    split = result["splits"]["text"]
    assert split["tokens"] == 256 and "bpb" not in result["metrics"]  # named files never replace the run's bpb
    model = load_model(run_dir / "base", device="cpu")
    batches = ((x, y) for x, y, _ in pretraining_batches([text], gpt2_tokenizer, 2, 64, loop=False))
    expected = evaluate_bpb(model, batches, gpt2_tokenizer.token_bytes(), max_batches=2)
    assert split["bpb"] == pytest.approx(expected, rel=1e-6) and result["metrics"]["text_bpb"] == split["bpb"]

    # Without paths: the stage's own train/val files from its config.json
    config = json.loads((run_dir / "base" / "config.json").read_text())
    config["data"] = {"train_files": [str(text)], "val_files": [str(data_dir / "pretrain" / "c4_demo.jsonl")]}
    atomic_write_json(run_dir / "base" / "config.json", config)
    assert main(["eval", "bpb", "--run-dir", str(run_dir), "--tokens", "128", "--seq-len", "64"]) == 0
    result = json.loads((run_dir / "eval" / "bpb_base_step000007.json").read_text())
    assert set(result["splits"]) == {"train", "val"} and result["metrics"]["bpb"] == result["splits"]["val"]["bpb"]
    assert main(["eval", "bpb", "--run-dir", str(run_dir), str(text), "--seq-len", "100000", "--tokens", "1"]) == 2
    assert "too little text" in capsys.readouterr().err
