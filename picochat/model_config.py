"""The model's shape: GPTConfig, the one dial (from_depth) that derives every size from the depth, and the
per-layer attention windows. Both architectures read it (picochat/gpt.py: the reference; picochat/portable.py:
a stock Qwen3); `architecture` says which one a config describes, and is saved with it in every config.json.
A config saved before the field existed has none, and loads as the reference (its default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from picochat.common import PicochatError

# "reference": nanochat's architecture (value embeddings, smear, backout, x0 scalars, soft-capped logits, ReLU^2,
# sliding windows): the best quality per FLOP. "portable": exactly transformers' Qwen3 (SwiGLU, RMSNorm with
# weights, QK-norm, RoPE, GQA, untied head, full attention everywhere), which llama.cpp, Ollama, LM Studio, MLX
# and vLLM run as they are (picochat/portable.py says why Qwen3).
ARCHITECTURES = ("reference", "portable")
SMEAR_CHANNELS = 24  # the reference's smear gate reads the first 24 channels of the embedding
VOCAB_MULTIPLE = 64  # pad the vocabulary so the embedding/lm_head shapes are friendly to matmul kernels
# Upper bounds on a config's sizes, far above anything trainable here (nanochat's largest: 2048 tokens, 65,536
# vocab, 32 layers x 2048 wide), so that a damaged or hostile config.json is refused with a message instead of
# an attempt to allocate petabytes (the rotary tables alone are 10 x sequence_len x head_dim floats).
CONFIG_MAXIMA = {
    "sequence_len": 131_072,
    "vocab_size": 1 << 20,
    "n_layer": 512,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 32_768,
}


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (grouped-query attention when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over the layers: S = short window, L = long (full context)
    architecture: str = "reference"  # one of ARCHITECTURES; configs saved before it existed are the reference

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise PicochatError(
                f"model config architecture={self.architecture!r}: expected one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PicochatError(f"model config {name}={value!r}: expected a positive integer")
            if value > CONFIG_MAXIMA[name]:
                raise PicochatError(f"model config {name}={value}: expected at most {CONFIG_MAXIMA[name]:,}")
        if self.n_embd % self.n_head:
            raise PicochatError(f"model config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise PicochatError(f"model config: head dim {self.head_dim} must be even (rotary embeddings)")
        if self.n_head % self.n_kv_head:
            raise PicochatError(f"model config: n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.n_embd < SMEAR_CHANNELS:
            raise PicochatError(f"model config: n_embd {self.n_embd} must be at least {SMEAR_CHANNELS}")
        pattern = self.window_pattern.upper() if isinstance(self.window_pattern, str) else ""
        if not pattern or set(pattern) - {"S", "L"}:
            raise PicochatError(
                f"model config window_pattern={self.window_pattern!r}: expected letters S (short) and L (long)"
            )
        self.window_pattern = pattern
        if self.architecture == "portable" and "S" in pattern:
            # Qwen3 in llama.cpp (and Ollama, MLX...) attends over the whole context in every layer.
            raise PicochatError(
                f"model config window_pattern={pattern!r}: the portable architecture has no sliding windows (use L)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @classmethod
    def from_depth(
        cls,
        depth: int,
        *,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        vocab_size: int = 32768,
        sequence_len: int = 2048,
        window_pattern: str | None = None,
        n_kv_head: int | None = None,
        architecture: str = "reference",
    ) -> GPTConfig:
        """The single dial: width = depth * aspect_ratio rounded UP to a whole number of heads of head_dim.

        d12 -> 768 wide, 6 heads; d24 -> 1536, 12 heads; d26 -> 1664 (26*64 = 1664 = 13 heads of 128).
        n_kv_head defaults to n_head (plain multi-head attention). window_pattern defaults to SSSL for the
        reference and L (full context in every layer) for the portable architecture.
        """
        for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise PicochatError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")
        model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=model_dim,
            window_pattern=window_pattern or ("L" if architecture == "portable" else "SSSL"),
            architecture=architecture,
        )

    def to_dict(self) -> dict:
        """The JSON form saved in config.json. `architecture` is written only when it is not the reference, so a
        reference config reads exactly as before the field existed: checkpoints of older runs resume (their saved
        model shape compares equal) and older picochat versions still load newer reference models."""
        data = asdict(self)
        if data["architecture"] == "reference":
            del data["architecture"]
        return data

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "model config") -> GPTConfig:
        """A config from its to_dict() form, read from `source` (a file name), which every error names."""
        if not isinstance(data, dict):
            raise PicochatError(f"{source}: the model shape must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PicochatError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except PicochatError as error:
            raise PicochatError(f"{source}: {error}") from None


def short_window(sequence_len: int) -> int:
    """The S window: a quarter of the context rounded up to a multiple of 128 (2048 -> 512)."""
    return math.ceil(math.ceil(sequence_len / 4) / 128) * 128


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer attention window (how many tokens back a query may look): the pattern tiled over the
    layers, S -> short_window(sequence_len), L -> sequence_len; the last layer is always L so the final
    representation sees the whole context."""
    short, long = short_window(config.sequence_len), config.sequence_len
    pattern = config.window_pattern
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes
