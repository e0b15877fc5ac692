"""Export of a portable model (picochat/portable.py): a stock Qwen3 for transformers, and a GGUF for llama.cpp/Ollama.

    picochat export --format hf   --run myrun                 # -> <run>/export/hf: Qwen3ForCausalLM, no remote code
    picochat export --format gguf --run myrun [--quant q8_0]  # -> <run>/export/gguf: model.gguf + Modelfile

Hugging Face: the folder is export.export_hf's (tokenizer.json, the chat template, generation_config.json), with
config.json a plain `qwen3` config and the weights under transformers' Qwen3 names. PortableGPT's modules already
carry those names, so the mapping only adds prefixes (wte -> model.embed_tokens, blocks -> model.layers, norm ->
model.norm); nothing is permuted, because both use the half-split (rotate_half) rotary layout.

GGUF (written with the `gguf` package from PyPI; no llama.cpp checkout needed):
- architecture `qwen3`, llama.cpp's tensor names (token_embd, blk.N.attn_q, ..., attn_q_norm, ffn_gate, output_norm,
  output). Qwen3 uses llama.cpp's NEOX rope (rotate_half), so Q and K are stored as they are: llama.cpp only permutes
  them for the `llama` architecture, whose rope is interleaved.
- weights: f32, f16 (the default) or q8_0 for the 2-D matrices (a matrix whose rows are not a whole number of 32-value
  q8_0 blocks stays f16); norm weights always f32, as llama.cpp's converter writes them.
- tokenizer: `gpt2` (byte-level BPE) with pre-tokenizer `llama-bpe`, which llama.cpp implements as Llama 3's split
  (tokenizer.LLAMA3_SPLIT_PATTERN): so a portable run's tokenizer must have been trained with that split
  (`--split-pattern llama-bpe`, which `picochat run --architecture portable` does); any other is refused, since
  llama.cpp would tokenise differently. Tokens are the byte-level strings of the ranks, the merges those of
  export.bpe_merges, the 9 specials are CONTROL tokens (llama.cpp then matches them in chat text). llama-bpe makes
  llama.cpp use whole-token matches first (ignore_merges), as tiktoken does. BOS is added (add_bos_token: every
  picochat document and conversation starts with <|bos|>), EOS and padding are <|assistant_end|>.
- the chat template (Jinja, the one of the HF folder), which llama-server --jinja and llama-cpp-python apply.
- Modelfile for Ollama: FROM ./model.gguf, the chat format as a Go template (Ollama adds the BOS itself), the
  <|assistant_end|> stop, and `picochat chat`'s sampling (temperature 0.6, top_k 50).

One limit outside picochat: transformers' GGUF reader takes a qwen3 head size of 128 whatever the file says (it reads
no `attention.key_length` for qwen3), so `from_pretrained(..., gguf_file=)` needs --head-dim 128, the default.
llama.cpp reads the head size from the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, atomic_write_text, log

QUANTS = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"
HF_HEAD_DIM = 128  # what transformers' GGUF reader assumes for qwen3 (see the module docstring)


def qwen3_config(config, *, bos: int, eos: list[int], pad: int) -> dict[str, Any]:
    """config.json of a Qwen3ForCausalLM with this shape. rope_theta is written both ways transformers has read it
    (5.x: rope_parameters; 4.x and other readers: rope_theta)."""
    from picochat.portable import RMS_NORM_EPS, intermediate_size
    from picochat.rotary import ROPE_BASE

    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": intermediate_size(config.n_embd),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": float(ROPE_BASE),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "dtype": "float32",
        "use_cache": True,
    }


def qwen3_name(name: str) -> str:
    """transformers' Qwen3 name of a PortableGPT state-dict entry."""
    if name == "lm_head.weight":
        return name
    if name.startswith("wte."):
        return "model.embed_tokens." + name.removeprefix("wte.")
    if name.startswith("blocks."):
        return "model.layers." + name.removeprefix("blocks.")
    return "model." + name  # norm.weight


def _sliced(state: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The state dict with the vocabulary rows cut to the tokenizer's size (picochat pads them to a multiple of 64;
    the padded rows are never read, and their logits are dropped), detached, on the CPU, contiguous."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name in ("wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab_size]
        out[name] = tensor.contiguous()
    return out


