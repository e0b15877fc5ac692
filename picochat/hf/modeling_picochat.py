"""The picochat GPT for `transformers`: PicochatModel and PicochatForCausalLM (shipped inside exported folders).

This file is copied into every folder `picochat export --format hf` writes and is loaded with
trust_remote_code=True, so it imports only torch and transformers. It re-implements picochat's forward pass
(picochat/gpt.py) operation for operation, so that in fp32 the logits equal picochat's to rounding:

- token embedding, then a parameter-free RMSNorm; untied lm_head; no biases anywhere
- smear: x_t += smear_lambda * sigmoid(W x_t[:24]) * x_{t-1} (the first token of a sequence has no predecessor)
- before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0, with x0 the smeared embedding
- pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)); MLP relu(x W1)^2 W2
- attention: half-split rotary (base 100,000), then QK-norm times 1.2, grouped-query heads, a per-layer sliding
  window (query i sees keys i - window .. i); on value-embedding layers v += 3 sigmoid(W x[:12]) * ve(token)
- backout: x = norm(x - backout_lambda * x_mid), x_mid = the output of layer n_layer // 2
- logits = 15 tanh(lm_head(x) / 15), in fp32

Why remote code: smear, backout, value embeddings, the resid/x0 lambdas and the soft-capped logits have no
counterpart in any stock transformers architecture, so no built-in class can load these weights.

The KV cache is a transformers DynamicCache holding every past key and value (layout (B, H_kv, T, D)); the sliding
windows are applied as masks over it, exactly as picochat does, rather than by dropping old keys. The smear needs
the previous token's embedding when a forward continues a cache: `generate` passes the previous token id
(prepare_inputs_for_generation below), and a plain forward falls back to the last token id recorded on the cache.
Padding is not supported (every row must be real tokens, attention_mask all ones): positions, the smear and the
windows all assume contiguous sequences.

transformers renamed the cache argument: up to 5.23 `generate` passes it as `past_key_values`, from 5.24 as `cache`
(the old name is announced for removal in 5.40). The forwards accept both names, and build their outputs with
whichever field the installed output classes declare. A cache handed over under any other name is refused loudly:
silently starting every decode step from an empty cache gives fluent-looking wrong text.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_picochat import PicochatConfig

# The attribute a forward leaves on a cache: the last token id of every row (for the smear of the next forward).
_LAST_TOKEN_ATTRIBUTE = "picochat_last_token_ids"


def _one_cache(cache: Cache | None, past_key_values: Cache | None, unknown: dict) -> Cache | None:
    """The cache a forward was given, under the new name (`cache`) or the old one (`past_key_values`). A Cache
    among the other keyword arguments means transformers passes it under a name this file does not know yet."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got two different caches: pass the cache once, as `cache` (or the older `past_key_values`)")
    stray = [name for name, value in unknown.items() if isinstance(value, Cache)]
    if stray:
        raise ValueError(
            f"a KV cache arrived as {stray[0]!r}, a name this exported code does not read; it reads `cache` and "
            "`past_key_values`. Re-export with a newer picochat, or pin the transformers release it was tested with"
        )
    return cache if cache is not None else past_key_values


def _cache_field(output_class: type) -> str:
    """The name of an output class's cache field: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"


def _output(output_class: type, cache: Cache | None, **fields):
    """An output of `output_class` with the cache stored under the field that class declares."""
    return output_class(**fields, **{_cache_field(output_class): cache})


def _norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a gain, torch's default epsilon (the same call picochat makes)."""
    return F.rms_norm(x, (x.size(-1),))


