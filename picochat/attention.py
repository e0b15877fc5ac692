"""Causal self-attention with sliding windows: the one attention function the model calls.

Layout. Everything here uses the model's natural layout (B, T, H, D): batch, time, heads, head dim. Queries
have H heads, keys and values H_kv heads with H_kv dividing H (grouped-query attention: each key/value head
serves H / H_kv consecutive query heads). SDPA and FlexAttention want (B, H, T, D), so we transpose at the
boundary; flash-attn takes (B, T, H, D) as is.

Windows. `window` counts how far back a query may look: the query at absolute position i sees the key at
position j iff  0 <= i - j <= window.  So window = 0 is "attend to yourself only", and any window >= T - 1 is
plain causal attention over T tokens. This is the `(left, 0)` convention of flash-attn's `window_size`.

Four situations share this one function:
  training  q, k, v all cover the same T positions 0..T-1 (no cache).
  prefill   a chunk of T new tokens after P cached ones: the new keys/values are written into the cache at
            P..P+T-1 and the queries (positions P..P+T-1) attend over cache[0 : P+T].
  decode    the same with T = 1.
  batched   rows at different positions (continuous batching, SlotKVCache): each row writes and reads at its own
            position, with a per-row mask (SDPA).

Backends. "sdpa" (torch.nn.functional.scaled_dot_product_attention) works everywhere and is the reference.
It picks a fused kernel itself when there is no explicit mask, so plain causal attention is fast; a sliding
window needs an explicit boolean mask, and the fused kernels then mostly fall back to slower paths.
Two faster kernels are used only where present:
  "flash"  the flash-attn package (if importable) on CUDA in bf16/fp16: native sliding windows, GQA and
           KV-cache offsets (its causal mask is aligned bottom-right, exactly our convention).
  "flex"   torch FlexAttention with a block-sparse mask on CUDA, for training-shaped calls whose window is
           shorter than the sequence (whole blocks outside the window are skipped). Cached calls use SDPA,
           because every new cache length would compile a new kernel.
The default "auto" picks flash > flex > sdpa by those rules; set_backend() or the `backend` argument forces
one (tests compare each against SDPA and against a naive softmax(QK^T/sqrt(D))V). Forced "flex" also runs on
CPU, uncompiled and forward-only (torch has no CPU backward for it): useful for checking masks, nothing else.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from picochat.common import PicochatError, compile_backend

BACKENDS = ("auto", "sdpa", "flex", "flash")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the attention backend for every later call: "auto" (default), "sdpa", "flex" or "flash"."""
    global _backend
    if name not in BACKENDS:
        raise PicochatError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@functools.cache
def _flash_attn_func():
    """flash-attn's flash_attn_func if the package imports (it needs CUDA), else None. Looked up once."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or installed but built for another torch/CUDA: either way unusable
        return None
    return flash_attn_func


def flash_attn_available() -> bool:
    return _flash_attn_func() is not None


def flex_attention_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# The KV cache: keys and values of every layer for B rows that all sit at the same position. The model
# writes layer i's new keys/values through attention() and advances the position once, after the last layer.


class KVCache:
    """Keys and values of all layers for inference, preallocated to `max_len` tokens.

    keys, values: (n_layer, B, max_len, H_kv, D) in the compute dtype.
    position: how many tokens are already cached (the same for every row; the next token's position).
    prev_embedding: (B, 1, C) normalized embedding of the last token seen, which the model's "smear" mixes
        into the next token (None before the first token).
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        # Uninitialised on purpose: attention only ever reads positions below `position`, which were written
        # first, and not zero-filling a large cache keeps the time to the first token short.
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.position = 0
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def replicate(cls, source: KVCache, batch_size: int, max_len: int) -> KVCache:
        """A cache of `batch_size` rows and room for `max_len` tokens whose every row continues `source`'s single
        row: its cached tokens and smear state are copied. Inference prefills a prompt once at batch 1, then
        decodes many samples from it."""
        if source.batch_size != 1:
            raise ValueError(f"replicate: the source cache must have 1 row, it has {source.batch_size}")
        if max_len < source.position:
            raise ValueError(f"replicate: max_len {max_len} < the {source.position} tokens already cached")
        n_layer, _, _, n_kv_head, head_dim = source.keys.shape
        cache = cls(n_layer=n_layer, batch_size=batch_size, max_len=max_len, n_kv_head=n_kv_head,
                    head_dim=head_dim, device=source.keys.device, dtype=source.keys.dtype)  # fmt: skip
        used = source.position
        cache.keys[:, :, :used] = source.keys[:, :, :used]  # broadcast over the rows
        cache.values[:, :, :used] = source.values[:, :, :used]
        cache.position = used
        if source.prev_embedding is not None:
            cache.prev_embedding = source.prev_embedding.expand(batch_size, -1, -1).clone()
        return cache

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (1-D indices, in that order), e.g. to stop computing samples that have finished.
        Only the cached prefix is copied."""
        used = self.position
        n_layer, _, max_len, n_kv_head, head_dim = self.keys.shape
        shape = (n_layer, rows.numel(), max_len, n_kv_head, head_dim)
        keys = torch.empty(shape, device=self.keys.device, dtype=self.keys.dtype)
        values = torch.empty(shape, device=self.keys.device, dtype=self.keys.dtype)
        keys[:, :, :used] = self.keys[:, rows, :used]
        values[:, :, :used] = self.values[:, rows, :used]
        self.keys, self.values = keys, values
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[rows]

    @property
    def max_len(self) -> int:
        return self.keys.size(2)

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, max_len, H_kv, D) of one layer's keys and values; attention() writes into them."""
        return self.keys[index], self.values[index]

    def check_room(self, num_tokens: int) -> None:
        if self.position + num_tokens > self.max_len:
            raise ValueError(
                f"KV cache full: {self.position} cached + {num_tokens} new tokens > max_len {self.max_len}"
            )

    def advance(self, num_tokens: int) -> None:
        self.check_room(num_tokens)
        self.position += num_tokens

    def reset(self) -> None:
        self.position = 0
        self.prev_embedding = None


# ----------------------------------------------------------------------------------------------------------
# The slot cache: rows that sit at DIFFERENT positions, for continuous batching (a server decodes many requests
# in one forward; requests join and leave between steps). Each request is prefilled alone into an ordinary
# KVCache, then copied into a free row here. The rows in use are always 0 .. num_rows - 1: a leaving row is
# replaced by the last one (one row copied, like a list's swap-remove), so a forward runs on exactly the rows in
# use, through plain views of the cache, with no gather.


@dataclass(frozen=True)
class RowPositions:
    """The cache positions of a batch whose rows sit at different lengths (what SlotKVCache.position gives).

    first: (B,) long tensor on the device, the position of each row's first new token.
    lowest, highest: min and max of `first`, kept on the host so that slicing needs no device sync.
    """

    first: torch.Tensor
    lowest: int
    highest: int


class SlotKVCache:
    """Keys and values for up to `capacity` rows, each at its own length (continuous batching).

    The model uses it like a KVCache: layer(i) gives views of the rows in use, `position` is a RowPositions
    (attention() then writes each row's new keys at that row's own position and masks each row's keys to its own
    causal window), `prev_embedding` holds each row's last embedding for the smear, advance() moves every row.
    Zero-filled on purpose: a row's keys past its length are stale or unused, and masked; masked keys must still
    be finite numbers, because softmax weight 0 times NaN would still be NaN.
    """

    def __init__(
        self,
        *,
        n_layer: int,
        capacity: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        embedding_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (n_layer, capacity, max_len, n_kv_head, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self._prev_embedding = torch.zeros(capacity, 1, embedding_dim, device=device, dtype=dtype)
        self.lengths: list[int] = []  # tokens cached per row in use (host copy: no device syncs)
        self._lengths = torch.zeros(capacity, dtype=torch.long, device=device)  # the same, on the device

    @property
    def capacity(self) -> int:
        return self.keys.size(1)

    @property
    def max_len(self) -> int:
        return self.keys.size(2)

    @property
    def batch_size(self) -> int:
        """The rows in use (a forward must feed exactly this many rows)."""
        return len(self.lengths)

    @property
    def position(self) -> RowPositions:
        rows = self.batch_size
        if rows == 0:
            raise ValueError("SlotKVCache: no rows in use")
        return RowPositions(self._lengths[:rows], min(self.lengths), max(self.lengths))

    @property
    def prev_embedding(self) -> torch.Tensor:
        return self._prev_embedding[: self.batch_size]

    @prev_embedding.setter
    def prev_embedding(self, value: torch.Tensor) -> None:
        self._prev_embedding[: self.batch_size] = value

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batch_size
        return self.keys[index, :rows], self.values[index, :rows]

    def check_room(self, num_tokens: int) -> None:
        if self.lengths and max(self.lengths) + num_tokens > self.max_len:
            raise ValueError(f"SlotKVCache full: a row of {max(self.lengths)} + {num_tokens} tokens > {self.max_len}")

    def advance(self, num_tokens: int) -> None:
        self.check_room(num_tokens)
        self.lengths = [length + num_tokens for length in self.lengths]
        self._lengths[: self.batch_size] += num_tokens

    def add_row(self, source: KVCache) -> int:
        """Copy a prefilled 1-row KVCache into the next free row; returns that row's index."""
        if source.batch_size != 1:
            raise ValueError(f"add_row: the source cache must have 1 row, it has {source.batch_size}")
        if self.batch_size == self.capacity:
            raise ValueError(f"add_row: all {self.capacity} rows are in use")
        used = source.position
        if used > self.max_len:
            raise ValueError(f"add_row: {used} cached tokens do not fit rows of {self.max_len}")
        row = self.batch_size
        self.keys[:, row, :used] = source.keys[:, 0, :used]
        self.values[:, row, :used] = source.values[:, 0, :used]
        if source.prev_embedding is not None:
            self._prev_embedding[row] = source.prev_embedding[0]
        self._lengths[row] = used
        self.lengths.append(used)
        return row

    def remove_rows(self, rows: list[int]) -> list[int]:
        """Stop using `rows`. Each removed row is refilled by the current last row (only its cached prefix is
        copied). Returns, for every remaining row in its new order, the index it had before, so callers can
        reorder whatever they keep per row (e.g. `state = [state[i] for i in order]`)."""
        order = list(range(self.batch_size))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                used = self.lengths[last]
                self.keys[:, row, :used] = self.keys[:, last, :used]
                self.values[:, row, :used] = self.values[:, last, :used]
                self._prev_embedding[row] = self._prev_embedding[last]
                self._lengths[row] = used
                self.lengths[row] = used
                order[row] = order[last]
            order.pop()
            self.lengths.pop()
        return order


# ----------------------------------------------------------------------------------------------------------
# The entry point.


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    key_cache: torch.Tensor | None = None,
    value_cache: torch.Tensor | None = None,
    cache_position: int | RowPositions = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention. Returns (B, T, H, D).

    q: (B, T, H, D); k, v: (B, T, H_kv, D) for the T new tokens.
    window: the query at position i sees keys at positions i - window .. i (see the module docstring).
    key_cache, value_cache: one layer's cache, (B, max_len, H_kv, D), or None for a training call. When given,
        k and v are written at cache_position .. cache_position + T - 1 and the queries attend over
        cache[:, : cache_position + T]. The caller advances the position afterwards.
    cache_position: a RowPositions (from a SlotKVCache) when the rows sit at different positions: each row's
        keys are written at its own position and a per-row mask keeps each query to its own window (SDPA).
    backend: override the module-wide choice ("auto", "sdpa", "flex", "flash") for this call.
    The softmax scale is the usual 1/sqrt(D).
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if isinstance(cache_position, RowPositions):
        return _attention_per_row(q, k, v, window, key_cache, value_cache, cache_position)
    num_new = q.size(1)
    if key_cache is not None:
        end = cache_position + num_new
        if end > key_cache.size(1):
            raise ValueError(f"KV cache overflow: position {cache_position} + {num_new} > {key_cache.size(1)}")
        key_cache[:, cache_position:end] = k
        value_cache[:, cache_position:end] = v
        k, v = key_cache[:, :end], value_cache[:, :end]

    name = _choose_backend(q, window, cached=key_cache is not None, requested=backend or _backend)
    if name == "flash":
        return _flash(q, k, v, window)
    if name == "flex":
        return _flex(q, k, v, window)
    return _sdpa(q, k, v, window)


def _choose_backend(q: torch.Tensor, window: int, *, cached: bool, requested: str) -> str:
    if requested not in BACKENDS:
        raise PicochatError(f"attention backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    half_precision = q.dtype in (torch.bfloat16, torch.float16)
    if requested == "flash":
        if not (flash_attn_available() and q.is_cuda and half_precision):
            raise PicochatError(
                "attention backend 'flash' needs the flash-attn package, a CUDA device and bf16/fp16 "
                "(use 'auto' or 'sdpa')"
            )
        return "flash"
    if requested == "flex":
        if not flex_attention_available():
            raise PicochatError("attention backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        # Cached calls change length every step: a compiled flex kernel per length is not worth it.
        return "sdpa" if cached else "flex"
    if requested == "sdpa":
        return "sdpa"
    # auto
    if q.is_cuda and half_precision and flash_attn_available():
        return "flash"
    window_binds = window < q.size(1) - 1
    if q.is_cuda and not cached and window_binds and flex_attention_available():
        return "flex"
    return "sdpa"


def sliding_window_causal_mask(
    num_queries: int, num_keys: int, window: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean (num_queries, num_keys) mask, True = may attend. The queries are the LAST num_queries
    positions of the num_keys (so query r sits at absolute position num_keys - num_queries + r)."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device).unsqueeze(1)
    key_pos = torch.arange(num_keys, device=device).unsqueeze(0)
    distance = query_pos - key_pos
    return (distance >= 0) & (distance <= window)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    num_queries, num_keys = q.size(1), k.size(1)
    mask = None
    is_causal = False
    if num_queries == 1:
        # Decode: the single query is the last position, so causality is automatic; the window just means
        # "only the last window + 1 keys", a slice (no mask, so the fused kernels stay usable).
        start = max(0, num_keys - 1 - window)
        k, v = k[:, start:], v[:, start:]
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # PyTorch's CPU kernel is slow for one bf16/fp16 query (3-8x slower than this at d4-d6 shapes):
            # upcast the query and the window of keys/values, attend in fp32 (also the more accurate), cast back.
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2).float(),
                k.transpose(1, 2).float(),
                v.transpose(1, 2).float(),
                enable_gqa=q.size(2) != k.size(2),
            )
            return y.transpose(1, 2).to(q.dtype)
    elif num_queries == num_keys and window >= num_keys - 1:
        # Plain causal attention (training, or a prefill into an empty cache): the fast path, no mask.
        is_causal = True
    elif num_queries == num_keys and _blocks_pay(num_queries, window):
        return _sdpa_in_blocks(q, k, v, window)
    else:
        # A binding window, or a chunk after cached tokens (SDPA's is_causal aligns top-left, which is wrong
        # when there are more keys than queries): an explicit mask.
        mask = sliding_window_causal_mask(num_queries, num_keys, window, device=q.device)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def _blocks_pay(num_tokens: int, window: int) -> bool:
    """Whether _sdpa_in_blocks applies and is cheaper: blocks of `window` queries that tile the sequence, each
    reading 2 x window keys, against the T keys per query that a masked SDPA call computes."""
    return 0 < window and num_tokens % window == 0 and 2 * window < num_tokens


def _sdpa_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """A short window over a whole sequence (training, prefill into an empty cache), without the T x T work.

    A masked SDPA call computes every query against every key and throws away what the mask hides: at T = 512
    and window 128 (the cpu preset's short layers) that is twice the work of causal attention, and the kernels
    cannot skip masked blocks. Here the T queries are cut into blocks of W = window; block b (positions bW ..
    bW + W - 1) can only see keys bW - W .. bW + W - 1, so each block attends over those 2W keys with one
    (W, 2W) mask that is the same for every block (the first block's keys before position 0 are zero padding,
    masked out). All blocks go through SDPA as one batch. Same result as the masked call, up to rounding."""
    B, T, H, D = q.shape
    H_kv, blocks = k.size(2), T // window
    # Keys/values padded with W zeros in front: block b's keys are padded positions bW .. bW + 2W - 1.
    padded_k = F.pad(k, (0, 0, 0, 0, window, 0))
    padded_v = F.pad(v, (0, 0, 0, 0, window, 0))
    block_k = padded_k.unfold(1, 2 * window, window)  # (B, blocks, H_kv, D, 2W): a view, no copy yet
    block_v = padded_v.unfold(1, 2 * window, window)
    to_sdpa = lambda x, length: x.permute(0, 1, 2, 4, 3).reshape(B * blocks, -1, length, D)  # noqa: E731
    query = q.reshape(B, blocks, window, H, D).permute(0, 1, 3, 2, 4).reshape(B * blocks, H, window, D)
    # Query r of a block sits at padded key position W + r: it sees keys c with 0 <= W + r - c <= window.
    rows = torch.arange(window, device=q.device).unsqueeze(1)
    columns = torch.arange(2 * window, device=q.device).unsqueeze(0)
    distance = window + rows - columns
    mask = ((distance >= 0) & (distance <= window)).expand(blocks, 1, window, 2 * window).clone()
    mask[0, :, :, :window] = False  # the first block's padding
    mask = mask.unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(B * blocks, 1, window, 2 * window)
    y = F.scaled_dot_product_attention(
        query, to_sdpa(block_k, 2 * window), to_sdpa(block_v, 2 * window), attn_mask=mask, enable_gqa=H != H_kv
    )
    return y.reshape(B, blocks, H, window, D).permute(0, 1, 3, 2, 4).reshape(B, T, H, D)


def _attention_per_row(q, k, v, window: int, key_cache, value_cache, rows: RowPositions) -> torch.Tensor:
    """Rows at different positions: row b's T new tokens sit at rows.first[b] + 0 .. T-1. Keys are read over
    the span every row needs, [lowest - window, highest + T), and a (B, T, keys) mask keeps each query to
    0 <= query position - key position <= window, which also hides other rows' longer (or stale) tail."""
    B, T = q.shape[:2]
    query_positions = rows.first.unsqueeze(1) + torch.arange(T, device=q.device)  # (B, T)
    if rows.highest + T > key_cache.size(1):
        raise ValueError(f"KV cache overflow: position {rows.highest} + {T} > {key_cache.size(1)}")
    batch_index = torch.arange(B, device=q.device).unsqueeze(1).expand(B, T)
    key_cache[batch_index, query_positions] = k
    value_cache[batch_index, query_positions] = v
    start, end = max(0, rows.lowest - window), rows.highest + T
    distance = query_positions.unsqueeze(2) - torch.arange(start, end, device=q.device)  # (B, T, keys)
    mask = ((distance >= 0) & (distance <= window)).unsqueeze(1)  # (B, 1, T, keys): the same for every head
    keys, values = key_cache[:, start:end], value_cache[:, start:end]
    # On CPU attend in fp32, as the single-row decode does (faster there for bf16, and more accurate).
    upcast = q.device.type == "cpu" and q.dtype != torch.float32
    compute = (lambda t: t.transpose(1, 2).float()) if upcast else (lambda t: t.transpose(1, 2))
    y = F.scaled_dot_product_attention(
        compute(q), compute(keys), compute(values), attn_mask=mask, enable_gqa=q.size(2) != keys.size(2)
    )
    return y.transpose(1, 2).to(q.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    # flash-attn takes (B, T, H, D), handles H_kv < H itself and aligns its causal mask bottom-right, so the
    # same call serves training, prefill-after-cache and decode. (-1, 0) means "no limit on the left".
    left = window if window < k.size(1) - 1 else -1
    return _flash_attn_func()(q, k, v, causal=True, window_size=(left, 0))


@functools.cache
def _compiled_flex_attention():
    # FlexAttention only becomes a fused kernel under torch.compile; uncompiled it is a slow reference
    # implementation (still correct, which is what the CPU tests use).
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, backend=compile_backend())


def _flex_block_mask(num_tokens: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window_causal(batch, head, query_index, key_index):
        distance = query_index - key_index
        return (distance >= 0) & (distance <= window)

    return create_block_mask(sliding_window_causal, None, None, num_tokens, num_tokens, device=device)


# Eagerly the block mask is built once per (length, window, device) and reused by every layer and step.
_cached_flex_block_mask = functools.lru_cache(maxsize=32)(_flex_block_mask)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    num_tokens = q.size(1)
    if torch.compiler.is_compiling():
        # Inside a compiled model: let the compiler trace the mask construction and the kernel itself.
        kernel, block_mask = flex_attention, _flex_block_mask(num_tokens, window, str(q.device))
    else:
        kernel = _compiled_flex_attention() if q.is_cuda else flex_attention
        block_mask = _cached_flex_block_mask(num_tokens, window, str(q.device))
    y = kernel(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=1.0 / math.sqrt(q.size(-1)),
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)
