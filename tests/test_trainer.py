"""The training loop's parts: schedules, accumulation, loss normalisation with masked targets, the fused
chunked loss (loss.py), peak-FLOPs tables (hardware.py), samples. The end-to-end behaviour (ranks, resume,
signals, files) is in tests/test_pretrain.py."""

from __future__ import annotations

import math

import pytest
import torch

import picochat.loss as loss_module
from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig
from picochat.hardware import Distributed, cpu_peak_flops, gpu_peak_flops
from picochat.loss import softcapped_cross_entropy
from picochat.stages.pretrain import SAMPLE_PROMPTS, greedy_samples
from picochat.trainer import (
    Trainer,
    TrainSettings,
    gradient_accumulation_steps,
    lr_multiplier,
    muon_momentum,
    weight_decay_multiplier,
)

# ---- schedules ----------------------------------------------------------------------------------------------


def test_lr_multiplier_warmup_flat_warmdown():
    lrm = lambda step: lr_multiplier(step, 1000, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)  # noqa: E731
    assert lrm(0) == pytest.approx(1 / 40)
    assert lrm(19) == pytest.approx(0.5)
    assert lrm(39) == 1.0 and lrm(40) == 1.0
    assert lrm(350) == 1.0  # the warmdown covers the last 650 steps: 350 .. 1000
    assert lrm(351) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lrm(675) == pytest.approx(0.5 + 0.5 * 0.05)  # half way down
    assert lrm(1000) == pytest.approx(0.05)
    values = [lrm(s) for s in range(1001)]
    assert all(b <= a for a, b in zip(values[40:], values[41:]))  # never rises after the warmup


def test_lr_multiplier_short_run_and_edge_cases():
    # Ramps overlap in a 50-step run: the smaller one wins, so it still cools down at the end.
    lrm = lambda step: lr_multiplier(step, 50, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)  # noqa: E731
    assert lrm(10) == pytest.approx(11 / 40)
    assert lrm(50) == pytest.approx(0.05)
    assert max(lrm(s) for s in range(51)) < 1.0
    assert lr_multiplier(0, 10, warmup_steps=0, warmdown_ratio=0.0, final_lr_frac=0.0) == 1.0
    assert lr_multiplier(10, 10, warmup_steps=0, warmdown_ratio=1.0, final_lr_frac=0.0) == 0.0


def test_muon_momentum_schedule():
    momentum = lambda step: muon_momentum(step, 2000, warmdown_ratio=0.65)  # noqa: E731
    assert momentum(0) == pytest.approx(0.85)
    assert momentum(200) == pytest.approx(0.91)
    assert momentum(400) == pytest.approx(0.97) and momentum(700) == pytest.approx(0.97)
    assert momentum(700) == momentum(500)  # flat until the warmdown starts at step 700
    assert momentum(1350) == pytest.approx(0.935)  # half way through the warmdown
    assert momentum(2000) == pytest.approx(0.90)
    # SFT-style: no change during warmdown when final == peak.
    assert muon_momentum(1900, 2000, 0.5, peak=0.95, final=0.95, warmup_steps=300) == pytest.approx(0.95)


