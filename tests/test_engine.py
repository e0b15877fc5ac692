"""The inference engine: cached generation equals naive recomputation, sampling, seeds, tool use, stop tokens,
row compaction, context management, UTF-8-safe streaming, the compute-dtype weight copy, and the Python API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import lively_model

import picochat
from picochat import engine as engine_module
from picochat.attention import KVCache
from picochat.checkpoint import save_checkpoint
from picochat.common import PicochatError, atomic_write_json
from picochat.engine import FINISHED, Engine, StreamDecoder, prepare_for_inference, sample_next_token
from picochat.gpt import GPT, GPTConfig


class ScriptedGPT(GPT):
    """A real GPT (so the cache is really used) whose next token is dictated where `script` says so:
    script(position, last_tokens) -> per row a token id, a tuple of equally likely ids, or None (the model's own
    prediction); or None for all rows. It also records the batch size of every forward."""

    script = None
    batch_sizes: list

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None, last_only=False):
        logits = super().forward(idx, targets, loss_reduction, kv_cache, last_only)
        if kv_cache is None:
            return logits
        self.batch_sizes.append(idx.size(0))
        wanted = self.script(kv_cache.position, idx[:, -1].tolist()) if self.script else None
        for row, tokens in enumerate(wanted or []):
            if tokens is not None:
                logits[row, -1] = -10.0
                logits[row, -1, list(tokens) if isinstance(tokens, tuple) else tokens] = 10.0
        return logits


def scripted_engine(tokenizer, script, **engine_settings) -> Engine:
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    engine = Engine(ScriptedGPT.build(config, "cpu"), tokenizer, **engine_settings)
    engine.model.script = script
    engine.model.batch_sizes = []
    return engine


def naive_greedy(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Recompute the whole sequence every step, no cache: the definition the engine must match."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


# ---- equivalence with naive generation -------------------------------------------------------------------


def test_greedy_engine_equals_naive_recompute_for_200_tokens(tokenizer):
    model = lively_model(tokenizer.vocab_size)
    assert max(model.window_sizes[:-1]) == 128 < 220  # the short windows really bind
    engine = Engine(model, tokenizer, tool=None)
    prompt = tokenizer.encode("The history of the city", prepend="<|bos|>")
    expected = naive_greedy(model, prompt, 200)
    for num_samples in (1, 3):
        completions = engine.generate_batch(
            prompt, num_samples=num_samples, max_tokens=200, temperature=0.0, stop_tokens=()
        )
        for completion in completions:
            assert completion.tokens == expected
            assert completion.finish_reason == "length" and completion.masks == [1] * 200


def test_prefill_logits_of_the_last_position_only(tokenizer):
    model = lively_model(tokenizer.vocab_size)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
    assert last.shape == (2, 1, tokenizer.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


def test_kv_cache_replicate_and_select_rows(tokenizer):
    model = lively_model(tokenizer.vocab_size)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 30))
    with torch.no_grad():
        single = model.new_kv_cache(batch_size=1, max_len=30)
        model(ids[:, :20], kv_cache=single)
        batch = KVCache.replicate(single, batch_size=3, max_len=30)
        assert batch.position == 20 and batch.batch_size == 3 and batch.max_len == 30
        assert torch.equal(batch.keys[:, 2, :20], single.keys[:, 0, :20])
        assert torch.equal(batch.prev_embedding[1], single.prev_embedding[0])
        # Three rows continue differently; keeping rows 2 and 0 must leave exactly their futures.
        continuations = torch.randint(0, tokenizer.vocab_size, (3, 10))
        reference = model(continuations[:, :5], kv_cache=batch)
        batch.select_rows(torch.tensor([2, 0]))
        assert batch.batch_size == 2 and batch.position == 25
        after = model(continuations[[2, 0], 5:], kv_cache=batch)
        full = model(torch.cat([ids[:, :20].expand(3, -1), continuations], dim=1))
    torch.testing.assert_close(reference, full[:, 20:25], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, full[[2, 0], 25:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="1 row"):
        KVCache.replicate(batch, batch_size=2, max_len=30)


def test_bf16_decode_attention_on_cpu_matches_fp32():
    # On CPU one bf16 query is attended in fp32 (PyTorch's bf16 kernel is slow there): same result, to bf16 precision.
    from picochat.attention import attention

    torch.manual_seed(0)
    keys, values = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    query = torch.randn(2, 1, 4, 16)
    key_cache = torch.zeros(2, 48, 2, 16, dtype=torch.bfloat16)
    value_cache = torch.zeros(2, 48, 2, 16, dtype=torch.bfloat16)
    key_cache[:, :39], value_cache[:, :39] = keys[:, :39], values[:, :39]
    out = attention(query.bfloat16(), keys[:, 39:].bfloat16(), values[:, 39:].bfloat16(), window=8,
                    key_cache=key_cache, value_cache=value_cache, cache_position=39)  # fmt: skip
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, 16)
    # Naive: the last 9 keys (window 8), each key/value head serving 2 query heads.
    k = keys[:, 31:].bfloat16().float().repeat_interleave(2, dim=2)
    v = values[:, 31:].bfloat16().float().repeat_interleave(2, dim=2)
    q = query.bfloat16().float()
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


# ---- sampling --------------------------------------------------------------------------------------------


def test_samples_draw_their_own_first_token_independently(tokenizer):
    # A fresh init (lm_head std 0.001): nearly uniform predictions.
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT.build(config, "cpu")
    engine = Engine(model, tokenizer, tool=None)
    completions = engine.generate_batch([tokenizer.bos_token_id], num_samples=32, max_tokens=6, seed=3, stop_tokens=())
    first_tokens = [completion.tokens[0] for completion in completions]
    assert len(set(first_tokens)) > 20  # 32 draws from ~300 near-equally likely tokens: ~30 distinct expected
    assert len({tuple(completion.tokens) for completion in completions}) == 32


def test_same_seed_same_text_other_seed_other_text(tokenizer):
    engine = Engine(lively_model(tokenizer.vocab_size), tokenizer)
    prompt = tokenizer.encode("Once upon a time", prepend="<|bos|>")
    runs = [engine.generate_batch(prompt, num_samples=2, max_tokens=30, seed=seed) for seed in (7, 7, 8)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert [c.tokens for c in runs[0]] != [c.tokens for c in runs[2]]
    greedy = [engine.generate_batch(prompt, max_tokens=20, temperature=0, seed=seed)[0].tokens for seed in (1, 2)]
    assert greedy[0] == greedy[1]


def test_sample_next_token_top_k_top_p_and_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)

    def draws(**settings):
        return sample_next_token(logits, generator, **settings).bincount(minlength=4).tolist()

    assert draws(temperature=0)[0] == 2000  # greedy
    assert draws(top_k=1)[1:] == [0, 0, 0]
    assert draws(top_k=2)[2:] == [0, 0]
    assert draws(top_p=0.5)[1:] == [0, 0, 0]  # the top token alone reaches 0.5
    assert draws(top_p=0.8)[2:] == [0, 0]  # 0.5 + 0.3 reach 0.8
    counts = draws(temperature=1.0)
    assert all(count > 0 for count in counts)
    assert abs(counts[0] / 2000 - 0.5) < 0.05  # it samples the softmax itself
    hot, cold = draws(temperature=5.0), draws(temperature=0.2)
    assert hot[3] > counts[3] > cold[3]


# ---- stop tokens, max tokens, tools, compaction ----------------------------------------------------------


def test_max_tokens_and_stop_token(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    prompt = [tokenizer.bos_token_id, 65, 66]

    def script(position, last_tokens):
        return [end if position == 6 else 70] * len(last_tokens)  # the token at position 6 ends the reply

    engine = scripted_engine(tokenizer, script, tool=None)
    steps = list(engine.generate(prompt, max_tokens=10, temperature=0.0))
    assert [column[0] for column, _ in steps] == [70, 70, 70, end]
    (completion,) = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
    assert completion.tokens == [70, 70, 70] and completion.finish_reason == "stop"
    (capped,) = engine.generate_batch(prompt, max_tokens=2, temperature=0.0)
    assert capped.tokens == [70, 70] and capped.finish_reason == "length"


def test_tool_use_forces_the_result_with_mask_zero(tokenizer):
    special = tokenizer.encode_special
    call = tokenizer.encode("12*3+4")
    after_output = tokenizer.encode(" so")
    planned = [special("<|python_start|>"), *call, special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("40"), special("<|output_end|>")]
    prompt = [tokenizer.bos_token_id]
    # What the model "writes" at each position; the forced output in between is the engine's doing.
    model_writes = {1 + i: token for i, token in enumerate(planned)}
    start_after = 1 + len(planned) + len(forced)
    model_writes.update({start_after + i: token for i, token in enumerate(after_output)})
    model_writes[start_after + len(after_output)] = special("<|assistant_end|>")

    def script(position, last_tokens):
        return [model_writes.get(position, 70)] * len(last_tokens)

    engine = scripted_engine(tokenizer, script)  # default tool: the calculator
    (completion,) = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert completion.tokens == planned + forced + after_output
    assert completion.masks == [1] * len(planned) + [0] * len(forced) + [1] * len(after_output)
    assert completion.finish_reason == "stop"
    assert completion.parts == [
        {"type": "python", "text": "12*3+4"},
        {"type": "python_output", "text": "40"},
        {"type": "text", "text": " so"},
    ]
    assert completion.text == " so"

    # A tool that has no answer (or fails) forces nothing: the model just carries on.
    def broken_tool(expression):
        raise RuntimeError("boom")

    warnings = []
    for tool in (lambda expression: None, broken_tool):
        engine = scripted_engine(tokenizer, script, tool=tool)
        engine_module.warn, saved = warnings.append, engine_module.warn
        try:
            (completion,) = engine.generate_batch(prompt, max_tokens=len(planned) + 3, temperature=0.0)
        finally:
            engine_module.warn = saved
        assert completion.tokens[: len(planned)] == planned and set(completion.masks) == {1}
    assert len(warnings) == 1 and "boom" in warnings[0]


def test_finished_rows_are_dropped_and_the_others_continue(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    # Each sample first picks 80, 81 or 82 (equally likely); then its last token decides the next one:
    # 80 stops at once, 81 writes 91 92 and stops, 82 writes 95 until max_tokens.
    follows = {80: end, 81: 91, 91: 92, 92: end, 82: 95, 95: 95}

    def script(position, last_tokens):
        if position == 2:  # the first sampled token (the prompt has 2)
            return [(80, 81, 82)] * len(last_tokens)
        return [follows[token] for token in last_tokens]

    engine = scripted_engine(tokenizer, script, tool=None)
    completions = engine.generate_batch([tokenizer.bos_token_id, 70], num_samples=12, max_tokens=10, seed=0)
    counts = {first: sum(c.tokens[0] == first for c in completions) for first in (80, 81, 82)}
    assert all(counts.values()), counts  # (seed 0 draws every kind)
    for completion in completions:
        expected = {80: ([80], "stop"), 81: ([81, 91, 92], "stop"), 82: ([82] + [95] * 9, "length")}
        assert (completion.tokens, completion.finish_reason) == expected[completion.tokens[0]]
    # One prefill at batch 1, then 12 rows; finished rows leave the batch at once.
    sizes = engine.model.batch_sizes
    assert sizes[:4] == [1, 12, 12 - counts[80], 12 - counts[80]]
    assert sizes[4:] == [counts[82]] * (len(sizes) - 4) and len(sizes) == 10


def test_generate_reports_finished_rows(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    engine = scripted_engine(tokenizer, lambda position, last: [end] * len(last), tool=None)
    steps = list(engine.generate([tokenizer.bos_token_id], num_samples=2, max_tokens=5))
    assert steps == [([end, end], [1, 1])]  # everyone stopped: no further steps
    assert FINISHED == -1


# ---- errors ----------------------------------------------------------------------------------------------


def test_bad_prompts_and_settings_are_clear_errors(tokenizer):
    engine = Engine(lively_model(tokenizer.vocab_size), tokenizer)
    bos = tokenizer.bos_token_id
    cases = [
        (dict(tokens=[]), "prompt is empty"),
        (dict(tokens=[-1, -1, -1]), "all 3 tokens are masked"),
        (dict(tokens=[bos, -1]), "token 1 is -1"),
        (dict(tokens=[bos, tokenizer.vocab_size]), f"expected an id in \\[0, {tokenizer.vocab_size}\\)"),
        (dict(tokens=["a", "b"]), "sequence of token ids"),
        (dict(tokens=[bos] * 256), "leaves no room"),
        (dict(tokens=[bos] * 200, max_tokens=100), "lower max_tokens to 56"),
        (dict(tokens=[bos], max_tokens=0), "max_tokens 0"),
        (dict(tokens=[bos], num_samples=0), "num_samples 0"),
        (dict(tokens=[bos], temperature=-1), "temperature -1"),
        (dict(tokens=[bos], top_k=0), "top_k 0"),
        (dict(tokens=[bos], top_p=1.5), "top_p 1.5"),
    ]
    for arguments, message in cases:
        with pytest.raises(PicochatError, match=message):
            engine.generate(**arguments)
    other_tokenizer_model = lively_model(tokenizer.vocab_size + 1)
    with pytest.raises(PicochatError, match="different runs"):
        Engine(other_tokenizer_model, tokenizer)


def test_conversation_drops_oldest_turns_to_fit_with_a_notice(tokenizer, monkeypatch):
    notices = []
    monkeypatch.setattr(engine_module, "warn", notices.append)
    engine = Engine(lively_model(tokenizer.vocab_size), tokenizer)  # context 256
    long_text = "word " * 40
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {long_text}"}, {"role": "assistant", "content": long_text}]
    messages.append({"role": "user", "content": "last question"})
    kept, prompt = engine.fit_conversation(messages, max_tokens=64)
    assert len(prompt) + 64 <= 256
    assert kept[0] == messages[0] and kept[-1] == messages[-1]  # the system message and the question stay
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # what goes is the oldest exchanges
    assert len(kept) < len(messages) and len(notices) == 1 and "dropped" in notices[0]
    assert prompt == tokenizer.render_for_completion(kept)
    # Fitting what already fits changes nothing and says nothing.
    assert engine.fit_conversation(kept, max_tokens=64) == (kept, prompt) and len(notices) == 1
    (reply,) = engine.chat(messages, max_tokens=64, seed=0)  # never a crash
    assert reply.finish_reason in ("stop", "length")
    with pytest.raises(PicochatError, match="exceeds the model's context of 256"):
        engine.fit_conversation([{"role": "user", "content": "word " * 300}], max_tokens=16)
    with pytest.raises(PicochatError, match="messages"):
        engine.fit_conversation([], max_tokens=16)


# ---- streaming -------------------------------------------------------------------------------------------


def test_stream_decoder_never_splits_a_character_nor_prints_specials(tokenizer):
    text = "Grüße, 日本語 and emoji 🎉👩‍💻 — done"
    tokens = tokenizer.encode(text)
    assert any(not tokenizer.decode([t]).isprintable() or "\ufffd" in tokenizer.decode([t]) for t in tokens)
    special = tokenizer.encode_special
    stream = [*tokens, special("<|python_start|>"), *tokenizer.encode("2+2"), special("<|python_end|>"),
              special("<|output_start|>"), *tokenizer.encode("4"), special("<|output_end|>"),
              *tokenizer.encode(" ✓"), special("<|assistant_end|>")]  # fmt: skip
    decoder = StreamDecoder(tokenizer)
    pieces = []
    for token in stream:
        pieces += decoder.push(token)
    pieces += decoder.finish()
    assert all("\ufffd" not in piece.text and "<|" not in piece.text for piece in pieces)
    assert "".join(p.text for p in pieces if p.kind == "text") == text + " ✓"
    assert [(p["type"], p["text"]) for p in decoder.parts] == [
        ("text", text), ("python", "2+2"), ("python_output", "4"), ("text", " ✓"),
    ]  # fmt: skip
    # Bytes that can never complete a character come out as U+FFFD at the end, not as an exception.
    broken = StreamDecoder(tokenizer)
    partial = tokenizer.encode("日")[:1]
    assert broken.push(partial[0]) == [] and broken.finish()[0].text == "\ufffd"


def test_stream_chat_yields_pieces(tokenizer):
    engine = Engine(lively_model(tokenizer.vocab_size), tokenizer)
    messages = [{"role": "user", "content": "Hello"}]
    pieces = list(engine.stream_chat(messages, max_tokens=24, seed=5))
    (completion,) = engine.chat(messages, max_tokens=24, seed=5)
    streamed = {}
    for piece in pieces:
        streamed[piece.kind] = streamed.get(piece.kind, "") + piece.text
    collected = {}
    for part in completion.parts:
        collected[part["type"]] = collected.get(part["type"], "") + part["text"]
    assert streamed == collected


# ---- weights in the compute dtype ------------------------------------------------------------------------


def test_bf16_inference_copy_matches_the_fp32_master_model(tokenizer):
    masters = lively_model(tokenizer.vocab_size)
    engine = Engine(masters, tokenizer, compute_dtype=torch.bfloat16)
    floating = [p for p in engine.model.parameters() if p.is_floating_point()]
    assert {p.dtype for p in floating} == {torch.bfloat16} and engine.model.cos.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in engine.model.parameters())
    weight = engine.model.blocks[0].attn.c_q.weight
    assert weight.to(torch.bfloat16) is weight  # the per-forward cast is a no-op: nothing is re-cast per step
    assert masters.blocks[0].attn.c_q.weight.dtype == torch.float32  # the masters are untouched

    # The same weights computed in bf16 by the fp32-master model (casting on the fly) give the same logits, exactly.
    reference = GPT.build(masters.config, "cpu", compute_dtype=torch.bfloat16)
    reference.load_state_dict(masters.state_dict())
    ids = torch.randint(0, tokenizer.vocab_size, (2, 50))
    with torch.no_grad():
        assert torch.equal(engine.model(ids), reference(ids))
        caches = [model.new_kv_cache(batch_size=2, max_len=60) for model in (engine.model, reference)]
        for model, cache in zip((engine.model, reference), caches):
            model(ids, kv_cache=cache)
        step = torch.randint(0, tokenizer.vocab_size, (2, 1))
        assert torch.equal(engine.model(step, kv_cache=caches[0]), reference(step, kv_cache=caches[1]))
    completions = engine.generate_batch([tokenizer.bos_token_id, 70], max_tokens=20, temperature=0, stop_tokens=())
    assert len(completions[0].tokens) == 20

    # Training the masters and syncing the copy.
    with torch.no_grad():
        masters.lm_head.weight.mul_(2)
    engine.sync_weights()
    assert torch.equal(engine.model.lm_head.weight, masters.lm_head.weight.to(torch.bfloat16))


def test_fp32_inference_shares_the_weights_and_in_place_conversion(tokenizer):
    model = lively_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    assert engine.model is not model
    assert engine.model.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()  # no second copy in fp32
    assert model.lm_head.weight.requires_grad  # but the source still trains
    converted = prepare_for_inference(model, torch.bfloat16, copy=False)
    assert converted is model and model.lm_head.weight.dtype == torch.bfloat16 and model.compute_dtype == torch.bfloat16


# ---- the Python API --------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_run(tmp_path, tokenizer, monkeypatch):
    """A run folder as the pipeline writes it, named "myrun": tokenizer/ and a base stage (config.json, weights)."""
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    run_dir = home / "runs" / "myrun"
    tokenizer.save(run_dir / "tokenizer")
    model = lively_model(tokenizer.vocab_size)
    save_checkpoint(run_dir / "base", 5, model.state_dict(), {"step": 5})
    atomic_write_json(run_dir / "base" / "config.json", {"model": model.config.to_dict()})
    return run_dir


# The example in the README (and in picochat/__init__.py), run exactly as written.
README_EXAMPLE = """\
import picochat
model, tokenizer = picochat.load("myrun")          # the newest trained stage of runs/myrun
engine = picochat.Engine(model, tokenizer)
for piece in engine.stream_chat([{"role": "user", "content": "Why is the sky blue?"}]):
    print(piece.text, end="", flush=True)
