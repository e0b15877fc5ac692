"""What inference costs, counted from the model's shapes: FLOPs per prefilled and per decoded token, KV-cache bytes
per token, bytes read per decode step. GPT exposes these as methods; benchmarks divide them by measured times to get
MFU and the fraction of the memory-bandwidth ceiling.

Conventions (the same as GPT.flops_per_token, forward only): a matmul of an (m, k) by a (k, n) is 2 m k n FLOPs;
attention of one query over `keys` keys is 4 x n_head x head_dim x keys (QK^T and AV); a query at position t of a
layer with window w sees min(t, w) + 1 keys. Embedding lookups, norms and elementwise work are not counted: they are
bandwidth, not FLOPs. Decoding a batch is memory bound: every step reads all the matmul weights once (whatever the
batch) plus each row's cached keys and values, and that sum over the measured step time is the bandwidth used.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _keys_seen(window: int, position: int) -> int:
    return min(position, window) + 1


def attention_flops(model, position: int) -> int:
    """Forward attention FLOPs of one query at `position` (0-based), summed over the layers."""
    width = model.config.n_head * model.config.head_dim
    return sum(4 * width * _keys_seen(window, position) for window in model.window_sizes)


def decode_flops_per_token(model, context_len: int) -> int:
    """Forward FLOPs of decoding one token with `context_len` tokens already cached (lm_head included)."""
    return 2 * model.num_matmul_params() + attention_flops(model, context_len)


def prefill_flops_per_token(model, prompt_len: int) -> float:
    """Forward FLOPs per prompt token of prefilling `prompt_len` tokens into an empty cache, computing the lm_head for
    the last position only (what Engine does)."""
    head = model.lm_head.weight.numel()
    body = 2 * (model.num_matmul_params() - head) * prompt_len
    attention = sum(attention_flops(model, t) for t in range(prompt_len))
    return (body + 2 * head + attention) / prompt_len


def kv_cache_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes one token occupies in the KV cache: keys and values of every layer."""
    config = model.config
    element = torch.empty((), dtype=dtype or model.compute_dtype).element_size()
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * element


def decode_bytes_per_step(model, batch_size: int, context_len: int, dtype: torch.dtype | None = None) -> int:
    """Bytes a decode step must read at least: every matmul weight once, the embedding rows of the batch's tokens, and
    each row's cached keys/values within each layer's window (context_len tokens cached)."""
    dtype = dtype or model.compute_dtype
    element = torch.empty((), dtype=dtype).element_size()
    weights = model.num_matmul_params() * element
    embedding_rows = sum(m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding))
    config = model.config
    per_layer_token = 2 * config.n_kv_head * config.head_dim * element
    cache = sum(per_layer_token * _keys_seen(window, context_len) for window in model.window_sizes)
    return weights + batch_size * (embedding_rows * element + cache)