def test_weight_decay_cosine_to_zero():
    assert weight_decay_multiplier(0, 100) == 1.0
    assert weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert weight_decay_multiplier(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_multiplier(100, 100) == pytest.approx(0.0, abs=1e-12)


# ---- accumulation -------------------------------------------------------------------------------------------


def test_gradient_accumulation_steps():
    assert gradient_accumulation_steps(524_288, 32, 2048, 8) == 1
    assert gradient_accumulation_steps(524_288, 16, 2048, 8) == 2
    assert gradient_accumulation_steps(16_384, 32, 512, 1) == 1
    assert gradient_accumulation_steps(1024, 4, 32, 2) == 4


def test_accumulation_error_suggests_valid_values():
    with pytest.raises(PicochatError) as error:
        gradient_accumulation_steps(1000, 4, 32, 2)  # 1000 is not a multiple of 4 x 32 x 2 = 256
    message = str(error.value)
    assert "--total-batch-size 1,000" in message and "256 tokens" in message
    assert "try --total-batch-size 768 or 1,024" in message
    with pytest.raises(PicochatError) as error:
        gradient_accumulation_steps(6 * 32 * 2, 4, 32, 2)  # 6 rows per rank do not split into forwards of 4
    message = str(error.value)
    assert "--total-batch-size 256 or 512" in message
    assert "--device-batch-size 3 or 6" in message  # the divisors of 6 nearest to 4
    with pytest.raises(PicochatError, match=r"--total-batch-size 512, or --device-batch-size 8$"):
        gradient_accumulation_steps(256, 16, 32, 1)  # 8 rows in all, asked for 16 per forward
    with pytest.raises(PicochatError, match="not a multiple of --max-seq-len = 32"):
        gradient_accumulation_steps(100, 1, 32, 1)


# ---- the fused, chunked loss (loss.py) ------------------------------------------------------------------------


def _model(vocab_size=1000, **overrides):
    torch.manual_seed(0)
    # 3 layers: with 2, backout (at layer n//2 = 1, the last) cancels in the final norm and its gradient is noise.
    config = dict(sequence_len=64, vocab_size=vocab_size, n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    config.update(overrides)
    model = GPT.build(GPTConfig(**config), "cpu")
    with torch.no_grad():  # a head with real logits, and non-identity blocks, so every gradient is meaningful
        model.lm_head.weight.normal_(0, 0.5)
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return model


def _loss_and_grads(model, idx, targets, reduction, fused):
    model.fused_loss = fused
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets, loss_reduction=reduction)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_plain_loss_and_gradients(monkeypatch, reduction):
    # 7 rows per chunk: 150 tokens make 22 chunks with a ragged last one; vocab 1000 is padded to 1024.
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS_CPU", 7 * 1000)
    model = _model()
    idx = torch.randint(0, 1000, (3, 50))
    targets = torch.randint(0, 1000, (3, 50))
    targets[0, :10] = -1  # ignored targets: no loss, no gradient
    fused_loss, fused_grads = _loss_and_grads(model, idx, targets, reduction, fused=True)
    plain_loss, plain_grads = _loss_and_grads(model, idx, targets, reduction, fused=False)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    for name, grad in plain_grads.items():  # fp32 rounding, relative to each gradient's scale
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    assert fused_grads["lm_head.weight"][1000:].abs().max() == 0  # padded vocabulary rows


def test_fused_loss_per_token_and_no_grad(monkeypatch):
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS_CPU", 5 * 1000)
    model = _model()
    idx = torch.randint(0, 1000, (2, 30))
    targets = torch.randint(0, 1000, (2, 30))
    targets[1, 5:9] = -1
    with torch.no_grad():
        model.fused_loss = True
        fused = model(idx, targets, loss_reduction="none")
        model.fused_loss = False
        plain = model(idx, targets, loss_reduction="none")
    assert fused.shape == (2, 30) and (fused[1, 5:9] == 0).all()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    # Per-token losses WITH gradients (RL) take the plain path, and still backpropagate.
    model.fused_loss = True
    per_token = model(idx, targets, loss_reduction="none")
    per_token.sum().backward()
    assert model.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="full logits"):
        softcapped_cross_entropy(torch.randn(4, 8, requires_grad=True), torch.randn(16, 8), torch.zeros(4).long(),
                                 16, "none")  # fmt: skip


def test_fused_loss_bf16_matches_plain(monkeypatch):
    monkeypatch.setenv("PICOCHAT_DTYPE", "bfloat16")
    model = _model()
    assert model.compute_dtype == torch.bfloat16
    idx = torch.randint(0, 1000, (2, 32))
    fused_loss, fused_grads = _loss_and_grads(model, idx, idx.roll(-1, 1), "mean", fused=True)
    plain_loss, plain_grads = _loss_and_grads(model, idx, idx.roll(-1, 1), "mean", fused=False)
    assert fused_loss.dtype == torch.float32 and fused_grads["lm_head.weight"].dtype == torch.float32
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused_grads["lm_head.weight"], plain_grads["lm_head.weight"], rtol=0.05, atol=1e-3)


def test_fused_loss_chunks_never_hold_all_logits(monkeypatch):
    # Spy on the chunk function: no call ever sees more rows than the budget allows.
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS_CPU", 16 * 1000)
    rows_seen = []
    real = loss_module._softcap_chunk

    def spy(x, weight, targets, want_gradient):
        rows_seen.append(x.size(0))
        return real(x, weight, targets, want_gradient)

    monkeypatch.setattr(loss_module, "_softcap_chunk", spy)
    model = _model()
    idx = torch.randint(0, 1000, (4, 40))
    model(idx, idx).backward()
    assert max(rows_seen) == 16 and sum(rows_seen) == 160


