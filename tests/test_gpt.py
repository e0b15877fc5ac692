"""The GPT model: the depth dial, accounting (checked against the reference's numbers), init, forward,
KV-cache equivalence, optimizer groups, and the device/precision helpers it relies on."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import enliven

from picochat import hardware
from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig, has_value_embedding, short_window, window_sizes


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(sequence_len=512, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
    settings.update(overrides)
    return GPTConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny model whose every path matters: the reference init zeroes c_proj (blocks start as identity) and
    smear_lambda, which would hide bugs in attention, smear and the cache, so give them random values."""
    torch.manual_seed(seed)
    return enliven(GPT.build(tiny_config(**overrides), "cpu"))


# ---- the depth dial ------------------------------------------------------------------------------------


def test_from_depth_follows_the_width_rule():
    d12 = GPTConfig.from_depth(12)
    assert (d12.n_embd, d12.n_head, d12.n_kv_head, d12.n_layer) == (768, 6, 6, 12)
    d26 = GPTConfig.from_depth(26)
    assert (d26.n_embd, d26.n_head) == (1664, 13)
    # width is rounded UP to whole heads: 5 * 64 = 320 -> 3 heads of 128 = 384
    assert GPTConfig.from_depth(5).n_embd == 384
    d6 = GPTConfig.from_depth(6, head_dim=64, sequence_len=512, window_pattern="L")
    assert (d6.n_embd, d6.n_head, d6.head_dim, d6.window_pattern) == (384, 6, 64, "L")
    assert GPTConfig.from_depth(12, n_kv_head=2).n_kv_head == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_head=3), "n_kv_head 3 must divide n_head 4"),
        (dict(window_pattern="SXL"), "expected letters S"),
        (dict(window_pattern=""), "expected letters S"),
        (dict(n_embd=66), "not divisible by n_head"),
        (dict(n_layer=0), "n_layer=0"),
        (dict(n_embd=16, n_head=2, n_kv_head=2), "at least 24"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(PicochatError, match=message):
        tiny_config(**overrides)


def test_config_round_trip_and_unknown_fields():
    config = tiny_config(window_pattern="ssl")
    assert config.window_pattern == "SSL"
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(PicochatError, match="unknown field"):
        GPTConfig.from_dict({**config.to_dict(), "n_layers": 3}, source="config.json")


def test_windows_and_value_embedding_layers():
    assert short_window(2048) == 512 and short_window(256) == 128 and short_window(1000) == 256
    d24 = GPTConfig.from_depth(24)
    sizes = window_sizes(d24)
    assert [i for i, w in enumerate(sizes) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert sizes.count(512) == 18
    assert window_sizes(tiny_config(n_layer=3, window_pattern="S")) == [128, 128, 512]  # last layer forced L
    assert [i for i in range(24) if has_value_embedding(i, 24)] == list(range(1, 24, 2))
    assert [i for i in range(3) if has_value_embedding(i, 3)] == [0, 2]


# ---- accounting: the exact numbers, built on the meta device (no memory) --------------------------


@pytest.mark.parametrize(
    "depth, total, flops, scaling",
    [
        (12, 286_261_730, 759_696_048, 110_100_912),
        (20, 896_533_746, 2_886_212_784, 435_160_240),
        (24, 1_384_122_122, 4_775_225_616, 729_810_624),
        (26, 1_681_786_938, 5_991_051_288, 918_423_532),
    ],
)
def test_reference_parameter_and_flop_counts(depth, total, flops, scaling):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth))
    counts = model.parameter_counts()
    assert counts["total"] == total
    assert model.flops_per_token() == flops
    assert model.num_scaling_params() == scaling
    width, vocab, layers = model.config.n_embd, 32768, depth
    assert counts["wte"] == counts["lm_head"] == vocab * width
    assert counts["value_embeds"] == (layers // 2) * vocab * width
    assert counts["scalars"] == 2 * layers + 24 + 1 + 1
    # 12 d^2 per block (attention 4 d^2, MLP 8 d^2) plus the value-embedding gates (12 x heads each)
    assert counts["transformer_matrices"] == 12 * width**2 * layers + (layers // 2) * 12 * model.config.n_head


def test_vocab_is_padded_and_logits_sliced_back():
    model = tiny_model()
    assert model.wte.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    logits = model(torch.randint(0, 97, (2, 5)))
    assert logits.shape == (2, 5, 97) and logits.dtype == torch.float32


# ---- initialisation ------------------------------------------------------------------------------------


def test_init_weights_follows_the_table():
    torch.manual_seed(0)
    config = tiny_config(n_embd=128, n_head=2, n_kv_head=2, n_layer=3)
    model = GPT.build(config, "cpu")
    bound = math.sqrt(3 / 128)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert abs(model.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for block in model.blocks:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * bound
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    for embedding in model.value_embeds.values():
        assert embedding.weight.abs().max() <= bound
    gates = [model.smear_gate.weight] + [b.attn.ve_gate.weight for b in model.blocks if b.attn.ve_gate is not None]
    assert all(g.min() >= 0 and g.max() <= 0.02 for g in gates)
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.125, 0.05]))
    # rotary tables: angle(t, i) = t * 100000^(-2i/D)
    D = config.head_dim
    assert model.cos.shape == (1, 10 * 512, 1, D // 2)
    t, i = 100, 5
    torch.testing.assert_close(model.cos[0, t, 0, i].item(), math.cos(t * 100000 ** (-2 * i / D)), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.sin[0, t, 0, i].item(), math.sin(t * 100000 ** (-2 * i / D)), atol=1e-5, rtol=0)


def test_fresh_model_predicts_near_uniform():
    torch.manual_seed(0)
    model = GPT.build(tiny_config(), "cpu")
    idx = torch.randint(0, 97, (2, 32))
    assert abs(model(idx, idx).item() - math.log(97)) < 0.01  # lm_head std 0.001: logits ~ 0


# ---- forward -------------------------------------------------------------------------------------------


def test_loss_reductions_and_ignore_index():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 16) and (per_token[0, :5] == 0).all()
    mean = model(idx, targets)
    torch.testing.assert_close(mean, per_token.sum() / 27)
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(mean, manual)
    assert logits.abs().max() < 15  # soft cap


