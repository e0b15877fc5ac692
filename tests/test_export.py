"""`picochat export --format hf`: the exported folder loads with plain transformers and behaves exactly like
picochat -- the same logits (past the sliding window), the same greedy generations with and without the KV cache,
the same token ids, and a chat template that renders the same prompts. Also the CLI's errors and the folder.

transformers is a dev dependency: if it is missing these tests fail (they are not skipped)."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import WIKI_SHARD, lively_model
from safetensors.torch import load_file

from picochat.checkpoint import save_checkpoint
from picochat.cli import main
from picochat.common import atomic_write_json
from picochat.engine import Engine
from picochat.export import MODELING_FILES, export_hf, hf_tokenizer_json
from picochat.gpt import short_window
from picochat.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQUENCE_LEN = 256  # short window 128: the test sequences (200 and 300 tokens) run past it, 300 past the long one
EXPORTED_FILES = {
    "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "configuration_picochat.py", "modeling_picochat.py", "README.md",
}  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hello there! What's 12 + 30?"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "And  twice\tthat, in 日本語?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute "},
            {"type": "python", "text": "42 * 2"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": " so 84."},
        ],
    },
    {"role": "user", "content": "Thanks 😀"},
]


def wiki_texts(data_dir: Path, count: int) -> list[str]:
    return pq.read_table(data_dir / WIKI_SHARD, columns=["text"]).column("text").to_pylist()[:count]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    """A run folder made the way the pipeline makes one, holding a lively tiny model (every path of the forward
    matters: smear, value embeddings, lambdas, backout, GQA) under base/ at step 1."""
    model = lively_model(tokenizer.vocab_size, SEQUENCE_LEN)
    assert short_window(SEQUENCE_LEN) == 128
    with torch.no_grad():  # the reference init leaves these at values that would hide mistakes
        model.x0_lambdas.normal_(0, 0.3)
        model.backout_lambda.fill_(0.4)
    run_dir = tmp_path_factory.mktemp("run")
    tokenizer.save(run_dir / "tokenizer")
    save_checkpoint(run_dir / "base", 1, model.state_dict(), {})
    atomic_write_json(run_dir / "base" / "config.json", {"model": model.config.to_dict()})
    return run_dir, model


@pytest.fixture(scope="module")
def hf(run, tmp_path_factory):
    """The exported folder loaded with transformers: (folder, model, tokenizer)."""
    run_dir, _ = run
    folder = export_hf(run_dir)
    with pytest.MonkeyPatch.context() as patch:
        # Remote code is copied into a modules cache; keep it out of the home folder.
        patch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        # AutoTokenizer reads config.json first, which names remote code; the tokenizer itself is a stock one.
        hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return folder, model.eval(), hf_tokenizer


def test_folder_holds_weights_config_tokenizer_and_code(run, hf):
    run_dir, model = run
    folder, hf_model, hf_tokenizer = hf
    assert folder == run_dir / "export" / "hf"
    assert {path.name for path in folder.iterdir()} == EXPORTED_FILES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "picochat" and config["architectures"] == ["PicochatForCausalLM"]
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert config["vocab_size"] == model.config.vocab_size < model.config.padded_vocab_size  # sliced
    assert config["attention_windows"] == [128, 128, 128, 256]
    assert config["torch_dtype"] == "float32"
    generation = json.loads((folder / "generation_config.json").read_text())
    specials = run_dir / "tokenizer"
    ids = Tokenizer.load(specials).special_token_ids
    assert generation["eos_token_id"] == [ids["<|assistant_end|>"], ids["<|bos|>"]]
    assert hf_model.generation_config.eos_token_id == generation["eos_token_id"]
    assert type(hf_tokenizer).__module__.startswith("transformers.")  # a stock tokenizer class, no remote code
    assert hf_tokenizer.bos_token == "<|bos|>" and hf_tokenizer.eos_token == "<|assistant_end|>"
    assert "trust_remote_code" in (folder / "README.md").read_text()
    weights = load_file(folder / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert torch.equal(weights["model.wte.weight"], model.wte.weight[: model.config.vocab_size])


def test_modeling_files_import_only_torch_and_transformers(hf):
    folder, _, _ = hf
    for name in MODELING_FILES:
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"__future__", "math", "torch", "transformers", "."}, (name, ast.dump(node))


def test_logits_match_past_the_sliding_window(run, hf, data_dir, tokenizer):
    _, model = run
    _, hf_model, _ = hf
    texts = wiki_texts(data_dir, 4)
    rows = [tokenizer.encode(text, prepend="<|bos|>")[:200] for text in texts[:2]]
    assert all(len(row) == 200 for row in rows)  # longer than the 128-token short window
    batch = torch.tensor(rows)
    with torch.no_grad():
        ours, theirs = model(batch), hf_model(batch).logits
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    with torch.no_grad():  # the loss with labels (shifted inside, transformers' convention) is our loss
        our_loss = model(batch[:, :-1], targets=batch[:, 1:])
        torch.testing.assert_close(hf_model(batch, labels=batch).loss, our_loss, atol=1e-5, rtol=0)
    # Past the long window too (the full context, 256): every layer's window binds.
    long_row = torch.tensor([tokenizer.encode(texts[2] + texts[3], prepend="<|bos|>")[:300]])
    assert long_row.size(1) == 300
    with torch.no_grad():
        torch.testing.assert_close(hf_model(long_row).logits, model(long_row), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_cached_forward_in_pieces_equals_one_forward(run, hf, data_dir, tokenizer, cache_argument):
    """The cache path used outside generate: a prefill, then chunks and single tokens (the smear state comes from
    the cache), past the short window. The cache is accepted under transformers' new name and its older one."""
    from transformers import DynamicCache

    _, model = run
    _, hf_model, _ = hf
    ids = torch.tensor([tokenizer.encode(wiki_texts(data_dir, 1)[0], prepend="<|bos|>")[:160]])
    with torch.no_grad():
        full = model(ids)
        cache = DynamicCache(config=hf_model.config)
        pieces = [hf_model(ids[:, :100], use_cache=True, **{cache_argument: cache}).logits]
        assert cache.get_seq_length() == 100
        pieces.append(hf_model(ids[:, 100:150], use_cache=True, **{cache_argument: cache}).logits)
        for position in range(150, 160):
            pieces.append(hf_model(ids[:, position : position + 1], use_cache=True, **{cache_argument: cache}).logits)
    assert cache.get_seq_length() == 160
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_a_cache_under_an_unknown_name_is_refused(hf):
    """If a future transformers hands the cache over under yet another name, the forward must fail loudly rather
    than decode every step from an empty cache."""
    from transformers import DynamicCache

    _, hf_model, _ = hf
    with pytest.raises(ValueError, match="'cache_params'.*does not read"), torch.no_grad():
        hf_model(torch.tensor([[1, 2, 3]]), use_cache=True, cache_params=DynamicCache(config=hf_model.config))