"""


def test_readme_example_runs_as_written(tiny_run, capsys):
    assert README_EXAMPLE.strip() in picochat.__doc__.replace("\n    ", "\n")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "```python\n" + README_EXAMPLE + "```" in readme, "the README's Python example changed: update this test"
    namespace: dict = {}
    exec(README_EXAMPLE, namespace)
    model = namespace["model"]
    assert model.training is False and not model.lm_head.weight.requires_grad
    assert "<|" not in capsys.readouterr().out


def test_load_accepts_a_run_name_folder_or_stage_folder(tiny_run):
    reference, _ = picochat.load("myrun")
    for location, stage in ((tiny_run, None), (tiny_run, "base"), (tiny_run / "base", None), (str(tiny_run), None)):
        model, tokenizer = picochat.load(location, stage=stage)
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    model, _ = picochat.load(tiny_run, step=5, compute_dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for location, stage, message in [
        ("no-such-run", None, "neither a folder nor a run"),
        (tiny_run, "sft", "no trained model"),
        (tiny_run / "base", "sft", "stage folder"),
        (tiny_run, "bogus", "expected one of"),
    ]:
        with pytest.raises(PicochatError, match=message):
            picochat.load(location, stage=stage)


def test_importing_picochat_stays_free_of_torch():
    code = "import sys, picochat\nassert 'torch' not in sys.modules\nE = picochat.Engine\nprint(E.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Engine"
    with pytest.raises(AttributeError):
        picochat.NoSuchThing  # noqa: B018
