"""The GPT model: a modern small transformer whose every size follows from one number, the depth.

What is in it (each item is explained where it is built):
- token embedding, then a parameter-free RMSNorm; an untied lm_head; vocab padded to a multiple of 64
- rotary position embeddings (base 100,000, half-split), QK-norm then both scaled by 1.2
- pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)); MLP with ReLU^2; no biases anywhere
- value embeddings (ResFormer): on alternating layers (always including the last) a per-token vector is mixed
  into the attention values through a small gate
- per-layer scalars: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0 = the input embedding)
- smear: each token's embedding gets a gated copy of the previous token's (cheap bigram information)
- backout: a learned multiple of the mid-network residual is subtracted before the final norm
- sliding-window attention in a tiled pattern ("SSSL": three short layers, one long; the last layer is long)
- grouped-query attention (n_kv_head divides n_head)
- logits soft-capped at 15: 15 * tanh(logits / 15)

Precision is explicit. Parameters are fp32 "master" weights; activations are in one compute dtype (bf16 on
modern CUDA, fp32 on CPU; see hardware.compute_dtype). Our Linear casts its weight to the activation dtype on
the fly, which is the whole mechanism (no autocast). Logits and the loss are computed in fp32 (the loss
without materialising the logits: picochat/loss.py).

Construction happens on the meta device (shapes only, no memory, instant even for billions of parameters),
then the model is materialised and initialised in ONE place:

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)   # allocate (garbage values)
    model.init_weights()            # every parameter and buffer gets its real value here

GPT.build(config, device) does exactly these three steps, for the architecture the config names: this file is the
reference; `architecture="portable"` builds picochat/portable.py's PortableGPT, a stock Qwen3 with the same interface
(the shape, GPTConfig, lives in picochat/model_config.py). Values written in __init__ are placeholders: only
init_weights() sets real ones (this includes the rotary tables, so a checkpoint loader calls it too).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat import hardware, inference_cost
from picochat.attention import KVCache, RowPositions, SlotKVCache, attention
from picochat.fp8 import fp8_linear
from picochat.loss import SOFTCAP, softcapped_cross_entropy
from picochat.model_config import (  # noqa: F401  (re-exported: the model's shape lives in model_config.py)
    CONFIG_MAXIMA,
    SMEAR_CHANNELS,
    VOCAB_MULTIPLE,
    GPTConfig,
    short_window,
    window_sizes,
)
from picochat.rotary import apply_rotary, rotary_tables

QK_SCALE = 1.2  # after QK-norm, q and k are each multiplied by this: sharper attention than 1/sqrt(D) alone
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input


def model_class(config: GPTConfig) -> type[GPT]:
    """The class of the architecture `config` names: GPT (the reference) or PortableGPT (a stock Qwen3)."""
    if config.architecture == "portable":
        from picochat.portable import PortableGPT  # imported here: portable.py builds on this module

        return PortableGPT
    return GPT


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Value embeddings live on every other layer, counted back from the last (which always has one)."""
    return layer % 2 == (n_layer - 1) % 2


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable gain: x / sqrt(mean(x^2) + eps) over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the activation dtype at use.

    fp8: set by fp8.enable_fp8 (`--fp8`) on the large matrices; then training-mode calls with gradients on multiply
    in FP8 (picochat/fp8.py). Evaluation and inference never do, and the weights are the same either way."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False

    def uses_fp8(self) -> bool:
        return self.fp8 and self.training and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fp8():
            return fp8_linear(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.c_q = Linear(config.n_embd, config.n_embd)
        self.c_k = Linear(config.n_embd, kv_dim)
        self.c_v = Linear(config.n_embd, kv_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        # Value-embedding layers get a tiny gate: one output per KV head, reading only the first 12 channels.
        self.ve_gate = (
            Linear(VE_GATE_CHANNELS, config.n_kv_head) if has_value_embedding(layer_index, config.n_layer) else None
        )

    def forward(self, x, value_embedding, cos, sin, window: int, kv_cache: KVCache | None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embedding is not None:
            # v += gate * ve with gate = 3 * sigmoid(W x[:12]) in (0, 3), one per KV head.
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        key_cache = value_cache = None
        if kv_cache is not None:
            key_cache, value_cache = kv_cache.layer(self.layer_index)
        position = 0 if kv_cache is None else kv_cache.position
        y = attention(q, k, v, window=window, key_cache=key_cache, value_cache=value_cache, cache_position=position)
        return self.c_proj(y.reshape(B, T, C))


class _ReluSquaredProjection(torch.autograd.Function):
    """relu(h)^2 @ W^T, keeping only h for backward. Autograd would keep two tensors of the MLP's widest shape
    (relu's output and its square, the projection's input); relu(h)^2 is cheap to recompute, so keep one."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return F.linear(torch.relu(hidden).square_(), weight.to(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight = ctx.saved_tensors
        relu = torch.relu(hidden)
        grad_weight = (grad_output.flatten(0, -2).T @ (relu * relu).flatten(0, -2)).to(weight.dtype)
        # d relu(h)^2 / dh = 2 relu(h); the 2 scales the (4x narrower) incoming gradient: one pass over the
        # MLP's widest tensor fewer.
        grad_hidden = ((grad_output * 2) @ weight.to(hidden.dtype)).mul_(relu)
        return grad_hidden, grad_weight


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # c_proj(relu(c_fc(x))^2). ReLU^2: sparse like ReLU, smoother growth.
        if self.c_proj.uses_fp8():  # FP8 keeps its own FP8 copy of the input for backward: no recompute to win
            return self.c_proj(torch.relu(self.c_fc(x)).square())
        return _ReluSquaredProjection.apply(self.c_fc(x), self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp = MLP(config)

    def forward(self, x, value_embedding, cos, sin, window: int, kv_cache: KVCache | None):
        x = x + self.attn(norm(x), value_embedding, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


# ----------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, compute_dtype: torch.dtype | None = None):
        """Shapes only: build under `torch.device("meta")`, then to_empty() + init_weights() (see the top).

        compute_dtype: the activation dtype; None picks hardware.compute_dtype() for the device the model is
        materialised on (resolved in init_weights).
        """
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        # Loss through softcapped_cross_entropy (chunked, fused gradient) rather than full logits. Same values;
        # False only to compare against the plain formulation (tests, bench/train.py).
        self.fused_loss = True
        self.window_sizes = window_sizes(config)
        vocab, width, kv_dim = config.padded_vocab_size, config.n_embd, config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(vocab, kv_dim)
                for i in range(config.n_layer)
                if has_value_embedding(i, config.n_layer)
            }
        )
        self.lm_head = Linear(width, vocab)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        # Rotary tables for 10x the training context, as the reference sizes them (the Engine never runs past the
        # training context; only direct forward calls can use the rest); recomputed, so not saved in checkpoints.
        self.rotary_len = 10 * config.sequence_len
        half = config.head_dim // 2
        self.register_buffer("cos", torch.empty(1, self.rotary_len, 1, half), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_len, 1, half), persistent=False)

    @classmethod
    def build(cls, config: GPTConfig, device: torch.device | str, *, compute_dtype: torch.dtype | None = None) -> GPT:
        """Meta-device construction, allocation on `device`, then init_weights(). GPT.build builds the architecture
        the config names (model_class)."""
        if cls is GPT:
            cls = model_class(config)
        with torch.device("meta"):
            model = cls(config, compute_dtype=compute_dtype)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """Give every parameter and buffer its real value; the only place initial values are decided.

        wte ~ N(0, 0.8); lm_head ~ N(0, 0.001) (start with near-uniform predictions);
        c_q, c_k, c_v and value embeddings ~ U(-b, b) with b = sqrt(3 / n_embd), i.e. std 1/sqrt(n_embd)
        (uniform keeps every entry bounded); c_fc ~ U(-0.4 b, 0.4 b); both c_proj = 0, so every block starts as
        the identity and the residual stream is just the embedding; gates ~ U(0, 0.02); smear_lambda 0;
        backout_lambda 0.2; resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 linearly over depth.
        """
        config = self.config
        bound = math.sqrt(3.0 / config.n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, config.n_layer))
        self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, config.n_layer))

        device = self.wte.weight.device
        if self.compute_dtype is None:
            self.compute_dtype = hardware.compute_dtype(device)
        self.cos, self.sin = rotary_tables(self.rotary_len, config.head_dim, device=device, dtype=self.compute_dtype)

    def store_embeddings_in(self, dtype: torch.dtype) -> None:
        """Keep the token and value embeddings in `dtype` (their Adam moments stay fp32: optim.adamw_step updates in
        fp32 and writes back). They are 47% of d24's parameters (654M of 1.38B), so bf16 storage, as the reference
        does on CUDA, saves 654M x (2 bytes of weight + 2 of gradient) = 2.6 GB per GPU at d24 (computed, not yet
        measured). They are lookups, not matmuls: rows are read, so bf16 costs no precision in the forward beyond the
        bf16 compute dtype itself; updates smaller than a bf16 step of a weight are lost, which the reference
        accepts. A checkpoint loads into either storage (load_state_dict casts)."""
        self.wte.to(dtype)
        self.value_embeds.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens, in the compute dtype."""
        config = self.config
        return KVCache(
            n_layer=config.n_layer,
            batch_size=batch_size,
            max_len=max_len,
            n_kv_head=config.n_kv_head,
            head_dim=config.head_dim,
            device=self.device,
            dtype=self.compute_dtype,
        )

    def new_slot_cache(self, capacity: int, max_len: int) -> SlotKVCache:
        """An empty cache of `capacity` rows that may sit at different positions (continuous batching)."""
        config = self.config
        return SlotKVCache(
            n_layer=config.n_layer,
            capacity=capacity,
            max_len=max_len,
            n_kv_head=config.n_kv_head,
            head_dim=config.head_dim,
            embedding_dim=config.n_embd,
            device=self.device,
            dtype=self.compute_dtype,
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. Returns fp32 logits (B, T, vocab_size), or the cross-entropy loss if
        targets (B, T) are given: positions with target -1 are ignored; loss_reduction "mean" gives a scalar,
        "sum" a scalar, "none" a (B, T) tensor (0 at ignored positions).

        kv_cache (inference): the T tokens continue the rows already in the cache. Their keys/values are
        appended, rotary positions start at kv_cache.position, smear uses the cached previous embedding, and
        the cache position advances by T when the forward is done. A forward over a prefix and then the rest
        with a cache gives the same logits as one forward over everything. With a SlotKVCache each row continues
        from its own position (per-row rotary angles and attention masks).

        last_only (inference): return the logits of the last position only, (B, 1, vocab_size). A prefill needs
        nothing else, and with a 32K vocabulary the lm_head over every prompt position is most of its FLOPs.
        """
        if last_only and targets is not None:
            raise ValueError("last_only is for inference: it cannot be combined with targets")
        B, T = idx.shape
        dtype = self.compute_dtype
        cos, sin = self.rotary_for(idx, kv_cache)

        x = norm(self.wte(idx).to(dtype))
        # Smear: x_t += smear_lambda * sigmoid(W x_t[:24]) * x_{t-1}. The gate is read from the current token;
        # the first token of a sequence has no predecessor (with a cache, its predecessor is the cached one).
        gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        previous = kv_cache.prev_embedding if kv_cache is not None else None
        if previous is None:
            smeared = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            smeared = x + gate * torch.cat([previous, x[:, :-1]], dim=1)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        x = x0 = smeared

        backout_layer = self.config.n_layer // 2
        x_mid = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            value_embedding = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, value_embedding, cos, sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_mid = x
        # Backout: remove part of the mid-network residual (low-level features) before reading out.
        x = norm(x - self.backout_lambda.to(dtype) * x_mid)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is not None and self.fused_loss and (loss_reduction != "none" or not torch.is_grad_enabled()):
            # The usual training / evaluation call: never materialise all the fp32 logits (picochat/loss.py).
            return softcapped_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size, loss_reduction)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def rotary_for(self, idx: torch.Tensor, kv_cache: KVCache | SlotKVCache | None) -> tuple[torch.Tensor, ...]:
        """cos and sin for the T tokens of idx (B, T), which continue the rows in kv_cache (if any), and a check
        that they fit the rotary table and the cache. With a SlotKVCache each row has its own positions."""
        T = idx.size(1)
        start = 0 if kv_cache is None else kv_cache.position
        if isinstance(start, RowPositions):  # a SlotKVCache: every row at its own position (continuous batching)
            if start.highest + T > self.rotary_len:
                raise ValueError(f"sequence of {start.highest + T} tokens exceeds the rotary table ({self.rotary_len})")
            positions = start.first.unsqueeze(1) + torch.arange(T, device=idx.device)  # (B, T)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, head_dim / 2)
        elif start + T > self.rotary_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the rotary table ({self.rotary_len})")
        else:
            cos, sin = self.cos[:, start : start + T], self.sin[:, start : start + T]
        if kv_cache is not None:
            kv_cache.check_room(T)
        return cos, sin

    # ------------------------------------------------------------------------------------------------------
    # Accounting: the model is the one source of truth for its parameter and FLOP counts.

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by kind: wte, value_embeds, lm_head, transformer_matrices (everything inside the blocks,
        including the value-embedding gates), scalars (resid/x0 lambdas, smear gate and lambda, backout), total."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.blocks.parameters()),
            "scalars": sum(p.numel() for p in self._scalar_parameters()),
        }
        counts["total"] = sum(counts.values())
        actual = sum(p.numel() for p in self.parameters())
        if counts["total"] != actual:
            raise RuntimeError(f"parameter_counts() covers {counts['total']:,} of {actual:,} parameters")
        return counts

    def num_scaling_params(self) -> int:
        """The count the scaling laws use (Kaplan-style): transformer matrices + lm_head, no embeddings."""
        counts = self.parameter_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def num_matmul_params(self) -> int:
        """Weights that multiply the token stream (2 FLOPs per weight per token forward): every Linear.
        Embeddings are lookups and scalars are elementwise, so neither counts."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, sequence_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM-style:
        6 * matmul params  +  sum over layers of 12 * n_head * head_dim * min(window, T).
        The attention term counts QK^T and AV (2 matmuls x 2 FLOPs x 3 for fwd+bwd) over the keys each query
        actually sees, so short-window layers are cheaper."""
        T = sequence_len or self.config.sequence_len
        attention_width = self.config.n_head * self.config.head_dim
        attention_flops = sum(12 * attention_width * min(window, T) for window in self.window_sizes)
        return 6 * self.num_matmul_params() + attention_flops

    # Inference (picochat/inference_cost.py has the conventions).

    def decode_flops_per_token(self, context_len: int) -> int:
        return inference_cost.decode_flops_per_token(self, context_len)

    def prefill_flops_per_token(self, prompt_len: int) -> float:
        return inference_cost.prefill_flops_per_token(self, prompt_len)

    def kv_cache_bytes_per_token(self) -> int:
        return inference_cost.kv_cache_bytes_per_token(self)

    def decode_bytes_per_step(self, batch_size: int, context_len: int) -> int:
        return inference_cost.decode_bytes_per_step(self, batch_size, context_len)

    def _scalar_parameters(self) -> list[nn.Parameter]:
        return [self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    # ------------------------------------------------------------------------------------------------------
    # Optimizer

    def setup_optimizer(
        self,
        *,
        unembedding_lr: float = 0.008,
        embedding_lr: float = 0.3,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.28,
        scalar_lr: float = 0.5,
        compile: bool | None = None,
        distributed: bool | None = None,
    ):
        """MuonAdamW with the reference's parameter groups. Embedding and unembedding LRs are scaled by
        (n_embd / 768)^-0.5 (they were tuned at width 768). Matrices inside the blocks go to Muon, one group
        per shape (so same-shape matrices are orthogonalised as one stacked batch); everything else to AdamW.
        The pretraining stage applies the batch-size LR scaling (picochat.scaling) to the arguments. Every group
        records `initial_lr` for the schedules."""
        from picochat.optim import MuonAdamW

        scale = (self.config.n_embd / 768) ** -0.5
        smear_backout = [self.smear_gate.weight, self.smear_lambda, self.backout_lambda]
        # AdamW groups: name, params, lr, betas, weight decay (eps 1e-10 for all)
        adamw_table = [
            ("lm_head", [self.lm_head.weight], unembedding_lr * scale, (0.8, 0.96), 0.01),
            ("wte", [self.wte.weight], embedding_lr * scale, (0.8, 0.995), 0.001),
            ("value_embeds", list(self.value_embeds.parameters()), embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            ("resid_lambdas", [self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            ("x0_lambdas", [self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),  # slower-moving first moment
            ("smear_backout", smear_backout, 0.2, (0.8, 0.95), 0.0),  # fixed LR: no width or batch-size scaling
        ]
        groups = [
            dict(kind="adamw", name=name, params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=decay)
            for name, params, lr, betas, decay in adamw_table
        ]
        # Muon groups: every matrix inside the blocks, one group per shape.
        matrices = list(self.blocks.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            same_shape = [p for p in matrices if tuple(p.shape) == shape]
            name = f"matrices_{shape[0]}x{shape[1]}"
            groups.append(
                dict(kind="muon", name=name, params=same_shape, lr=matrix_lr, momentum=0.95, beta2=0.9, ns_steps=5,
                     weight_decay=weight_decay)
            )  # fmt: skip
        covered = sum(len(g["params"]) for g in groups)
        if covered != len(list(self.parameters())):
            raise RuntimeError(f"optimizer groups cover {covered} of {len(list(self.parameters()))} parameters")
        for group in groups:
            group["initial_lr"] = group["lr"]
        # Orthogonalise in bf16 when the model computes in bf16 (fast tensor cores; Polar Express tolerates it).
        ortho_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        return MuonAdamW(groups, orthogonalize_dtype=ortho_dtype, compile=compile, distributed=distributed)
