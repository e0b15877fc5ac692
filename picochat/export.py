"""Export a trained model as a Hugging Face model folder (`picochat export --format hf`).

The folder loads with plain `transformers`:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)

(The tokenizer is a stock one; AutoTokenizer reads config.json first, which names remote code, and without the flag
it asks on the terminal.)

What goes in it, and why each piece looks the way it does:
- model.safetensors: the fp32 weights under the names picochat/hf/modeling_picochat.py uses ("model." + ours,
  and lm_head). The vocabulary is *sliced* to the tokenizer's real size: picochat pads it to a multiple of 64 for
  matmul speed, but the padded rows are never read (ids stay below the real size) and picochat drops their
  logits, so slicing keeps the logits identical and lets config.vocab_size equal the tokenizer's size.
- config.json: PicochatConfig (HF field names + our per-layer windows), with auto_map pointing at the two modeling
  files copied next to it. Remote code is required: smear, backout, value embeddings, the resid/x0 lambdas and the
  soft-capped logits exist in no stock transformers architecture.
- tokenizer.json: a `tokenizers` byte-level BPE built from our mergeable ranks (see hf_tokenizer_json), so ids
  equal tiktoken's; tokenizer_config.json carries a Jinja chat template that renders conversations exactly as
  Tokenizer.render_for_completion does.
- generation_config.json: stops on <|assistant_end|> and <|bos|> (the engine's default stop tokens).

The folder is written into a temporary sibling and renamed into place at the end, so a crash never leaves half an
export under the final name; an existing non-empty folder is only replaced with force=True.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, atomic_write_json, atomic_write_text, log

HF_SOURCE_DIR = Path(__file__).resolve().parent / "hf"
MODELING_FILES = ("configuration_picochat.py", "modeling_picochat.py")
FORMATS = ("hf",)
REMOTE_CODE_NOTE = (
    "needs trust_remote_code=True: smear, backout, value embeddings, per-layer residual scalars and soft-capped "
    "logits are not in any stock transformers architecture"
)


def export_locations(run_dir, out_dir, stage: str | None, kind: str, force: bool) -> tuple[Path, Path, Path]:
    """(run folder, stage folder, output folder) of an export; the output defaults to <run>/export/<kind>. Refuses an
    output folder that holds the run (--force would replace the run itself) or one that is not empty without force."""
    from picochat import locate_stage

    run_dir, stage_dir = locate_stage(run_dir, stage)
    out_dir = Path(out_dir).expanduser() if out_dir is not None else run_dir / "export" / kind
    if run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise PicochatError(f"--out {out_dir}: it holds the run folder {run_dir}; choose a folder outside it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise PicochatError(f"{out_dir}: already exists and is not empty (pass --force to replace it)")
    return run_dir, stage_dir, out_dir


def export_hf(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    stage: str | None = None,
    step: int | None = None,
    force: bool = False,
) -> Path:
    """Write a Hugging Face model folder for a trained stage of a run; returns the folder.

    run_dir: the run folder (holding tokenizer/ and the stage folders) or a stage folder itself.
    out_dir: default <run>/export/hf. stage: default the newest stage with weights. step: a saved checkpoint step
    of that stage (default: its latest weights). force: replace an existing non-empty out_dir.
    """
    import torch

    from picochat.checkpoint import load_model
    from picochat.tokenizer import Tokenizer

    run_dir, stage_dir, out_dir = export_locations(run_dir, out_dir, stage, "hf", force)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(stage_dir, device="cpu", step=step, compute_dtype=torch.float32)
    config = model.config
    if config.vocab_size != tokenizer.vocab_size:
        raise PicochatError(
            f"{stage_dir / 'config.json'}: model vocab_size {config.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab_size} ({run_dir / 'tokenizer'}): they come from different runs"
        )

    specials = tokenizer.special_token_ids
    bos, assistant_end = specials["<|bos|>"], specials["<|assistant_end|>"]
    portable = config.architecture == "portable"
    if portable:  # a stock Qwen3: no remote code (picochat/export_portable.py)
        from picochat.export_portable import qwen3_config

        hf_config = qwen3_config(config, bos=bos, eos=[assistant_end, bos], pad=assistant_end)
    else:
        hf_config = _picochat_config(model, config, bos=bos, assistant_end=assistant_end)
    hf_config["picochat"] = {"model": config.to_dict(), "stage": stage_dir.name, "step": step}
    generation_config = {
        "bos_token_id": bos,
        "eos_token_id": [assistant_end, bos],
        "pad_token_id": assistant_end,
        "max_new_tokens": min(256, config.sequence_len // 2),  # a chat reply's default budget, as in the engine
        # The settings of `picochat chat`; pass do_sample=False for greedy decoding.
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 50,
    }

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        if portable:
            from picochat.export_portable import write_qwen3_weights

            write_qwen3_weights(tmp_dir / "model.safetensors", model.state_dict(), config.vocab_size)
        else:
            _write_weights(tmp_dir / "model.safetensors", model.state_dict(), config.vocab_size)
        atomic_write_json(tmp_dir / "config.json", hf_config)
        atomic_write_json(tmp_dir / "generation_config.json", generation_config)
        atomic_write_text(tmp_dir / "tokenizer.json", json.dumps(hf_tokenizer_json(tokenizer), ensure_ascii=False))
        atomic_write_json(tmp_dir / "tokenizer_config.json", hf_tokenizer_config(tokenizer, config.sequence_len))
        atomic_write_json(tmp_dir / "special_tokens_map.json", _special_tokens_map(tokenizer))
        for name in () if portable else MODELING_FILES:
            atomic_write_text(tmp_dir / name, (HF_SOURCE_DIR / name).read_text(encoding="utf-8"))
        atomic_write_text(tmp_dir / "README.md", _model_card(run_dir, stage_dir, step, config, portable))
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    note = "a stock Qwen3: loads without trust_remote_code" if portable else REMOTE_CODE_NOTE
    log(f"export: {stage_dir} -> {out_dir} (Hugging Face format; {note})")
    return out_dir


def _picochat_config(model, config, *, bos: int, assistant_end: int) -> dict:
    """config.json of the reference architecture: PicochatConfig, whose code is copied next to it."""
    from picochat.gpt import window_sizes

    return {
        "architectures": ["PicochatForCausalLM"],
        "model_type": "picochat",
        "auto_map": {
            "AutoConfig": "configuration_picochat.PicochatConfig",
            "AutoModel": "modeling_picochat.PicochatModel",
            "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM",
        },
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "attention_windows": window_sizes(config),
        "window_pattern": config.window_pattern,
        "value_embedding_layers": sorted(int(i) for i in model.value_embeds),
        "backout_layer": config.n_layer // 2,
        "bos_token_id": bos,
        "eos_token_id": [assistant_end, bos],
        "pad_token_id": assistant_end,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
        "tie_word_embeddings": False,
    }


def _write_weights(path: Path, state: dict[str, Any], vocab_size: int) -> None:
    """Our state dict under the modeling file's names, vocabulary rows sliced to the real size, fsynced."""
    from safetensors.torch import save_file

    vocab_rows = {"wte.weight", "lm_head.weight"}
    weights = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name in vocab_rows or name.startswith("value_embeds."):
            tensor = tensor[:vocab_size]
        weights[name if name == "lm_head.weight" else f"model.{name}"] = tensor.contiguous()
    # Written straight into the temporary export folder: the folder's rename is what makes the export atomic.
    save_file(weights, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished temporary folder to out_dir; an old out_dir is moved aside first, removed last."""
    old = None
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer, for `tokenizers` / transformers
#
# tiktoken encodes a chunk of text (one regex match) like this: if the chunk's bytes are a token, that token;
# otherwise start from single bytes and repeatedly merge the adjacent pair whose concatenation has the lowest rank.
# A `tokenizers` BPE does the same with: the same regex split (isolated matches), bytes mapped to GPT-2's printable
# alphabet (ByteLevel without its own regex), ignore_merges=True (a chunk that is a whole token is emitted as is),
# and a merge list ordered by the rank of the merged token, listing every (left, right) split of each token whose
# halves are tokens (so any pair tiktoken may meet can be merged). The one theoretical difference: when two
# *overlapping* pairs in a chunk make the same token (e.g. [ab, a, ba] -> "aba" either way), tiktoken merges the
# leftmost while `tokenizers` takes the pair listed first. The test compares the two on real text.


def hf_tokenizer_json(tokenizer) -> dict:
    """The tokenizer.json document (a `tokenizers` Tokenizer) equivalent to our tiktoken encoding."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from picochat.tokenizer import SPLIT_PATTERN, SPLIT_PATTERN_NO_POSSESSIVE, byte_to_unicode

    to_char = byte_to_unicode()

    def printable(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    ranks = tokenizer.mergeable_ranks
    vocab = {printable(token): rank for token, rank in ranks.items()}
    merges = bpe_merges(ranks)

    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = HFTokenizer(model)
    # Oniguruma (the regex engine of `tokenizers`) gets the possessive-free form of our default pattern, which
    # splits identically (see picochat/tokenizer.py).
    pattern = SPLIT_PATTERN_NO_POSSESSIVE if tokenizer.pattern == SPLIT_PATTERN else tokenizer.pattern
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    # Added in order after the len(ranks) mergeable tokens, so they get our ids.
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tokenizer.special_tokens])
    for name, token_id in tokenizer.special_token_ids.items():
        if hf.token_to_id(name) != token_id:
            raise RuntimeError(f"tokenizer export: {name} got id {hf.token_to_id(name)}, expected {token_id}")
    return json.loads(hf.to_str())


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """The merge list equivalent to tiktoken's ranks (see above), in GPT-2's printable byte alphabet: for every token
    in rank order, each (left, right) split of it whose halves are both tokens. The GGUF export writes the same."""
    from picochat.tokenizer import byte_to_unicode

    to_char = byte_to_unicode()

    def printable(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(left, right) for left, right in splits if left in ranks and right in ranks]
        pairs.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((printable(left), printable(right)) for left, right in pairs)
    return merges