class CacheLengths:
    """Records, for every forward of the exported base model, how many tokens the cache it was handed already
    held (None: no cache) -- whichever name transformers passes it under."""

    def __init__(self, hf_model):
        from transformers import Cache

        self.seen: list[int | None] = []

        def record(module, args, kwargs):
            caches = [value for value in kwargs.values() if isinstance(value, Cache)]
            self.seen.append(caches[0].get_seq_length() if caches else None)

        self.handle = hf_model.model.register_forward_pre_hook(record, with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def greedy_until_stop(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """The engine's greedy tokens, up to and including a stop token (as transformers reports them)."""
    tokens = []
    for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=0):
        tokens.append(column[0])
    return tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_equals_the_engine(run, hf, data_dir, tokenizer, use_cache):
    _, model = run
    _, hf_model, _ = hf
    engine = Engine(model, tokenizer)
    # A chat prompt, and a raw-text prompt of 120 tokens whose 20 new tokens run past the 128-token window.
    chat_prompt = tokenizer.render_for_completion(CONVERSATION)
    text_prompt = tokenizer.encode(wiki_texts(data_dir, 6)[5], prepend="<|bos|>")[:120]
    for prompt in (chat_prompt, text_prompt):
        expected = greedy_until_stop(engine, prompt, 20)
        with CacheLengths(hf_model) as cache_lengths:
            output = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=20,
                use_cache=use_cache,
            )
        assert output[0, len(prompt) :].tolist() == expected
        # Loud, not silent, if transformers stops handing the cache to the model: each decode step after the
        # prefill must read a cache holding every token before it.
        steps = len(cache_lengths.seen)
        assert steps == len(expected)
        if use_cache:  # the prefill gets an empty cache, or none and makes its own (transformers < 5.24)
            assert cache_lengths.seen[0] in (0, None)
            assert cache_lengths.seen[1:] == list(range(len(prompt), len(prompt) + steps - 1))
        else:
            assert cache_lengths.seen == [None] * steps


def test_batched_greedy_generate_equals_the_engine_row_by_row(run, hf, data_dir, tokenizer):
    _, model = run
    _, hf_model, _ = hf
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(text, prepend="<|bos|>")[:90] for text in wiki_texts(data_dir, 9)[7:9]]
    with CacheLengths(hf_model) as cache_lengths:
        output = hf_model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=20)
    assert cache_lengths.seen[0] in (0, None)
    assert cache_lengths.seen[1:] == list(range(90, 90 + len(cache_lengths.seen) - 1))
    for row, prompt in enumerate(prompts):
        expected = greedy_until_stop(engine, prompt, 20)
        assert output[row, 90 : 90 + len(expected)].tolist() == expected


