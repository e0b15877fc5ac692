import json
import os

import numpy as np
import pytest
import torch

from picochat.checkpoint import (
    available_steps,
    flatten_state,
    latest_step,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unflatten_state,
)
from picochat.common import PicochatError


def _state(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {
        "optimizer": {0: {"exp_avg": torch.randn(3, 4, generator=generator), "step": 7}, "lr": [0.1, 0.2]},
        "loader": {"cursor": {"file_index": 2, "row": 5}, "buffer": np.arange(10, dtype=np.int32)},
        "rng": torch.get_rng_state(),
        "note": None,
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_flatten_round_trip_keeps_int_keys_numpy_and_dtypes():
    state = _state(0)
    skeleton, tensors = flatten_state(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    _assert_same(state, unflatten_state(json.loads(json.dumps(skeleton)), tensors))


def test_flatten_rejects_objects_it_cannot_store():
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten_state({"bad": object()})


def test_save_load_latest_and_pruning(tmp_path):
    weights = {"w": torch.randn(2, 2)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, weights, _state(step), keep=2)
    assert available_steps(tmp_path) == [20, 30]
    assert latest_step(tmp_path) == 30
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.step == 30
    _assert_same(_state(30), checkpoint.training_state)
    assert torch.equal(load_weights(tmp_path)["w"], weights["w"])
    assert load_checkpoint(tmp_path, step=20).step == 20


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"a": 1})
    # A save killed half way leaves a temporary folder and no pointer update.
    partial = tmp_path / "state" / f"step_000002.tmp-{os.getpid() + 1}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert latest_step(tmp_path) == 1
    assert available_steps(tmp_path) == [1]
    save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, {"a": 3})
    assert not partial.exists()  # cleaned by the next save


def test_missing_and_damaged_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(PicochatError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 5, {"w": torch.ones(1)}, {})
    with pytest.raises(PicochatError, match="available: 5"):
        load_checkpoint(tmp_path, step=6)
    (tmp_path / "state" / "step_000005" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(PicochatError, match="damaged checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "state" / "latest.json").write_text("{not json")
    with pytest.raises(PicochatError, match="unreadable checkpoint pointer"):
        latest_step(tmp_path)


def test_load_model_round_trip_and_stage_choice(tmp_path):
    from picochat.checkpoint import find_stage_dir, load_model
    from picochat.common import atomic_write_json
    from picochat.gpt import GPT, GPTConfig

    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT.build(config, "cpu")
    stage = tmp_path / "base"
    atomic_write_json(stage / "config.json", {"model": config.to_dict()})
    save_checkpoint(stage, 3, model.state_dict(), {})
    with pytest.raises(PicochatError, match="no trained model"):
        find_stage_dir(tmp_path, "sft")
    assert find_stage_dir(tmp_path) == stage
    loaded = load_model(find_stage_dir(tmp_path), device="cpu")
    tokens = torch.randint(0, 100, (1, 8))
    assert torch.equal(loaded(tokens), model.eval()(tokens))
    assert load_model(stage, device="cpu", step=3).config == config
    atomic_write_json(stage / "config.json", {"model": {**config.to_dict(), "n_layer": 3}})
    with pytest.raises(PicochatError, match="do not match"):
        load_model(stage, device="cpu")