def test_forward_is_causal():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 40))
    changed = idx.clone()
    changed[0, 25:] = (changed[0, 25:] + 1) % 97
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :25], after[:, :25])
    assert not torch.allclose(before[:, 25:], after[:, 25:])


def test_each_layer_attends_with_its_window(monkeypatch):
    import picochat.gpt as gpt_module

    seen = []
    real = gpt_module.attention

    def spy(q, k, v, *, window, **kwargs):
        seen.append(window)
        return real(q, k, v, window=window, **kwargs)

    monkeypatch.setattr(gpt_module, "attention", spy)
    model = tiny_model(n_layer=3, window_pattern="SL", sequence_len=256)
    model(torch.randint(0, 97, (1, 200))).sum().backward()  # the masked S path runs forward and backward
    assert seen == model.window_sizes == [128, 256, 256]
    assert model.blocks[0].attn.c_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_forward_equals_full_forward(n_kv_head):
    # sequence_len 512 -> S window 128, so the 300-token test runs past the short window.
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 300))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(batch_size=2, max_len=300)
        prefill = model(idx[:, :250], kv_cache=cache)
        chunk = model(idx[:, 250:280], kv_cache=cache)
        singles = [model(idx[:, t : t + 1], kv_cache=cache) for t in range(280, 300)]
    assert cache.position == 300
    torch.testing.assert_close(prefill, full[:, :250], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunk, full[:, 250:280], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(singles, dim=1), full[:, 280:], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(idx[:, :1], kv_cache=cache)


def test_gradients_reach_every_parameter():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 24))
    model(idx, idx).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_bf16_compute_keeps_fp32_masters(monkeypatch):
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    torch.manual_seed(0)
    model = GPT.build(tiny_config(), "cpu")
    assert model.compute_dtype == torch.bfloat16 and model.cos.dtype == torch.bfloat16
    idx = torch.randint(0, 97, (2, 16))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32
    assert model.blocks[0].attn.c_q.weight.grad.dtype == torch.float32


# ---- optimizer groups and a few real steps --------------------------------------------------------------


def test_setup_optimizer_groups():
    model = tiny_model()
    optimizer = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, scalar_lr=0.5, matrix_lr=0.02)
    groups = {g["name"]: g for g in optimizer.param_groups}
    scale = (64 / 768) ** -0.5
    assert groups["lm_head"]["lr"] == pytest.approx(0.008 * scale) and groups["lm_head"]["betas"] == (0.8, 0.96)
    assert groups["wte"]["lr"] == pytest.approx(0.3 * scale) and groups["wte"]["weight_decay"] == 0.001
    assert groups["value_embeds"]["lr"] == pytest.approx(0.15 * scale)
    assert groups["resid_lambdas"]["lr"] == pytest.approx(0.005) and groups["resid_lambdas"]["weight_decay"] == 0.05
    assert groups["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert groups["smear_backout"]["lr"] == 0.2 and len(groups["smear_backout"]["params"]) == 3
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    assert all(len({tuple(p.shape) for p in g["params"]}) == 1 for g in muon)
    assert {g["name"] for g in muon} == {
        "matrices_2x12",
        "matrices_32x64",
        "matrices_64x64",
        "matrices_64x256",
        "matrices_256x64",
    }
    assert all(g["weight_decay"] == 0.28 and g["momentum"] == 0.95 for g in muon)
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert all(g["initial_lr"] == g["lr"] for g in optimizer.param_groups)


def test_a_few_steps_learn_a_fixed_batch():
    model = tiny_model(n_layer=2)
    optimizer = model.setup_optimizer()
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(8):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- device and precision helpers (hardware.py) ------------------------------------------------------------


def test_device_and_dtype_helpers(monkeypatch):
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)
    assert hardware.autodetect_device() in ("cuda", "mps", "cpu")
    assert hardware.compute_dtype("cpu") == torch.float32
    for name in ("bfloat16", "float16", "float32"):
        monkeypatch.setenv("PICOCHAT_DTYPE", name)
        assert hardware.compute_dtype("cpu") == getattr(torch, name)
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp8")
    with pytest.raises(PicochatError, match="PICOCHAT_DTYPE"):
        hardware.compute_dtype("cpu")
