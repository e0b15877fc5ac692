"""Inference accounting (picochat/inference_cost.py through the GPT methods), checked against torch's own FLOP counter
and the KV cache's actual allocation."""

from __future__ import annotations

import torch
from helpers import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from picochat.gpt import GPT, GPTConfig


def model_with_binding_window() -> GPT:
    model = tiny_model(300, 256, n_layer=2, n_head=2, n_kv_head=1, n_embd=64).eval()
    assert model.window_sizes == [128, 256]
    return model


def counted_matmul_flops(call) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def test_decode_and_prefill_flops_match_torchs_counter_plus_attention():
    # torch's counter sees the matmuls (not CPU SDPA); the attention term is checked by hand: position 150 sees 129
    # keys in the window-128 layer and 151 in the full layer, 4 x n_head x head_dim FLOPs per key.
    model = model_with_binding_window()
    cache = model.new_kv_cache(1, 256)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 150)), kv_cache=cache)
    matmuls = counted_matmul_flops(lambda: model(torch.randint(0, 300, (1, 1)), kv_cache=cache))
    assert model.decode_flops_per_token(150) == matmuls + 4 * 64 * (129 + 151)

    prompt = torch.randint(0, 300, (1, 100))
    matmuls = counted_matmul_flops(lambda: model(prompt, kv_cache=model.new_kv_cache(1, 256), last_only=True))
    attention = 2 * 4 * 64 * sum(t + 1 for t in range(100))  # both layers' windows cover the 100 positions
    assert model.prefill_flops_per_token(100) * 100 == matmuls + attention


def test_kv_cache_and_decode_bytes():
    model = model_with_binding_window()
    cache = model.new_kv_cache(batch_size=3, max_len=40)
    assert model.kv_cache_bytes_per_token() * 3 * 40 == cache.keys.nbytes + cache.values.nbytes
    # d12 in bf16: 2 (k, v) x 12 layers x 6 heads x 128 x 2 bytes.
    with torch.device("meta"):
        d12 = GPT(GPTConfig.from_depth(12), compute_dtype=torch.bfloat16)
    assert d12.kv_cache_bytes_per_token() == 36_864
    weights = 2 * d12.num_matmul_params()
    per_row = 2 * (768 + 6 * 768)  # embedding rows (wte + 6 value embeddings)
    per_row += 36_864 // 12 * sum(min(1000, window) + 1 for window in d12.window_sizes)
    assert d12.decode_bytes_per_step(8, 1000) == weights + 8 * per_row
