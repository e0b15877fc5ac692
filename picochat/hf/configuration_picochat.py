"""PicochatConfig: the shape of a picochat GPT for `transformers` (shipped inside exported model folders).

This file is copied into every folder `picochat export --format hf` writes and is loaded by `transformers` with
trust_remote_code=True, so it imports nothing but transformers. Field names follow the transformers conventions
(hidden_size, num_hidden_layers, ...) so generic tooling (cache sizing, model cards, pipelines) reads them; the
picochat-specific ones are documented below.

Two names are avoided on purpose: `sliding_window` and `layer_types`. transformers would read them to build
sliding-window caches that *drop* old keys, with its own window convention. Our windows are applied as masks over
a full cache instead (exactly picochat's semantics), so the per-layer windows live under `attention_windows`.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class PicochatConfig(PretrainedConfig):
    """The picochat GPT (see picochat/gpt.py in the picochat repository for the model itself).

    attention_windows: per layer, how far back a query may look: the query at position i sees the keys at
        positions i - window .. i. ("SSSL" tiled: short = a quarter of the context rounded up to 128, long = the
        full context; the last layer is always long.)
    window_pattern: the pattern the windows came from (informational).
    rotary_base: base of the rotary angles (half-split RoPE, applied before QK-norm).
    qk_scale: q and k are RMS-normalised and then multiplied by this.
    logit_softcap: logits are squashed to logit_softcap * tanh(logits / logit_softcap).
    smear_channels, value_gate_channels: how many leading channels the smear gate and the value-embedding
        gates read.
    value_embedding_layers: the layers that mix a per-token value embedding into their attention values.
    backout_layer: the layer whose output is subtracted (times a learned scalar) before the final norm.
    """

    model_type = "picochat"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        num_key_value_heads: int = 6,
        max_position_embeddings: int = 2048,
        attention_windows: list[int] | None = None,
        window_pattern: str = "SSSL",
        rotary_base: float = 100_000.0,
        qk_scale: float = 1.2,
        logit_softcap: float = 15.0,
        smear_channels: int = 24,
        value_gate_channels: int = 12,
        value_embedding_layers: list[int] | None = None,
        backout_layer: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        # Defaults reproduce picochat's rules, so a config built by hand (tests, from_config) is still a picochat.
        if attention_windows is None:
            short = math.ceil(math.ceil(max_position_embeddings / 4) / 128) * 128
            pattern = window_pattern.upper()
            attention_windows = [
                short if pattern[i % len(pattern)] == "S" else max_position_embeddings for i in range(num_hidden_layers)
            ]
            attention_windows[-1] = max_position_embeddings
        self.attention_windows = list(attention_windows)
        self.window_pattern = window_pattern
        self.rotary_base = rotary_base
        self.qk_scale = qk_scale
        self.logit_softcap = logit_softcap
        self.smear_channels = smear_channels
        self.value_gate_channels = value_gate_channels
        if value_embedding_layers is None:  # every other layer, counted back from the last
            value_embedding_layers = [i for i in range(num_hidden_layers) if i % 2 == (num_hidden_layers - 1) % 2]
        self.value_embedding_layers = list(value_embedding_layers)
        self.backout_layer = num_hidden_layers // 2 if backout_layer is None else backout_layer
        self.use_cache = use_cache
        # The output head is its own matrix; transformers would otherwise tie it to the input embedding.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        if len(self.attention_windows) != num_hidden_layers:
            raise ValueError(
                f"attention_windows has {len(self.attention_windows)} entries, expected one per layer "
                f"({num_hidden_layers})"
            )
