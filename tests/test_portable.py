"""The portable architecture (picochat/portable.py) and its exports: a tiny PortableGPT is transformers' Qwen3 to
fp32 precision, through the Hugging Face folder (no remote code) and through the GGUF file (transformers'
`gguf_file=` reader), with the same token ids for real documents and a rendered conversation; its KV cache, optimizer
groups and config round trip behave as the reference's do.

Sizes: head size 128 (transformers' GGUF reader assumes it for qwen3), width 256, 2 query heads and 1 key-value head
(grouped-query attention), 2 layers, a 400-token llama-bpe BPE trained on real Wikipedia text."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import WIKI_SHARD

from picochat.checkpoint import load_model, save_checkpoint
from picochat.cli import main
from picochat.common import PicochatError, atomic_write_json
from picochat.engine import Engine
from picochat.export import export_hf
from picochat.export_portable import GGUF_FILE, export_gguf, ollama_modelfile
from picochat.gpt import GPT, GPTConfig
from picochat.portable import PortableGPT, intermediate_size
from picochat.tokenizer import LLAMA3_SPLIT_PATTERN, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQUENCE_LEN = 128
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello there! What's 12345 + 30?\n\n\n  Indented   spaces\tand tabs"},
    {"role": "assistant", "content": "It is 12375."},
    {"role": "user", "content": "And in 日本語? 😀"},
]
# Digits, runs of spaces and newlines, contractions, specials typed as text: where split patterns differ.
TRICKY = "In 1999, 123456789 people's\n\n\n   spaced    out\t\ttabs \r\n<|bos|> DON'T 3.14159 x²\n "


def portable_config(vocab_size: int, **sizes) -> GPTConfig:
    settings = dict(sequence_len=SEQUENCE_LEN, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=256,
                    window_pattern="L", architecture="portable")  # fmt: skip
    settings.update(sizes)
    return GPTConfig(**settings)


def lively_portable(vocab_size: int, seed: int = 0) -> PortableGPT:
    """A tiny PortableGPT whose every part matters: the init zeroes o_proj/down_proj and sets every norm weight to a
    constant, which would hide a wrong mapping; so those get random values."""
    torch.manual_seed(seed)
    model = GPT.build(portable_config(vocab_size), "cpu", compute_dtype=torch.float32)
    with torch.no_grad():
        for block in model.blocks:
            block.self_attn.o_proj.weight.normal_(0, 0.05)
            block.mlp.down_proj.weight.normal_(0, 0.05)
            for norm in (block.input_layernorm, block.post_attention_layernorm, block.self_attn.q_norm,
                         block.self_attn.k_norm):  # fmt: skip
                norm.weight.uniform_(0.5, 1.5)
        model.norm.weight.uniform_(0.5, 1.5)
        model.lm_head.weight.normal_(0, 0.2)
    return model.eval()


def wiki_texts(data_dir: Path, count: int, start: int = 0) -> list[str]:
    return pq.read_table(data_dir / WIKI_SHARD, columns=["text"]).column("text").to_pylist()[start : start + count]


@pytest.fixture(scope="module")
def tokenizer(data_dir) -> Tokenizer:
    return Tokenizer.train([t[:3000] for t in wiki_texts(data_dir, 30)], vocab_size=400, pattern=LLAMA3_SPLIT_PATTERN)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> tuple[Path, PortableGPT]:
    model = lively_portable(tokenizer.vocab_size)
    run_dir = tmp_path_factory.mktemp("portable_run")
    tokenizer.save(run_dir / "tokenizer")
    save_checkpoint(run_dir / "base", 1, model.state_dict(), {})
    atomic_write_json(run_dir / "base" / "config.json", {"model": model.config.to_dict()})
    return run_dir, model


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def ids_of(tokens) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


# ----------------------------------------------------------------------------------------------------------
# The model


def test_config_round_trip_and_old_configs_load_as_the_reference():
    config = portable_config(300)
    assert GPTConfig.from_dict(config.to_dict()) == config and config.to_dict()["architecture"] == "portable"
    reference = GPTConfig(vocab_size=300)
    assert "architecture" not in reference.to_dict()  # reads exactly as before the field existed
    assert GPTConfig.from_dict(reference.to_dict()).architecture == "reference"
    with pytest.raises(PicochatError, match="no sliding windows"):
        portable_config(300, window_pattern="SSSL")
    with pytest.raises(PicochatError, match="architecture='qwen'"):
        GPTConfig(architecture="qwen")
    assert GPTConfig.from_depth(4, architecture="portable").window_pattern == "L"
    assert intermediate_size(768) == 2048 and intermediate_size(256) == 704


def test_forward_kv_cache_loss_and_optimizer_groups():
    model = lively_portable(300)
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        logits = model(idx)
        cache = model.new_kv_cache(2, SEQUENCE_LEN)
        pieces = [model(idx[:, :17], kv_cache=cache), model(idx[:, 17:18], kv_cache=cache),
                  model(idx[:, 18:], kv_cache=cache)]  # fmt: skip
        torch.testing.assert_close(torch.cat(pieces, dim=1), logits, atol=1e-5, rtol=0)
        per_token = model(idx, targets=idx, loss_reduction="none")
    assert per_token.shape == idx.shape
    loss = model.train()(idx, targets=idx)
    torch.testing.assert_close(loss, per_token.mean(), atol=1e-5, rtol=0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer = model.setup_optimizer()
    kinds = {g["name"]: g["kind"] for g in optimizer.param_groups}
    assert kinds.pop("lm_head") == kinds.pop("wte") == kinds.pop("norms") == "adamw"
    assert set(kinds.values()) == {"muon"}  # every 2-D block matrix, by shape
    counts = model.parameter_counts()
    assert counts["value_embeds"] == 0 and counts["scalars"] == sum(p.numel() for p in model.parameters()
                                                                     if p.ndim == 1)  # fmt: skip


def test_checkpoint_loads_as_portable(run):
    run_dir, model = run
    loaded = load_model(run_dir / "base", device="cpu", compute_dtype=torch.float32)
    assert type(loaded) is PortableGPT
    idx = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face folder: stock Qwen3, no remote code


@pytest.fixture(scope="module")
def hf(run, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    folder = export_hf(run_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no trust_remote_code
    return folder, model.eval(), AutoTokenizer.from_pretrained(folder)


def test_hf_folder_is_a_stock_qwen3(hf):
    folder, model, _ = hf
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and "auto_map" not in config
    assert type(model).__name__ == "Qwen3ForCausalLM" and type(model).__module__.startswith("transformers.")
    assert "trust_remote_code" not in (folder / "README.md").read_text()


def test_hf_logits_and_greedy_generation_equal_picochat(run, hf, tokenizer):
    _, model = run
    _, hf_model, _ = hf
    idx = torch.randint(0, model.config.vocab_size, (2, 100))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = tokenizer.render_for_completion(CONVERSATION)
    engine = Engine(model, tokenizer)
    expected = [column[0] for column, _ in engine.generate(prompt, max_tokens=30, temperature=0, stop_tokens=())]
    generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)  # fmt: skip
    assert ids_of(generated[0, len(prompt) :]) == expected


# ----------------------------------------------------------------------------------------------------------
# GGUF: transformers reads it back


@pytest.fixture(scope="module")
def gguf_dirs(run, tmp_path_factory):
    run_dir, _ = run
    return {quant: export_gguf(run_dir, tmp_path_factory.mktemp(f"gguf_{quant}"), quant=quant)
            for quant in ("f32", "f16")}  # fmt: skip


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_gguf_logits_equal_picochat(run, gguf_dirs, offline, quant):
    from transformers import AutoModelForCausalLM

    _, model = run
    folder = gguf_dirs[quant]
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    reference = model
    if quant == "f16":  # the same weights as the file: matrices rounded to fp16, norms kept in fp32
        reference = lively_portable(model.config.vocab_size)
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    idx = torch.randint(0, model.config.vocab_size, (2, 100))
    with torch.no_grad():
        diff = (reference(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_gguf_tokenizer_gives_picochat_ids(run, gguf_dirs, tokenizer, data_dir, offline):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(gguf_dirs["f32"], gguf_file=GGUF_FILE)
    # Documents the tokenizer was not trained on, and the hard cases. add_bos_token: BOS first, as picochat's
    # documents start.
    for text in [*wiki_texts(data_dir, 8, start=100), TRICKY]:
        expected = tokenizer.encode(text, prepend="<|bos|>")
        assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == expected
    rendered = hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenizer.render_for_completion(
        CONVERSATION
    )


def test_gguf_metadata_modelfile_and_refusals(run, gguf_dirs, tmp_path, data_dir):
    import gguf

    folder = gguf_dirs["f16"]
    reader = gguf.GGUFReader(str(folder / GGUF_FILE))

    def text(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "qwen3"
    assert text("tokenizer.ggml.model") == "gpt2" and text("tokenizer.ggml.pre") == "llama-bpe"
    assert "<|assistant_start|>" in text("tokenizer.chat_template")
    names = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q_norm.weight"} <= names
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile == ollama_modelfile(SEQUENCE_LEN) and modelfile.startswith("# Ollama")
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|assistant_end|>"' in modelfile

    run_dir, _ = run
    q8 = export_gguf(run_dir, tmp_path / "q8", quant="q8_0")
    assert (q8 / GGUF_FILE).stat().st_size < (folder / GGUF_FILE).stat().st_size
    # A tokenizer with picochat's own split: llama.cpp would tokenise differently, so it is refused.
    other = tmp_path / "other_run"
    Tokenizer.train([t[:3000] for t in wiki_texts(data_dir, 30)], vocab_size=400).save(other / "tokenizer")
    (other / "base").mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / "base" / name).write_bytes((run_dir / "base" / name).read_bytes())
    with pytest.raises(PicochatError, match="split-pattern llama-bpe"):
        export_gguf(other)
    assert main(["export", "--run-dir", str(run_dir), "--quant", "q8_0"]) == 2  # --quant is for gguf only


# ----------------------------------------------------------------------------------------------------------
# The pipeline: the flag, the plan, and pretrain -> SFT -> chat of a portable model through the CLI


def test_run_plans_the_llama_split_and_the_architecture(tmp_path, data_dir):
    import dataclasses

    from picochat.pipeline import plan_stages
    from picochat.planning import pretraining_plan
    from picochat.presets import CPU

    portable = dataclasses.replace(CPU, architecture="portable")
    stages = {stage.name: stage.args for stage in plan_stages(portable, tmp_path, data_dir)}
    assert stages["tokenizer"][-2:] == ["--split-pattern", "llama-bpe"]
    assert stages["pretrain"][stages["pretrain"].index("--architecture") + 1] == "portable"
    assert (
        "--split-pattern" not in {stage.name: stage.args for stage in plan_stages(CPU, tmp_path, data_dir)}["tokenizer"]
    )
    plan = pretraining_plan(portable)
    assert plan["model_config"]["architecture"] == "portable"
    assert plan["window_sizes"] == [CPU.max_seq_len] * CPU.depth
    assert "architecture" not in pretraining_plan(CPU)["model_config"]


def test_portable_pretrain_sft_and_chat_through_the_cli(tmp_path, tokenizer, data_dir):
    from helpers import TINY, wiki_args

    from picochat import load

    run_dir = tmp_path / "run"
    tokenizer.save(run_dir / "tokenizer")
    assert main(["pretrain", "--run-dir", str(run_dir), "--architecture", "portable", "--window-pattern", "SSSL",
                 *wiki_args(data_dir), *TINY]) == 2  # fmt: skip
    args = [*wiki_args(data_dir), *TINY, "--num-iterations", "3", "--eval-every", "3", "--device", "cpu"]
    assert main(["pretrain", "--run-dir", str(run_dir), "--architecture", "portable", *args]) == 0
    config = json.loads((run_dir / "base" / "config.json").read_text())
    assert config["model"]["architecture"] == "portable" and config["flags"]["architecture"] == "portable"
    assert main(["sft", "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--mix", "identity:0.05",
                 "--identity-name", "Pico", "--num-iterations", "2", "--eval-every", "0", "--device",
                 "cpu"]) == 0  # fmt: skip
    model, loaded_tokenizer = load(run_dir, device="cpu")
    assert type(model) is PortableGPT
    reply = Engine(model, loaded_tokenizer).chat([{"role": "user", "content": "What is your name?"}], max_tokens=5)
    assert len(reply) == 1 and len(reply[0].tokens) <= 5
