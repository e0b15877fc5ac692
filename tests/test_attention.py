"""attention.attention against a naive softmax(QK^T / sqrt(D)) V, for every shape of call the model makes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from picochat import attention as attention_module
from picochat.attention import KVCache, attention, set_backend, sliding_window_causal_mask
from picochat.common import PicochatError


def naive_attention(q, k, v, window):
    """The definition, written the slow obvious way: (B, Tq, H, D) queries at the last Tq positions of the
    Tk keys; query i sees key j iff 0 <= i - j <= window."""
    B, Tq, H, D = q.shape
    Tk, H_kv = k.size(1), k.size(2)
    k = k.repeat_interleave(H // H_kv, dim=2)
    v = v.repeat_interleave(H // H_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    query_pos = torch.arange(Tk - Tq, Tk).view(-1, 1)
    key_pos = torch.arange(Tk).view(1, -1)
    allowed = (query_pos - key_pos >= 0) & (query_pos - key_pos <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def random_qkv(B=2, T=48, H=4, H_kv=2, D=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=generator)
    k = torch.randn(B, T, H_kv, D, generator=generator)
    v = torch.randn(B, T, H_kv, D, generator=generator)
    return q, k, v


@pytest.mark.parametrize("window", [0, 5, 16, 47, 1000])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_training_call_matches_naive(window, heads):
    q, k, v = random_qkv(H=heads[0], H_kv=heads[1])
    expected = naive_attention(q, k, v, window)
    torch.testing.assert_close(attention(q, k, v, window=window, backend="sdpa"), expected, atol=1e-5, rtol=1e-5)


def test_mask_definition():
    mask = sliding_window_causal_mask(3, 6, window=2)
    # queries at positions 3, 4, 5 see themselves and the 2 tokens before
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_full_window_uses_is_causal_without_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    q, k, v = random_qkv(T=32)
    attention(q, k, v, window=31, backend="sdpa")  # window covers the sequence: plain causal
    attention(q, k, v, window=7, backend="sdpa")  # binding window: explicit mask
    attention(q, k, v, window=8, backend="sdpa")  # a window that tiles the sequence: blocks of 8 queries
    assert calls[0]["is_causal"] is True and calls[0]["attn_mask"] is None
    assert calls[1]["is_causal"] is False and calls[1]["attn_mask"].shape == (32, 32)
    # 2 rows x 4 blocks, each block's 8 queries against 16 keys (the block and the one before it)
    assert calls[2]["attn_mask"].shape == (8, 1, 8, 16) and not calls[2].get("is_causal")


@pytest.mark.parametrize("window", [4, 8, 12])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_short_window_in_blocks_matches_naive_with_gradients(window, heads):
    q, k, v = random_qkv(T=48, H=heads[0], H_kv=heads[1], seed=window)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    weights = torch.randn(2, 48, heads[0], 16)
    assert attention_module._blocks_pay(48, window)
    (attention(*inputs, window=window, backend="sdpa") * weights).sum().backward()
    (naive_attention(*reference, window=window) * weights).sum().backward()
    for ours, theirs in zip(inputs, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [3, 10, 1000])
def test_prefill_chunk_after_cached_tokens(window):
    # 40 tokens already cached, then a chunk of 24: must equal the last 24 rows of a full causal pass.
    q, k, v = random_qkv(T=64, H=4, H_kv=2)
    key_cache = torch.zeros(2, 80, 2, 16)
    value_cache = torch.zeros(2, 80, 2, 16)
    first = attention(q[:, :40], k[:, :40], v[:, :40], window=window, key_cache=key_cache, value_cache=value_cache)
    second = attention(
        q[:, 40:], k[:, 40:], v[:, 40:], window=window, key_cache=key_cache, value_cache=value_cache, cache_position=40
    )
    expected = naive_attention(q, k, v, window)
    torch.testing.assert_close(first, expected[:, :40], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, expected[:, 40:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key_cache[:, :64], k)


@pytest.mark.parametrize("window", [0, 8, 1000])
def test_decode_one_token_at_a_time(window):
    # Window 8 < cache length is the case where forgetting to slice the old keys silently changes results.
    q, k, v = random_qkv(T=30, H=4, H_kv=1)
    key_cache = torch.zeros(2, 30, 1, 16)
    value_cache = torch.zeros(2, 30, 1, 16)
    outputs = [
        attention(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            window=window,
            key_cache=key_cache,
            value_cache=value_cache,
            cache_position=t,
        )
        for t in range(30)
    ]
    torch.testing.assert_close(torch.cat(outputs, dim=1), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    q, k, v = random_qkv(T=8)
    with pytest.raises(ValueError, match="overflow"):
        attention(
            q,
            k,
            v,
            window=8,
            key_cache=torch.zeros(2, 10, 2, 16),
            value_cache=torch.zeros(2, 10, 2, 16),
            cache_position=4,
        )


def test_gradients_match_naive():
    q, k, v = random_qkv(T=24)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    weights = torch.randn(2, 24, 4, 16)
    (attention(*inputs, window=6, backend="sdpa") * weights).sum().backward()
    (naive_attention(*reference, window=6) * weights).sum().backward()
    for ours, theirs in zip(inputs, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [7, 40])
def test_flex_backend_matches_sdpa(window):
    # On CPU FlexAttention runs uncompiled (a slow reference path), which still checks our block mask.
    q, k, v = random_qkv(T=64, H=4, H_kv=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = attention(q, k, v, window=window, backend="flex")
    torch.testing.assert_close(flex, attention(q, k, v, window=window, backend="sdpa"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_backend_selection():
    q, k, v = random_qkv(T=16)
    with pytest.raises(PicochatError, match="expected one of"):
        set_backend("magic")
    if not attention_module.flash_attn_available():
        with pytest.raises(PicochatError, match="flash-attn"):
            attention(q, k, v, window=4, backend="flash")
    # On CPU, auto is SDPA, and a forced flex falls back to SDPA for cached calls.
    assert attention_module._choose_backend(q, 4, cached=False, requested="auto") == "sdpa"
    assert attention_module._choose_backend(q, 4, cached=True, requested="flex") == "sdpa"
    set_backend("sdpa")
    try:
        assert attention_module.get_backend() == "sdpa"
        torch.testing.assert_close(attention(q, k, v, window=4), naive_attention(q, k, v, 4), atol=1e-5, rtol=1e-5)
    finally:
        set_backend("auto")


def test_kv_cache_bookkeeping():
    cache = KVCache(n_layer=3, batch_size=2, max_len=10, n_kv_head=2, head_dim=8, device="cpu", dtype=torch.float32)
    assert cache.layer(1)[0].shape == (2, 10, 2, 8)
    cache.advance(6)
    assert cache.position == 6
    with pytest.raises(ValueError, match="KV cache full"):
        cache.advance(5)
    cache.prev_embedding = torch.zeros(2, 1, 4)
    cache.reset()
    assert cache.position == 0 and cache.prev_embedding is None
