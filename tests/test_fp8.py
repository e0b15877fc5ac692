"""FP8 training (picochat/fp8.py), emulated on the CPU: the scaling, the error FP8 formats allow (forward and
gradients), the model's FP8 mode (training only), compile, and `picochat pretrain --fp8` with its checkpoint loading
into a run without FP8.

Error bounds from the formats. Rounding to a float with m mantissa bits has a relative error uniform in
+-2^-(m+1), i.e. an RMS of 2^-(m+1)/sqrt(3): 3.6% for e4m3 (m = 3), 7.2% for e5m2 (m = 2). A product of two rounded
operands has sqrt(2) x 3.6% = 5.1% (forward: x and W in e4m3), sqrt(3.6^2 + 7.2^2) = 8.1% (gradients: e5m2 gradient
times an e4m3 operand); sums of many such products of random signs keep that relative RMS. bf16 (m = 7) is 16x finer.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import enliven
from safetensors.torch import load_file

from picochat import fp8
from picochat.cli import main
from picochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

E4M3_PRODUCT_RMS = 2**0.5 * 2**-4 / 3**0.5  # 0.051
E5M2_E4M3_PRODUCT_RMS = ((2**-4 / 3**0.5) ** 2 + (2**-3 / 3**0.5) ** 2) ** 0.5  # 0.081


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def test_quantize_uses_the_whole_range_and_never_overflows():
    x = torch.tensor([[-3.0, 0.5, 1e-3, 2.0]])
    quantized, inverse = fp8.quantize(x, fp8.E4M3)
    assert quantized.dtype == torch.float8_e4m3fn
    assert quantized.float().abs().max().item() == 448.0  # amax lands on the largest e4m3 value
    torch.testing.assert_close(quantized.float() * inverse, x, rtol=2**-4, atol=0)
    gradient, _ = fp8.quantize(torch.tensor([1e30, -1e-30, 0.0]), fp8.E5M2)
    assert torch.isfinite(gradient.float()).all()
    zeros, inverse = fp8.quantize(torch.zeros(4, 4), fp8.E4M3)  # amax 0: no division by zero
    assert (zeros.float() == 0).all() and torch.isfinite(inverse)


def test_fp8_matmul_error_is_what_the_formats_allow_forward_and_backward():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=generator).requires_grad_()
    weight = (torch.randn(384, 256, generator=generator) / 16).requires_grad_()
    grad_output = torch.randn(256, 384, generator=generator)
    fp8.fp8_linear(x, weight).backward(grad_output)
    x64, w64, g64 = x.detach().double(), weight.detach().double(), grad_output.double()
    forward_error = relative_error(fp8.fp8_linear(x.detach(), weight.detach()), x64 @ w64.T)
    bf16_error = relative_error(x.detach().bfloat16() @ weight.detach().bfloat16().T, x64 @ w64.T)
    assert 5 * bf16_error < forward_error < E4M3_PRODUCT_RMS  # really FP8, and no worse than FP8 allows
    assert weight.grad.dtype == torch.float32  # the gradient of the fp32 master
    assert relative_error(x.grad, g64 @ w64) < E5M2_E4M3_PRODUCT_RMS
    assert relative_error(weight.grad, g64.T @ x64) < E5M2_E4M3_PRODUCT_RMS


def small_model(seed: int = 0) -> GPT:
    # Width 128: the attention and MLP matrices are eligible (min dimension 128), the gates are not.
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    return enliven(GPT.build(config, "cpu", compute_dtype=torch.bfloat16))


def test_model_fp8_trains_close_to_bf16_and_never_evaluates_in_fp8(capfd):
    bf16_model, fp8_model = small_model(), small_model()
    from picochat.common import setup_logging

    setup_logging()
    assert fp8.enable_fp8(fp8_model, torch.device("cpu")) == 2 * 6  # q, k, v, proj, fc, mlp proj per block
    assert "EMULATED" in capfd.readouterr().err
    assert not fp8_model.blocks[1].attn.ve_gate.fp8 and not fp8_model.lm_head.fp8
    tokens = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    losses = [model(tokens, tokens) for model in (bf16_model, fp8_model)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() != losses[0].item()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=0.02)
    for (name, a), b in zip(bf16_model.named_parameters(), fp8_model.parameters()):
        if a.ndim == 2 and a.numel() >= 4096 and a.grad.norm() > 0:  # matrices (a few scalars' gradients cancel)
            cosine = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
            assert cosine > 0.98, name
    with torch.no_grad():  # evaluation: not FP8, bit for bit the plain model
        assert torch.equal(bf16_model(tokens, tokens), fp8_model(tokens, tokens))
    fp8_model.eval()
    assert torch.equal(bf16_model.eval()(tokens), fp8_model(tokens))


def test_fp8_model_compiles_and_matches_eager(monkeypatch):
    import torch._dynamo

    eager, compiled = small_model(), small_model()
    for model in (eager, compiled):
        fp8.enable_fp8(model, torch.device("cpu"))
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    try:
        loss = torch.compile(compiled, dynamic=False, backend="aot_eager")(tokens, tokens)
        loss.backward()
    finally:
        torch._dynamo.reset()
    expected = eager(tokens, tokens)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    weight = compiled.blocks[0].mlp.c_fc.weight
    torch.testing.assert_close(weight.grad, eager.blocks[0].mlp.c_fc.weight.grad, atol=1e-4, rtol=1e-2)


def test_pretrain_fp8_on_cpu_says_emulated_once_and_its_checkpoint_loads_without_fp8(tmp_path, data_dir, capfd):
    from picochat.data import iter_documents
    from picochat.tokenizer import Tokenizer

    wikipedia = data_dir / "pretrain" / "wikipedia_en"
    texts = [doc[0][:2000] for doc, _ in zip(iter_documents([wikipedia / "shard_00000.parquet"]), range(100))]
    run = tmp_path / "fp8"
    Tokenizer.train(texts, vocab_size=400).save(run / "tokenizer")
    args = [str(wikipedia / "shard_00000.parquet"), "--val", str(wikipedia / "val_00000.parquet"), "--depth", "2",
            "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "32", "--device-batch-size", "4",
            "--total-batch-size", "128", "--eval-tokens", "256", "--sample-every", "0", "--eval-every", "0",
            "--device", "cpu"]  # fmt: skip
    assert main(["pretrain", "--run-dir", str(run), *args, "--num-iterations", "2", "--save-every", "1", "--fp8"]) == 0
    err = capfd.readouterr().err
    assert err.count("EMULATED") == 1, err[-2000:]
    assert json.loads((run / "base" / "config.json").read_text())["flags"]["fp8"] is True

    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    assert (
        main(
            [
                "pretrain",
                "--run-dir",
                str(plain),
                "--resume",
                "1",
                "--no-fp8",
                "--num-iterations",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "FP8" not in capfd.readouterr().err
    weights = load_file(str(plain / "base" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    config = json.loads((plain / "base" / "config.json").read_text())
    assert config["flags"]["fp8"] is False and config["provenance"]["resumed_from_step"] == 1