def chat_template() -> str:
    """Jinja that renders messages as Tokenizer.render_conversation does (then <|assistant_start|> when
    add_generation_prompt): <|bos|>, a leading system message merged into the first user message with a blank
    line, user turns in <|user_start|> .. <|user_end|>, assistant turns in <|assistant_start|> ..
    <|assistant_end|>; assistant content may be a string or a list of parts (text, python, python_output)."""
    return (
        "{%- set ns = namespace(system='') -%}"
        "<|bos|>"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('a system message may only come first') }}{%- endif -%}"
        "{%- set ns.system = message['content'] + '\n\n' -%}"
        "{%- elif message['role'] == 'user' -%}"
        "<|user_start|>{{ ns.system + message['content'] }}<|user_end|>"
        "{%- set ns.system = '' -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "<|assistant_start|>"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
        "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
        "{%- else -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "<|assistant_end|>"
        "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
    )


def hf_tokenizer_config(tokenizer, max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "additional_special_tokens": [
            name for name in tokenizer.special_tokens if name not in ("<|bos|>", "<|assistant_end|>")
        ],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(),
    }


def _special_tokens_map(tokenizer) -> dict:
    return {
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "additional_special_tokens": [
            name for name in tokenizer.special_tokens if name not in ("<|bos|>", "<|assistant_end|>")
        ],
    }