def _rotary_tables(start: int, length: int, head_dim: int, base: float, device, dtype):
    """cos and sin (1, length, 1, head_dim / 2) for positions start .. start + length - 1, computed in fp32 as
    picochat computes its table (angle = position * base^(-2i / head_dim)), then cast."""
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inverse_frequency)
    return angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]): (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    swapped = x.unflatten(-1, (2, x.size(-1) // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * torch.cat([cos, cos], dim=-1), swapped, torch.cat([-sin, sin], dim=-1))


def _window_mask(past: int, num_new: int, window: int, device) -> torch.Tensor:
    """(num_new, past + num_new) booleans, True = may attend: the query at position i sees key j iff
    0 <= i - j <= window (the new tokens sit at positions past .. past + num_new - 1)."""
    query_positions = torch.arange(past, past + num_new, device=device).unsqueeze(1)
    distance = query_positions - torch.arange(past + num_new, device=device).unsqueeze(0)
    return (distance >= 0) & (distance <= window)


class PicochatAttention(nn.Module):
    def __init__(self, config: PicochatConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.window = config.attention_windows[layer_idx]
        self.qk_scale = config.qk_scale
        self.value_gate_channels = config.value_gate_channels
        width, kv_dim = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.c_q = nn.Linear(width, width, bias=False)
        self.c_k = nn.Linear(width, kv_dim, bias=False)
        self.c_v = nn.Linear(width, kv_dim, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        # Value-embedding layers get a tiny gate: one output per KV head, reading the first 12 channels.
        self.ve_gate = None
        if layer_idx in config.value_embedding_layers:
            self.ve_gate = nn.Linear(config.value_gate_channels, self.n_kv_head, bias=False)

    def forward(self, x, value_embedding, cos, sin, past: int, cache: Cache | None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embedding is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.value_gate_channels]))  # (B, T, H_kv) in (0, 3)
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        q, k = _norm(q) * self.qk_scale, _norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # every past key and value of this layer, then the new ones
        # Keys before the first query's window are masked for every query: skip them (decode then costs O(window)).
        start = max(0, past - self.window)
        k, v = k[:, :, start:], v[:, :, start:]
        mask = _window_mask(past, T, self.window, x.device)[:, start:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class PicochatMLP(nn.Module):
    def __init__(self, config: PicochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class PicochatBlock(nn.Module):
    def __init__(self, config: PicochatConfig, layer_idx: int):
        super().__init__()
        self.attn = PicochatAttention(config, layer_idx)
        self.mlp = PicochatMLP(config)

    def forward(self, x, value_embedding, cos, sin, past: int, cache: Cache | None):
        x = x + self.attn(_norm(x), value_embedding, cos, sin, past, cache)
        return x + self.mlp(_norm(x))


class PicochatPreTrainedModel(PreTrainedModel):
    config_class = PicochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["PicochatBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights a checkpoint does not provide (e.g. from_config): picochat's own initial values in spirit
        # (identity-like scalars, small matrices). Loaded weights are never touched (transformers guards these).
        std = self.config.hidden_size**-0.5
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, PicochatModel):
            nn.init.ones_(module.resid_lambdas)
            nn.init.zeros_(module.x0_lambdas)
            nn.init.zeros_(module.smear_lambda)
            nn.init.constant_(module.backout_lambda, 0.2)


class PicochatModel(PicochatPreTrainedModel):
    """Everything but the output head: token ids -> the final normalised hidden states."""

    def __init__(self, config: PicochatConfig):
        super().__init__(config)
        width, vocab = config.hidden_size, config.vocab_size
        kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(PicochatBlock(config, i) for i in range(config.num_hidden_layers))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in config.value_embedding_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        previous_token_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """cache (or its older name past_key_values): the KV cache to read and extend. previous_token_ids: (B, 1),
        the token just before input_ids, when the cache already holds tokens (for the smear). Without it the id
        recorded on the cache by the previous forward is used."""
        cache = _one_cache(cache, past_key_values, kwargs)
        if input_ids is None:
            raise ValueError(
                "PicochatModel needs input_ids (input embeddings are not supported: the value "
                "embeddings are looked up by token id)"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("PicochatModel does not take inputs_embeds: pass input_ids")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "PicochatModel does not support padding: every attention_mask entry must be 1 "
                "(generate rows of equal length, or one row at a time)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        cache = cache if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        dtype = self.wte.weight.dtype
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = _rotary_tables(past, T, head_dim, self.config.rotary_base, input_ids.device, dtype)

        x = _norm(self.wte(input_ids))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : self.config.smear_channels]))
        if past == 0:
            smeared = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            if previous_token_ids is None:
                previous_token_ids = getattr(cache, _LAST_TOKEN_ATTRIBUTE, None)
            if previous_token_ids is None or previous_token_ids.shape[0] != B:
                raise ValueError("continuing a cache needs previous_token_ids (B, 1): the token before input_ids")
            previous = _norm(self.wte(previous_token_ids.to(input_ids.device)))
            smeared = x + gate * torch.cat([previous, x[:, :-1]], dim=1)
        if cache is not None:
            # Recorded for a later forward that is not given previous_token_ids (generate always gives them).
            setattr(cache, _LAST_TOKEN_ATTRIBUTE, input_ids[:, -1:].detach())
        x = x0 = smeared

        x_mid = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            key = str(i)
            value_embedding = self.value_embeds[key](input_ids) if key in self.value_embeds else None
            x = block(x, value_embedding, cos, sin, past, cache)
            if i == self.config.backout_layer:
                x_mid = x
        x = _norm(x - self.backout_lambda * x_mid)
        return _output(BaseModelOutputWithPast, cache, last_hidden_state=x)


class PicochatForCausalLM(PicochatPreTrainedModel, GenerationMixin):
    def __init__(self, config: PicochatConfig):
        super().__init__(config)
        self.model = PicochatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        previous_token_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (fp32, soft-capped) for input_ids; labels (B, T) give the mean next-token cross-entropy
        (labels are shifted inside, -100 = ignored). logits_to_keep > 0: logits of the last positions only."""
        kwargs.pop("position_ids", None)  # positions follow from the cache length (no padding, see the top)
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=_one_cache(cache, past_key_values, kwargs),
            use_cache=use_cache,
            previous_token_ids=previous_token_ids,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        softcap = self.config.logit_softcap
        logits = softcap * torch.tanh(self.lm_head(hidden).float() / softcap)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        cache = getattr(outputs, _cache_field(type(outputs)))
        return _output(CausalLMOutputWithPast, cache, loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # `generate` feeds only the tokens the cache has not seen; the smear also needs the one before them, which
        # the full input_ids still hold (this stays right under beam search, which reorders input_ids). The cache
        # travels under whichever name this transformers release uses (see the top of this file).
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if past > 0:
            model_inputs["previous_token_ids"] = input_ids[:, past - 1 : past]
        return model_inputs