def test_tokenizer_ids_equal_ours(hf, tokenizer):
    _, _, hf_tokenizer = hf
    samples = [
        "Hello world", "  many   spaces\n\n\ttabs\r\n  ", "1234567 3.14159 x=42 1,000,000", "héllo wörld ñ",
        "日本語のテキスト 😀🎉 Ελληνικά", "don't I'LL we've they'RE", "a\u00a0b\u2003c\u200bd", "", " ", "\n\n\n",
        "x" * 300, "<|bos|>", "text <|user_start|>hi<|user_end|> <|assistant_end|> more",
    ]  # fmt: skip
    for text in samples:
        ours = tokenizer.encode(text)
        assert hf_tokenizer(text, split_special_tokens=True)["input_ids"] == ours, text
        assert hf_tokenizer.decode(ours) == text
        if "<|" not in text:
            assert hf_tokenizer(text)["input_ids"] == ours, text
    # The documented difference: typed special-token strings become special tokens by default in transformers
    # (ours never do); split_special_tokens=True above gives our behaviour.
    assert hf_tokenizer("<|bos|>")["input_ids"] == [tokenizer.bos_token_id]
    assert tokenizer.encode("<|bos|>") != [tokenizer.bos_token_id]


def test_tokenizer_conversion_on_a_full_size_vocabulary(data_dir):
    """The rank -> merges conversion on GPT-2's 50,257 byte-level ranks with our split pattern, against tiktoken,
    over real documents of several kinds (the tiny test tokenizer has few merges to get wrong)."""
    from tokenizers import Tokenizer as HFTokenizer

    ranks = {}
    for line in (data_dir / "tokenizers" / "gpt2.tiktoken").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    ours = Tokenizer(ranks)
    theirs = HFTokenizer.from_str(json.dumps(hf_tokenizer_json(ours)))
    texts = [text[:5000] for text in wiki_texts(data_dir, 100)]
    for name in ("c4_demo.jsonl", "dclm_web_agreement.jsonl"):
        with open(data_dir / "pretrain" / name, encoding="utf-8") as f:
            texts += [json.loads(next(f))["text"][:5000] for _ in range(50)]
    mismatched = [text[:60] for text in texts if theirs.encode(text).ids != ours.encode(text)]
    assert not mismatched
    assert theirs.token_to_id("<|bos|>") == ours.bos_token_id


def test_chat_template_renders_our_prompts(hf, tokenizer):
    _, _, hf_tokenizer = hf
    rendered = hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert ids == tokenizer.render_for_completion(CONVERSATION)
    # Without the generation prompt, a conversation ending with the assistant renders as for training.
    finished = [*CONVERSATION[:-1]]
    rendered = hf_tokenizer.apply_chat_template(finished, add_generation_prompt=False, tokenize=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert ids == tokenizer.render_conversation(finished, max_tokens=10_000)[0]
    # No system message: nothing is merged into the first user message.
    plain = CONVERSATION[1:4]
    rendered = hf_tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert ids == tokenizer.render_for_completion(plain)


def test_loads_and_runs_without_picochat(run, hf, tmp_path):
    """The folder is self-contained: with `import picochat` made impossible, transformers still loads it and gives
    our logits."""
    _, model = run
    folder, _, _ = hf
    ids = torch.arange(1, 151).remainder(model.config.vocab_size).unsqueeze(0)
    result = tmp_path / "logits.safetensors"
    code = (
        "import sys, torch; sys.modules['picochat'] = None\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"ids = torch.arange(1, 151).remainder({model.config.vocab_size}).unsqueeze(0)\n"
        "with torch.no_grad():\n"
        f"    save_file({{'logits': model(ids).logits.contiguous()}}, {str(result)!r})\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(load_file(result)["logits"], model(ids), atol=1e-4, rtol=0)


def test_cli_export_and_its_errors(run, tmp_path, capsys):
    run_dir, model = run
    missing = tmp_path / "no_such_run"
    assert main(["export", "--run-dir", str(missing)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(missing) in error

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--force" in error and str(out) in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched

    assert main(["export", "--run-dir", str(run_dir), "--out", str(run_dir.parent), "--force"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds the run folder" in error
    assert (run_dir / "base" / "model.safetensors").is_file()

    assert main(["export", "--run-dir", str(run_dir), "--stage", "sft"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "sft" in error

    assert main(["export", "--run-dir", str(run_dir), "--stage", "base", "--step", "1", "--out", str(out),
                 "--force"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    assert {p.name for p in out.iterdir()} == EXPORTED_FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary and old folders removed
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight[: model.config.vocab_size])
