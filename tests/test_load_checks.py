"""Loading a trained model refuses a damaged run folder in one line (issue 20, items 3-4).

Every case corrupts a copy of a tiny run the way a crash, a bad copy or a hostile edit would, then runs
`picochat chat -p` on it: exit status 2, exactly one line on stderr, naming the file and the problem -- never a
traceback, never garbage replies from NaN weights, never a silent fallback to another stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from picochat.checkpoint import save_checkpoint
from picochat.cli import main
from picochat.common import PicochatError, atomic_write_json
from picochat.gpt import CONFIG_MAXIMA, GPTConfig


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, tokenizer) -> Path:
    """tokenizer/ + base/ (config.json, model.safetensors, one checkpoint at step 1), as the pipeline writes."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    tokenizer.save(run / "tokenizer")
    model = tiny_model(tokenizer.vocab_size, 64)
    save_checkpoint(run / "base", 1, model.state_dict(), {"counter": 1, "moments": torch.zeros(3)})
    atomic_write_json(run / "base" / "config.json", {"model": model.config.to_dict()})
    return run


@pytest.fixture
def run_copy(pristine_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine_run, copy)
    return copy


def _chat(run: Path, *extra: str) -> list[str]:
    return ["chat", "--run-dir", str(run), "-p", "Hi", "--max-tokens", "4", "--temperature", "0", *extra]


# ---- the corruptions: each takes the run folder and returns the extra flags for `picochat chat` ----------


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _edit_weights(path: Path, edit) -> None:
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


def _edit_model_config(run: Path, **changes) -> None:
    path = run / "base" / "config.json"
    config = json.loads(path.read_text())
    config["model"].update(changes)
    path.write_text(json.dumps(config))


def _add_sft(run: Path) -> None:
    shutil.copytree(run / "base", run / "sft")


def _nan(weights):
    weights["lm_head.weight"][3, 5] = float("nan")


def _inf(weights):
    weights["backout_lambda"][0] = float("-inf")


def _wrong_shape(weights):
    name = "lm_head.weight"
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 1)


def _integer_tensor(weights):
    weights["lm_head.weight"] = weights["lm_head.weight"].to(torch.int32)