def _model_card(run_dir: Path, stage_dir: Path, step: int | None, config, portable: bool = False) -> str:
    checkpoint = f"step {step}" if step is not None else "latest weights"
    remote = "" if portable else "trust_remote_code=True, "
    code_note = (
        "The model is a stock Qwen3 (picochat's portable architecture): plain transformers runs it, and so do "
        "llama.cpp, Ollama, MLX and vLLM (`picochat export --format gguf` writes the GGUF)."
        if portable
        else f"The model {REMOTE_CODE_NOTE}; the code is `modeling_picochat.py` in this folder (torch + transformers "
        "only)."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [picochat]
---

# {run_dir.name} ({stage_dir.name}, {checkpoint})

A small chat model trained with picochat (which follows the nanochat recipe):
{config.n_layer} layers, width {config.n_embd}, {config.n_head} query / {config.n_kv_head} key-value heads,
context {config.sequence_len} tokens, vocabulary {config.vocab_size}.

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FOLDER = "path/to/this/folder"  # or its id on the Hugging Face Hub

model = AutoModelForCausalLM.from_pretrained(FOLDER, {remote}dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(FOLDER{", " + remote.strip(", ") if remote else ""})  # stock tokenizer
messages = [{{"role": "user", "content": "Why is the sky blue?"}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=100, do_sample=False)
print(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
```

Notes:
- {code_note}
- Padding is not supported: generate one prompt at a time, or rows of equal length.
- `tokenizer(text)` adds no BOS token (the chat template does). Special-token strings typed in text (e.g.
  `<|bos|>`) become special tokens here, as usual in transformers; picochat itself encodes them as plain text.
  Pass `split_special_tokens=True` to get picochat's behaviour for plain text.
"""