def write_qwen3_weights(path: Path, state: dict[str, Any], vocab_size: int) -> None:
    from safetensors.torch import save_file

    weights = {qwen3_name(name): tensor for name, tensor in _sliced(state, vocab_size).items()}
    save_file(weights, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------
# GGUF

_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name of a PortableGPT state-dict entry (the `qwen3` architecture)."""
    top = {"wte.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)  # blocks.N.rest
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def gguf_vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for the GGUF: byte-level strings by id, NORMAL or CONTROL, "left right"."""
    import gguf

    from picochat.export import bpe_merges
    from picochat.tokenizer import byte_to_unicode

    to_char = byte_to_unicode()
    tokens = [""] * tokenizer.vocab_size
    for token, rank in tokenizer.mergeable_ranks.items():
        tokens[rank] = "".join(to_char[b] for b in token)
    for name, token_id in tokenizer.special_token_ids.items():
        tokens[token_id] = name
    types = [int(gguf.TokenType.NORMAL)] * len(tokenizer.mergeable_ranks)
    types += [int(gguf.TokenType.CONTROL)] * len(tokenizer.special_tokens)
    merges = [f"{left} {right}" for left, right in bpe_merges(tokenizer.mergeable_ranks)]
    return tokens, types, merges


def check_gguf_tokenizer(tokenizer, source: Path) -> None:
    from picochat.tokenizer import split_pattern_name

    if split_pattern_name(tokenizer.pattern) != "llama-bpe":
        raise PicochatError(
            f"{source}: this tokenizer splits text with a pattern llama.cpp does not know, so llama.cpp would "
            "tokenise differently; a GGUF needs a tokenizer trained with `picochat tokenizer train --split-pattern "
            "llama-bpe` (as `picochat run --architecture portable` does)"
        )


def write_gguf(path: Path, model, tokenizer, *, quant: str = "f16", name: str = "picochat") -> None:
    """The GGUF file of a PortableGPT and its tokenizer (see the module docstring)."""
    import gguf
    import numpy as np

    from picochat.export import chat_template
    from picochat.portable import RMS_NORM_EPS, intermediate_size
    from picochat.rotary import ROPE_BASE

    if quant not in QUANTS:
        raise PicochatError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    config = model.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]  # fmt: skip
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.sequence_len)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(intermediate_size(config.n_embd))
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(ROPE_BASE))
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)

    tokens, types, merges = gguf_vocabulary(tokenizer)
    specials = tokenizer.special_token_ids
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<|bos|>"])
    writer.add_eos_token_id(specials["<|assistant_end|>"])
    writer.add_pad_token_id(specials["<|assistant_end|>"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template())

    for key, tensor in _sliced(model.state_dict(), config.vocab_size).items():
        data = tensor.float().numpy()
        if data.ndim == 1 or quant == "f32":
            writer.add_tensor(gguf_name(key), data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(key), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(key), data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def ollama_modelfile(sequence_len: int, gguf_file: str = GGUF_FILE) -> str:
    """An Ollama Modelfile for the GGUF next to it. The TEMPLATE renders what Tokenizer.render_for_completion does,
    minus the leading <|bos|>, which Ollama adds from the GGUF (add_bos_token): a system message is merged into the
    first user message with a blank line, then <|assistant_start|> opens the reply."""
    template = (
        '{{- $system := "" }}'
        "{{- range .Messages }}"
        '{{- if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}'
        '{{- else if eq .Role "user" }}<|user_start|>{{ $system }}{{ .Content }}<|user_end|>{{ $system = "" }}'
        '{{- else if eq .Role "assistant" }}<|assistant_start|>{{ .Content }}<|assistant_end|>'
        "{{- end }}"
        "{{- end }}<|assistant_start|>"
    )
    return (
        "# Ollama: ollama create mymodel -f Modelfile && ollama run mymodel\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{template}"""\n'
        'PARAMETER stop "<|assistant_end|>"\n'
        'PARAMETER stop "<|user_start|>"\n'
        "PARAMETER temperature 0.6\n"
        "PARAMETER top_k 50\n"
        f"PARAMETER num_ctx {sequence_len}\n"
    )


def export_gguf(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    stage: str | None = None,
    step: int | None = None,
    quant: str = "f16",
    force: bool = False,
) -> Path:
    """Write <out_dir>/model.gguf and <out_dir>/Modelfile for a trained stage of a portable run; returns out_dir
    (default <run>/export/gguf). Written into a temporary sibling folder and renamed into place, like export_hf."""
    import torch

    from picochat.checkpoint import load_model
    from picochat.export import _replace_dir, export_locations
    from picochat.tokenizer import Tokenizer

    if quant not in QUANTS:
        raise PicochatError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    run_dir, stage_dir, out_dir = export_locations(run_dir, out_dir, stage, "gguf", force)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(stage_dir, device="cpu", step=step, compute_dtype=torch.float32)
    config = model.config
    if config.architecture != "portable":
        raise PicochatError(
            f"{stage_dir}: a {config.architecture} model; GGUF export needs the portable architecture (llama.cpp has "
            "no value embeddings, smear, backout or soft-capped logits): pretrain with --architecture portable"
        )
    if config.vocab_size != tokenizer.vocab_size:
        raise PicochatError(
            f"{stage_dir / 'config.json'}: model vocab_size {config.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab_size} ({run_dir / 'tokenizer'}): they come from different runs"
        )
    check_gguf_tokenizer(tokenizer, run_dir / "tokenizer")
    if config.head_dim != HF_HEAD_DIM:
        log(f"export: head size {config.head_dim}: llama.cpp and Ollama read it from the file, but transformers' "
            f"GGUF reader assumes {HF_HEAD_DIM} for qwen3 (load the Hugging Face export there instead)")  # fmt: skip

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        write_gguf(tmp_dir / GGUF_FILE, model, tokenizer, quant=quant, name=f"{run_dir.name}-{stage_dir.name}")
        atomic_write_text(tmp_dir / "Modelfile", ollama_modelfile(config.sequence_len))
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    size = (out_dir / GGUF_FILE).stat().st_size
    log(f"export: {stage_dir} -> {out_dir / GGUF_FILE} ({quant}, {size / 2**20:.1f} MiB) and {out_dir / 'Modelfile'}")
    return out_dir
