"""Builders the model tests share: the tiny BPE trained on real Wikipedia text, and tiny GPTs.

Plain functions; the fixtures built on them are in conftest.py. Sizes and seeds are fixed here because the tests'
expected values depend on them: change one and every test that uses it sees a different model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch

from picochat.gpt import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

WIKI_SHARD = "pretrain/wikipedia_en/shard_00000.parquet"
WIKI_VAL_SHARD = "pretrain/wikipedia_en/val_00000.parquet"

# `picochat pretrain` flags for the tiny model the pretraining tests train: depth 2, width 64 (2 heads of 32), rows
# of 32 tokens, 8 rows per step: 4 per forward, so 1 rank accumulates 2.
TINY = [
    "--depth",
    "2",
    "--aspect-ratio",
    "32",
    "--head-dim",
    "32",
    "--max-seq-len",
    "32",
    "--device-batch-size",
    "4",
    "--total-batch-size",
    "256",
    "--eval-tokens",
    "512",
    "--sample-every",
    "0",
    "--warmup-steps",
    "2",
    # The learning rates are scaled by sqrt(256 / 2^19) = 0.022: raise them so that a few steps change a lot.
    "--matrix-lr",
    "0.5",
    "--embedding-lr",
    "5",
    "--unembedding-lr",
    "0.5",
    "--scalar-lr",
    "5",
]  # fmt: skip (flag, value pairs on a line)


def wiki_args(data_dir: Path) -> list[str]:
    """The training shard and `--val` shard the pretraining tests read."""
    return [str(data_dir / WIKI_SHARD), "--val", str(data_dir / WIKI_VAL_SHARD)]


def new_run(folder: Path, tokenizer_dir: Path) -> Path:
    """A run folder holding a copy of a trained tokenizer, ready for `picochat pretrain --run-dir folder`."""
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    return folder


def wiki_tokenizer(data_dir: Path, vocab_size: int = 300) -> Tokenizer:
    """A tiny byte-level BPE trained on the first 2,000 characters of 20 real Wikipedia articles. With 300 tokens
    most multi-byte characters stay split over several byte tokens, which is what the streaming tests need, and
    training takes a fraction of a second."""
    table = pq.read_table(data_dir / WIKI_SHARD, columns=["text"])
    return Tokenizer.train([text[:2000] for text in table.column("text").to_pylist()[:20]], vocab_size=vocab_size)


def tiny_model(
    vocab_size: int, sequence_len: int = 1024, *, seed: int = 0, model_class: type[GPT] = GPT, **sizes: int
) -> GPT:
    """A GPT on CPU, 2 layers x 32 channels (2 query heads, 1 kv head) unless `sizes` say otherwise, initialised
    as training initialises it after torch.manual_seed(seed). model_class: a GPT subclass (e.g. a test stand-in)."""
    settings = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    settings.update(sizes)
    torch.manual_seed(seed)
    return model_class.build(GPTConfig(**settings), "cpu")


def lively_model(
    vocab_size: int, sequence_len: int = 256, *, seed: int = 0, model_class: type[GPT] = GPT, **sizes: int
) -> GPT:
    """A tiny model in eval mode whose every path matters, for inference tests: 4 layers x 64 channels with
    grouped-query attention (4 query, 2 kv heads). The reference init zeroes c_proj (blocks start as identity) and
    smear_lambda, which would hide cache and position bugs, so those (and the lm_head) get random values.
    sequence_len 256 or 512 gives a short window of 128 tokens, shorter than what the tests decode."""
    sizes = {"n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64, **sizes}
    return enliven(tiny_model(vocab_size, sequence_len, seed=seed, model_class=model_class, **sizes)).eval()


def enliven(model: GPT) -> GPT:
    """Random values for what the reference init zeroes (c_proj, smear_lambda) and a livelier lm_head."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.2)
        model.smear_lambda.fill_(0.7)
    return model
