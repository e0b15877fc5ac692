"""The code paths a GPU run takes, executed on the CPU: torch.compile of the model and of the optimizer updates,
FlexAttention block masks for the causal + sliding-window pattern, and the cached (prefill / decode) calls beside it.

What runs here and what does not. Compiling with inductor generates C++ kernels on a CPU, which costs about two
minutes for a d2 model on a loaded 2-core machine, so the model tests compile with the "aot_eager" backend
(picochat.common.compile_backend, $PICOCHAT_COMPILE_BACKEND): the same Dynamo graph capture, guards, recompiles and
AOTAutograd tracing of forward and backward as on a GPU, without kernel generation. One test compiles FlexAttention
itself with inductor. torch has no CPU backward for FlexAttention (flex_attention refuses inputs that need grad on
CPU before it reaches the operator); the training test lifts that one check so the operator's autograd (the same
one CUDA differentiates through) runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.attention.flex_attention as flex_module
from helpers import enliven

from picochat import attention as attention_module
from picochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# seq 256 gives a short window of 128 (a multiple of 128, see gpt.short_window) that binds: S layers look back 128
# tokens of 256. Two FlexAttention blocks of 128 per side, so the block mask has full, partial and empty blocks.
CONFIG = dict(sequence_len=256, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return enliven(GPT.build(GPTConfig(**CONFIG), "cpu"))


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("PICOCHAT_COMPILE_BACKEND", "aot_eager")
    from picochat import optim

    monkeypatch.setattr(optim, "_compiled", {})  # compiled update functions of other tests used other backends
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    attention_module.set_backend("auto")


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    # flex_attention's device check is the only thing that stops a CPU backward (see the module docstring).
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None, raising=False)


def frames_compiled() -> int:
    """How many frames Dynamo has compiled so far (every recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_flex_training_steps_equal_eager_sdpa_and_never_recompile(aot_eager, flex_backward_on_cpu):
    """Three steps of a compiled model (FlexAttention, block mask built inside the graph) and compiled MuonAdamW
    updates, against the same steps eagerly with SDPA: same losses, same weights; nothing compiles after step 1."""
    compiled_model, eager_model = tiny_gpt(), tiny_gpt()
    assert compiled_model.window_sizes == [128, 256]
    compiled_optimizer = compiled_model.setup_optimizer(compile=True)
    eager_optimizer = eager_model.setup_optimizer(compile=False)
    train_model = torch.compile(compiled_model, dynamic=False, backend="aot_eager")
    generator = torch.Generator().manual_seed(1)
    compiled_after_first_step = None
    for step in range(3):
        inputs = torch.randint(0, 300, (2, 256), generator=generator)
        targets = torch.randint(0, 300, (2, 256), generator=generator)
        losses = []
        for model, optimizer, backend in ((train_model, compiled_optimizer, "flex"),
                                          (eager_model, eager_optimizer, "sdpa")):  # fmt: skip
            attention_module.set_backend(backend)
            for group in optimizer.param_groups:  # a schedule changes the hyperparameters every step
                group["lr"] = group["initial_lr"] * (1 - 0.2 * step)
            loss = model(inputs, targets, loss_reduction="sum")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        if step == 0:
            compiled_after_first_step = frames_compiled()
    assert compiled_after_first_step > 0
    assert frames_compiled() == compiled_after_first_step, "a compiled function recompiled after the first step"
    for (name, ours), theirs in zip(compiled_model.named_parameters(), eager_model.parameters()):
        # A gradient near zero is mostly rounding (backout_lambda's is ~2e-7 here), and Adam's normalised step turns
        # a relative difference in it into one in the update: the scalars get a looser bound than the matrices.
        rtol = 1e-2 if ours.numel() < 64 else 1e-4
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def test_flex_model_has_no_graph_breaks(aot_eager):
    model = tiny_gpt()
    attention_module.set_backend("flex")
    inputs = torch.randint(0, 300, (2, 256))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(inputs, inputs, loss_reduction="sum")
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]


def test_prefill_and_decode_past_the_window_equal_the_flex_training_forward(aot_eager):
    """A cache longer than the short window: prefill 160 tokens, then decode 60 more one at a time. With the flex
    backend, cached calls take SDPA (a kernel per cache length is not worth compiling); their logits must equal the
    compiled training-shape forward through FlexAttention over the whole sequence."""
    model = tiny_gpt().eval()
    tokens = torch.randint(0, 300, (2, 220), generator=torch.Generator().manual_seed(2))
    attention_module.set_backend("flex")
    with torch.no_grad():
        full = torch.compile(model, dynamic=False, backend="aot_eager")(tokens)  # training-shaped: no cache
        cache = model.new_kv_cache(batch_size=2, max_len=256)
        pieces = [model(tokens[:, :160], kv_cache=cache)]
        pieces += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(160, 220)]
        attention_module.set_backend("sdpa")
        sdpa_full = model(tokens)
    assert cache.position == 220 > model.window_sizes[0]
    torch.testing.assert_close(full, sdpa_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_flex_attention_compiled_by_inductor_equals_sdpa(monkeypatch):
    """The kernel a GPU run calls outside a compiled model: FlexAttention compiled by inductor, block mask for a
    binding window, grouped-query heads."""
    monkeypatch.setenv("PICOCHAT_COMPILE_BACKEND", "inductor")
    attention_module._compiled_flex_attention.cache_clear()
    torch._dynamo.reset()
    try:
        generator = torch.Generator().manual_seed(3)
        q = torch.randn(1, 256, 2, 16, generator=generator)
        k, v = (torch.randn(1, 256, 1, 16, generator=generator) for _ in range(2))
        block_mask = attention_module._flex_block_mask(256, 100, "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = attention_module._compiled_flex_attention()(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=0.25,
                enable_gqa=True,
            ).transpose(1, 2)  # fmt: skip
        torch.testing.assert_close(out, attention_module.attention(q, k, v, window=100, backend="sdpa"),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    finally:
        attention_module._compiled_flex_attention.cache_clear()
        torch._dynamo.reset()