# ---- loss normalisation over micro-batches with masked targets --------------------------------------------


def _fixed_rows(num_rows=8, seq_len=16, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocab, (num_rows, seq_len), generator=generator)
    targets = torch.randint(0, vocab, (num_rows, seq_len), generator=generator)
    # SFT-like masks: very different numbers of supervised targets per row (row 3 has none at all).
    for row in range(num_rows):
        targets[row, : (row * 5) % seq_len] = -1
    targets[3] = -1
    return inputs, targets


def _stream_loader(inputs, targets):
    """A loader with the packing module's layout: stream s is row s; rank r of W packs the streams s % W == r."""

    def make(batch_size, seq_len, rank, world_size, num_streams, state=None):
        owned = list(range(rank, num_streams, world_size))
        assert len(owned) == batch_size  # one micro-batch per virtual rank
        while True:
            yield inputs[owned], targets[owned], {"fake": True}

    return make


@pytest.mark.parametrize("device_batch_size", [2, 4])
def test_masked_loss_is_the_mean_over_all_counted_targets(tmp_path, device_batch_size):
    """Accumulation 4 x 2 rows and 2 x 4 rows give the loss and the update of one 8-row batch: the mean over the
    step's counted targets, not a mean of per-micro-batch means."""
    inputs, targets = _fixed_rows()
    model = _model(vocab_size=97)
    with torch.no_grad():
        expected = model(inputs, targets)  # one forward over all 8 rows: mean over counted targets
    # No Muon weight decay: it is cautious (decays only where update x weight >= 0), so an update entry of ~0 whose sign
    # flips with float rounding (accumulated vs whole-batch gradients) changes that weight by lr x wd = 0.56%.
    reference = _model(vocab_size=97)
    optimizer = reference.setup_optimizer(weight_decay=0.0)
    reference(inputs, targets).backward()
    optimizer.step()

    model = _model(vocab_size=97)
    optimizer = model.setup_optimizer(weight_decay=0.0)
    settings = TrainSettings(total_batch_size=8 * 16, device_batch_size=device_batch_size, seq_len=16,
                             num_iterations=1, warmup_steps=0, warmdown_ratio=0.0, eval_every=0, sample_every=0,
                             momentum_warmup_steps=0, momentum_peak=0.95, cosine_weight_decay=False)  # fmt: skip
    trainer = Trainer(model, optimizer, settings, stage_dir=tmp_path, ranks=Distributed(0, 0, 1, torch.device("cpu")),
                      make_train_loader=_stream_loader(inputs, targets))  # fmt: skip
    assert trainer.accumulation == 8 // device_batch_size
    trainer.save = lambda: None  # nothing to checkpoint here (the fake loader state is not a packing state)
    assert trainer.run() == 1
    events = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    loss = float(events[0].split('"loss": ')[1].split(",")[0])
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---- signals --------------------------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_and_a_second_ctrl_c_aborts(tmp_path):
    import os
    import signal
    import time

    model = _model(vocab_size=97)
    settings = TrainSettings(total_batch_size=64, device_batch_size=4, seq_len=16, num_iterations=1)
    trainer = Trainer(model, model.setup_optimizer(), settings, stage_dir=tmp_path,
                      ranks=Distributed(0, 0, 1, torch.device("cpu")), make_train_loader=None)  # fmt: skip
    before = signal.getsignal(signal.SIGINT)
    restore = trainer._install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert trainer._stop_signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # another SIGTERM (torchrun sends one after a Ctrl-C): ignored
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: abort now
            time.sleep(0.5)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before


# ---- MFU peaks and samples ------------------------------------------------------------------------------------


def test_peak_flops_tables():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA GH200 480GB") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("Some Future GPU") is None
    flops, described = cpu_peak_flops(threads=2)
    assert flops > 1e9 and "2 threads" in described


def test_greedy_samples_are_deterministic():
    class ByteTokenizer:
        bos_token_id = 96

        def encode(self, text, prepend=None):
            return [prepend] + [ord(c) % 96 for c in text]

        def decode(self, ids):
            return "".join(chr(32 + i % 64) for i in ids)

    model = _model(vocab_size=97)
    first = greedy_samples(model, ByteTokenizer(), max_tokens=5)
    assert [prompt for prompt, _ in first] == SAMPLE_PROMPTS
    assert all(len(completion) == 5 for _, completion in first)
    assert first == greedy_samples(model, ByteTokenizer(), max_tokens=5)