def _state_json(run: Path, text: str) -> list[str]:
    _write(run / "base" / "state" / "step_000001" / "state.json", text)
    return ["--step", "1"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


CASES = {
    # (corrupt(run) -> extra flags, [fragments the one error line must contain])
    "state_json_empty_with_step": (lambda r: _state_json(r, "{}"), ["step_000001/state.json", '"step"']),
    "state_json_garbage_with_step": (lambda r: _state_json(r, "{not json"), ["step_000001/state.json", "unreadable"]),
    "state_json_wrong_step": (
        lambda r: _state_json(r, '{"step": 7, "state": {}}'),
        ["step_000001/state.json", "is 7", "step 1"],
    ),
    "state_json_a_list": (lambda r: _state_json(r, "[1, 2]"), ["step_000001/state.json", "JSON object"]),
    "config_json_garbage": (
        lambda r: _write(r / "base" / "config.json", "{not json"),
        ["base/config.json", "unreadable"],
    ),
    "config_json_random_bytes": (lambda r: _write(r / "base" / "config.json", os.urandom(512)), ["base/config.json"]),
    "config_json_missing": (lambda r: (r / "base" / "config.json").unlink(), ["base/config.json", "not found"]),
    "config_json_a_folder": (
        lambda r: _replace_with_folder(r / "base" / "config.json"),
        ["base/config.json", "folder"],
    ),
    "config_model_not_an_object": (
        lambda r: _write(r / "base" / "config.json", '{"model": "big"}'),
        ["base/config.json", '"model"'],
    ),
    "config_sequence_len_huge": (
        lambda r: _edit_model_config(r, sequence_len=10**12),
        ["base/config.json", "sequence_len", f"at most {CONFIG_MAXIMA['sequence_len']:,}"],
    ),
    "config_vocab_huge": (lambda r: _edit_model_config(r, vocab_size=10**9), ["base/config.json", "vocab_size"]),
    "config_depth_huge": (lambda r: _edit_model_config(r, n_layer=10**6), ["base/config.json", "n_layer"]),
    "config_width_huge": (lambda r: _edit_model_config(r, n_embd=2**40), ["base/config.json", "n_embd"]),
    "config_heads_huge": (
        lambda r: _edit_model_config(r, n_head=10**5, n_kv_head=10**5),
        ["base/config.json", "n_head"],
    ),
    "config_width_zero": (lambda r: _edit_model_config(r, n_embd=0), ["base/config.json", "n_embd", "positive"]),
    "config_width_a_string": (lambda r: _edit_model_config(r, n_embd="32"), ["base/config.json", "n_embd"]),
    "config_pattern_not_text": (
        lambda r: _edit_model_config(r, window_pattern=7),
        ["base/config.json", "window_pattern"],
    ),
    "config_unknown_field": (lambda r: _edit_model_config(r, n_experts=8), ["base/config.json", "n_experts"]),
    "config_other_depth": (lambda r: _edit_model_config(r, n_layer=3), ["base/model.safetensors", "do not match"]),
    "config_vocab_below_tokenizer": (
        lambda r: _edit_model_config(r, vocab_size=64),
        ["base/model.safetensors", "do not match"],
    ),
    "weights_truncated": (lambda r: _truncate(r / "base" / "model.safetensors"), ["base/model.safetensors", "damaged"]),
    "weights_random_bytes": (
        lambda r: _write(r / "base" / "model.safetensors", os.urandom(4096)),
        ["base/model.safetensors", "damaged"],
    ),
    "weights_empty_file": (lambda r: _write(r / "base" / "model.safetensors", b""), ["base/model.safetensors"]),
    "weights_nan": (lambda r: _edit_weights(r / "base" / "model.safetensors", _nan), ["lm_head.weight", "non-finite"]),
    "weights_inf": (
        lambda r: _edit_weights(r / "base" / "model.safetensors", _inf),
        ["base/model.safetensors", "non-finite"],
    ),
    "weights_wrong_shape": (
        lambda r: _edit_weights(r / "base" / "model.safetensors", _wrong_shape),
        ["base/model.safetensors", "lm_head.weight has shape"],
    ),
    "weights_integer": (
        lambda r: _edit_weights(r / "base" / "model.safetensors", _integer_tensor),
        ["base/model.safetensors", "floating point"],
    ),
    "weights_missing": (lambda r: (r / "base" / "model.safetensors").unlink(), ["no trained model"]),
    "weights_a_folder": (
        lambda r: _replace_with_folder(r / "base" / "model.safetensors"),
        ["base/model.safetensors", "folder"],
    ),
    "step_weights_nan": (
        lambda r: (_edit_weights(r / "base" / "state" / "step_000001" / "model.safetensors", _nan), ["--step", "1"])[1],
        ["step_000001/model.safetensors", "non-finite"],
    ),
    "step_weights_missing": (
        lambda r: ((r / "base" / "state" / "step_000001" / "model.safetensors").unlink(), ["--step", "1"])[1],
        ["step_000001/model.safetensors", "not found"],
    ),
    "step_missing": (lambda r: ["--step", "2"], ["no checkpoint at step 2"]),
    "tokenizer_missing": (lambda r: shutil.rmtree(r / "tokenizer"), ["tokenizer/tokenizer.json", "not found"]),
    "tokenizer_a_folder": (
        lambda r: _replace_with_folder(r / "tokenizer" / "tokenizer.json"),
        ["tokenizer/tokenizer.json", "folder"],
    ),
    "tokenizer_garbage": (lambda r: _write(r / "tokenizer" / "tokenizer.json", "{oops"), ["tokenizer.json"]),
    # A newer stage that is damaged is reported, never skipped for the older one that still works.
    "sft_weights_a_folder": (
        lambda r: (_add_sft(r), _replace_with_folder(r / "sft" / "model.safetensors")),
        ["sft/model.safetensors", "folder"],
    ),
    "sft_config_missing": (
        lambda r: (_add_sft(r), (r / "sft" / "config.json").unlink()),
        ["sft/config.json", "not found"],
    ),
    "sft_weights_nan": (
        lambda r: (_add_sft(r), _edit_weights(r / "sft" / "model.safetensors", _nan)),
        ["sft/model.safetensors", "non-finite"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupted_run_folder_is_one_line_error(run_copy, capsys, case):
    corrupt, fragments = CASES[case]
    extra = corrupt(run_copy)
    extra = extra if isinstance(extra, list) else []
    status = main(_chat(run_copy, *extra))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, f"{case}: exit {status}, stdout {captured.out!r}, stderr {captured.err!r}"
    assert len(lines) == 1 and lines[0].startswith("picochat: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], f"{case}: {fragment!r} not in {lines[0]!r}"
    assert captured.out == ""  # no reply was printed


@pytest.mark.parametrize("case", ["weights_nan", "sft_weights_a_folder", "config_sequence_len_huge"])
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["eval", "bpb"], ["eval", "core"], ["export"]])
def test_every_command_that_loads_refuses_the_same_way(run_copy, capsys, tmp_path, command, case):
    corrupt, fragments = CASES[case]
    corrupt(run_copy)
    extra = ["--out", str(tmp_path / "export")] if command == ["export"] else []
    assert main([*command, "--run-dir", str(run_copy), *extra]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), lines


def test_stage_folder_given_directly_names_its_missing_config(run_copy, capsys):
    _add_sft(run_copy)
    (run_copy / "sft" / "config.json").unlink()
    assert main(_chat(run_copy / "sft")) == 2
    line = capsys.readouterr().err.strip()
    assert "sft/config.json: not found" in line and "no trained model in any stage" not in line


def test_pristine_run_loads(run_copy, capsys):
    _add_sft(run_copy)  # an in-progress stage (config.json, no weights yet) is passed over for the one before it
    (run_copy / "rl").mkdir()
    atomic_write_json(run_copy / "rl" / "config.json", json.loads((run_copy / "base" / "config.json").read_text()))
    assert main(_chat(run_copy)) == 0 and main(_chat(run_copy, "--step", "1", "--stage", "sft")) == 0
    assert capsys.readouterr().out.strip()


def test_real_command_prints_no_traceback(run_copy):
    """Through the installed entry point in a fresh process: the one line, exit status 2."""
    _edit_weights(run_copy / "base" / "model.safetensors", _nan)
    result = subprocess.run([sys.executable, "-m", "picochat", *_chat(run_copy)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "non-finite" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_bounds_name_the_source():
    good = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32).to_dict()
    for name, maximum in CONFIG_MAXIMA.items():
        with pytest.raises(PicochatError, match=rf"^x/config\.json: model config {name}="):
            GPTConfig.from_dict({**good, name: maximum + 1}, source="x/config.json")
    with pytest.raises(PicochatError, match="JSON object"):
        GPTConfig.from_dict([1, 2], source="x/config.json")
