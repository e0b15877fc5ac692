"""The portable architecture: a GPT that is exactly transformers' Qwen3, so the tools people already run models in
(llama.cpp, Ollama, LM Studio, MLX, vLLM, the Hugging Face hub without remote code) run it as it is.

Why Qwen3: it is the smallest step from the reference that a stock runtime knows. It keeps QK-norm (now with
weights), RoPE in the half-split layout picochat already uses (transformers' rotate_half and llama.cpp's NEOX rope,
so no weight is permuted on export), grouped-query attention, an untied head and no biases. transformers loads a
`qwen3` GGUF with a plain rename of the tensors (its `llama` loader un-permutes Q and K; qwen3 has nothing to undo),
and llama.cpp has supported the architecture since 2025. What the reference has and no runtime does is left out:
value embeddings, smear, backout, the per-layer resid/x0 scalars, the soft-capped logits, ReLU^2, sliding windows.

One block, as transformers writes it (the module names here are its names, so the export only adds a prefix):

    n = input_layernorm(x)
    h = x + o_proj(attention(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n)))
    m = post_attention_layernorm(h)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m))

then a final RMSNorm and the lm_head. Every RMSNorm has a weight and eps 1e-6 (Qwen3's). The SwiGLU hidden size is
8/3 of the width rounded up to a multiple of 64, so the MLP has about the parameters and FLOPs of the reference's
4x ReLU^2 MLP (three matrices instead of two). The rotary base stays the reference's 100,000 (Qwen3 stores it in its
config, rope_theta).

Everything else is the reference's: the depth dial (GPTConfig.from_depth), the fp32 master weights cast on the fly,
the meta-device construction and init_weights(), the forward / loss / KV-cache interface the trainer, evaluation and
engine use, the accounting, and the optimizer (Muon for every 2-D matrix in the blocks, AdamW for the embedding, the
head and the norm weights), which is why PortableGPT subclasses GPT and replaces only what differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat import hardware
from picochat.attention import KVCache, attention
from picochat.gpt import GPT, QK_SCALE, Linear
from picochat.model_config import GPTConfig, window_sizes
from picochat.rotary import ROPE_BASE, apply_rotary, rotary_tables

RMS_NORM_EPS = 1e-6  # Qwen3's rms_norm_eps; written into the exported configs
MLP_MULTIPLE = 64


def intermediate_size(n_embd: int) -> int:
    """SwiGLU hidden width: 8/3 x n_embd rounded up to a multiple of 64 (768 -> 2048, 256 -> 704)."""
    return math.ceil(8 * n_embd / 3 / MLP_MULTIPLE) * MLP_MULTIPLE


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, as transformers' Qwen3RMSNorm: weight * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), RMS_NORM_EPS)


class PortableAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = Linear(config.n_embd, config.n_head * config.head_dim)
        self.k_proj = Linear(config.n_embd, kv_dim)
        self.v_proj = Linear(config.n_embd, kv_dim)
        self.o_proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.q_norm = RMSNorm(config.head_dim)  # per head, before the rotation (Qwen3's order)
        self.k_norm = RMSNorm(config.head_dim)

    def forward(self, x, cos, sin, window: int, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        key_cache = value_cache = None
        if kv_cache is not None:
            key_cache, value_cache = kv_cache.layer(self.layer_index)
        position = 0 if kv_cache is None else kv_cache.position
        y = attention(q, k, v, window=window, key_cache=key_cache, value_cache=value_cache, cache_position=position)
        return self.o_proj(y.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = intermediate_size(config.n_embd)
        self.gate_proj = Linear(config.n_embd, hidden)
        self.up_proj = Linear(config.n_embd, hidden)
        self.down_proj = Linear(hidden, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PortableBlock(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd)
        self.self_attn = PortableAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, window: int, kv_cache: KVCache | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, window, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class PortableGPT(GPT):
    """A Qwen3-shaped GPT with the reference GPT's interface (see the module docstring)."""

    def __init__(self, config: GPTConfig, *, compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not GPT.__init__: none of the reference's modules exist here
        if config.architecture != "portable":
            raise ValueError(f"PortableGPT needs a portable config, got architecture={config.architecture!r}")
        self.config = config
        self.compute_dtype = compute_dtype
        self.fused_loss = False  # the fused loss is the soft-capped one; this head has no cap (plain cross-entropy)
        self.window_sizes = window_sizes(config)  # every layer: the whole context
        vocab = config.padded_vocab_size
        self.wte = nn.Embedding(vocab, config.n_embd)  # transformers: model.embed_tokens
        self.blocks = nn.ModuleList(PortableBlock(config, i) for i in range(config.n_layer))  # model.layers
        self.norm = RMSNorm(config.n_embd)  # model.norm
        self.lm_head = Linear(config.n_embd, vocab)  # untied from wte
        self.value_embeds = nn.ModuleDict()  # none: kept (empty) so code that counts embeddings needs no case
        self.rotary_len = 10 * config.sequence_len
        half = config.head_dim // 2
        self.register_buffer("cos", torch.empty(1, self.rotary_len, 1, half), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_len, 1, half), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's initialisation where the parts match: q/k/v/gate/up ~ U(-b, b) with b = sqrt(3 / n_embd);
        o_proj and down_proj = 0 (every block starts as the identity); lm_head ~ N(0, 0.001). wte ~ N(0, 1): the
        reference normalises its embedding before the first block, this one (as Qwen3) does not, so the embedding
        starts at the RMS of 1 the normalised one has. Norm weights 1, except the QK-norms at 1.2: the reference's
        QK_SCALE, which sharpens attention at the start and is now a learned gain."""
        config = self.config
        bound = math.sqrt(3.0 / config.n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            attn, mlp = block.self_attn, block.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(attn.o_proj.weight)
            nn.init.zeros_(mlp.down_proj.weight)
            block.input_layernorm.weight.fill_(1.0)
            block.post_attention_layernorm.weight.fill_(1.0)
            attn.q_norm.weight.fill_(QK_SCALE)
            attn.k_norm.weight.fill_(QK_SCALE)
        self.norm.weight.fill_(1.0)
        device = self.wte.weight.device
        if self.compute_dtype is None:
            self.compute_dtype = hardware.compute_dtype(device)
        self.cos, self.sin = rotary_tables(
            self.rotary_len, config.head_dim, base=ROPE_BASE, device=device, dtype=self.compute_dtype
        )

    def store_embeddings_in(self, dtype: torch.dtype) -> None:
        self.wte.to(dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The same contract as GPT.forward (logits or loss; kv_cache continues its rows; last_only)."""
        if last_only and targets is not None:
            raise ValueError("last_only is for inference: it cannot be combined with targets")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        cos, sin = self.rotary_for(idx, kv_cache)
        x = self.wte(idx).to(self.compute_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, self.window_sizes[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    def _scalar_parameters(self) -> list[nn.Parameter]:
        """The norm weights (the only 1-D parameters): counted as "scalars", trained by AdamW."""
        return [p for p in self.parameters() if p.ndim == 1]

    def _block_matrices(self) -> list[nn.Parameter]:
        return [p for p in self.blocks.parameters() if p.ndim == 2]

    def parameter_counts(self) -> dict[str, int]:
        """The reference's keys: wte, value_embeds (0), lm_head, transformer_matrices (the 2-D block weights),
        scalars (every norm weight), total."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": 0,
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self._block_matrices()),
            "scalars": sum(p.numel() for p in self._scalar_parameters()),
        }
        counts["total"] = sum(counts.values())
        actual = sum(p.numel() for p in self.parameters())
        if counts["total"] != actual:
            raise RuntimeError(f"parameter_counts() covers {counts['total']:,} of {actual:,} parameters")
        return counts

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
        """MuonAdamW grouped as the reference's: lm_head and wte in AdamW with the reference's LRs, betas and decay
        (scaled by (n_embd / 768)^-0.5), the norm weights in AdamW at the LR of the reference's per-layer residual
        gains (scalar_lr x 0.01, no decay), and every 2-D block matrix in Muon, one group per shape."""
        from picochat.optim import MuonAdamW

        scale = (self.config.n_embd / 768) ** -0.5
        adamw_table = [
            ("lm_head", [self.lm_head.weight], unembedding_lr * scale, (0.8, 0.96), 0.01),
            ("wte", [self.wte.weight], embedding_lr * scale, (0.8, 0.995), 0.001),
            ("norms", self._scalar_parameters(), scalar_lr * 0.01, (0.8, 0.95), 0.0),
        ]
        groups = [
            dict(kind="adamw", name=name, params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=decay)
            for name, params, lr, betas, decay in adamw_table
        ]
        matrices = self._block_matrices()
        for shape in sorted({tuple(p.shape) for p in matrices}):
            same_shape = [p for p in matrices if tuple(p.shape) == shape]
            groups.append(
                dict(kind="muon", name=f"matrices_{shape[0]}x{shape[1]}", params=same_shape, lr=matrix_lr,
                     momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=weight_decay)
            )  # fmt: skip
        covered = sum(len(g["params"]) for g in groups)
        if covered != len(list(self.parameters())):
            raise RuntimeError(f"optimizer groups cover {covered} of {len(list(self.parameters()))} parameters")
        for group in groups:
            group["initial_lr"] = group["lr"]
        ortho_dtype = torch.bfloat16 if self.compute_dtype == torch.bfloat16 else torch.float32
        return MuonAdamW(groups, orthogonalize_dtype=ortho_dtype, compile=compile, distributed=distributed)
