"""A Llama-family decoder in NumPy (float32), whose linear layers can be swapped out.

Every linear layer is an object with forward(x [T, d_in] float32) -> [T, d_out]; by default a
DenseLinear over the reference weights, or a DecLinear (or anything else) passed in `linears`.
Layout follows Hugging Face: weights are [d_out, d_in], wq/wk rows are in rotate-half RoPE order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# Optional additive biases (Qwen2 has them on q, k, v); applied after the linear layer's forward
# so that a replacement linear (DecLinear) needs no bias support of its own.
BIAS_NAMES = {"wq": "bq", "wk": "bk", "wv": "bv"}

Hook = Callable[[int, str, np.ndarray], None]


@dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    max_seq_len: int
    bos_id: int | None = None
    eos_id: int | None = None
    # Llama-3.1-style frequency rescaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None
    # Mistral-style attention window (a query at i sees keys j with i - j < sliding_window).
    sliding_window: int | None = None
    attn_bias: bool = False

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("norm_eps and rope_theta must be positive")


@dataclass
class LlamaWeights:
    config: LlamaConfig
    tok_embeddings: np.ndarray          # float32 [V, D]
    layers: list                        # dicts: attn_norm, ffn_norm [D]; LINEAR_NAMES [d_out, d_in]
    norm: np.ndarray                    # float32 [D]
    lm_head: np.ndarray                 # float32 [V, D]; the same array as tok_embeddings if tied

    def linear_shape(self, name: str) -> tuple:
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
                "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim),
                "w_down": (c.dim, c.ffn_dim)}[name]

    def validate(self, replaced=frozenset()) -> None:
        """Raise ValueError naming the first array whose shape or dtype disagrees with config.

        replaced: (layer_index, name) pairs served by another linear object; their weight
        entries may be absent or None (e.g. a quantized model that keeps no float matrix).
        """
        c = self.config
        c.validate()

        def check(label, arr, shape):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                raise ValueError(f"{label} must be a float32 ndarray, got "
                                 f"{getattr(arr, 'dtype', type(arr).__name__)}")
            if arr.shape != tuple(shape):
                raise ValueError(f"{label} has shape {arr.shape}, expected {tuple(shape)}")

        check("tok_embeddings", self.tok_embeddings, (c.vocab_size, c.dim))
        check("norm", self.norm, (c.dim,))
        check("lm_head", self.lm_head, (c.vocab_size, c.dim))
        if len(self.layers) != c.n_layers:
            raise ValueError(f"{len(self.layers)} layers given, config says {c.n_layers}")
        for i, layer in enumerate(self.layers):
            check(f"layers[{i}]['attn_norm']", layer.get("attn_norm"), (c.dim,))
            check(f"layers[{i}]['ffn_norm']", layer.get("ffn_norm"), (c.dim,))
            for name in LINEAR_NAMES:
                if (i, name) in replaced and layer.get(name) is None:
                    continue
                check(f"layers[{i}][{name!r}]", layer.get(name), self.linear_shape(name))
            if c.attn_bias:
                for name, bias in BIAS_NAMES.items():
                    check(f"layers[{i}][{bias!r}]", layer.get(bias), (self.linear_shape(name)[0],))


def _matmul_wt(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [T, d_in] @ weight[d_out, d_in].T. A single row goes through W @ x (BLAS gemv): OpenBLAS
    runs the 1-row gemm with a transposed operand ~10x slower, and decode is all single rows."""
    if x.ndim == 2 and x.shape[0] == 1:
        return (weight @ x[0])[None, :]
    return x @ weight.T


class DenseLinear:
    """y = x @ W.T in float32; W [d_out, d_in] is kept as given (BLAS reads it transposed)."""

    def __init__(self, weight: np.ndarray):
        weight = np.asarray(weight)
        if weight.ndim != 2:
            raise ValueError(f"DenseLinear weight must be 2-D, got shape {weight.shape}")
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"DenseLinear expects last dim {self.in_features}, got {x.shape}")
        return _matmul_wt(x, self.weight)

    __call__ = forward


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated to max_len."""

    def __init__(self, config: LlamaConfig, max_len: int):
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.max_len = int(max_len)
        shape = (config.n_layers, config.n_kv_heads, self.max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.length = 0

    def reset(self) -> None:
        self.length = 0


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Per-pair inverse frequencies (float64) [head_dim/2], Llama-3.1-rescaled if configured."""
    half = config.head_dim // 2
    exponents = np.arange(half, dtype=np.float64) * 2 / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    rs = config.rope_scaling
    if rs:
        # Same arithmetic as transformers' _compute_llama3_parameters.
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # float32 like the HF reference (which upcasts half inputs to float32 here).
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), written to avoid overflow warnings for very negative x.
    return x / (1.0 + np.exp(-np.clip(x, -88.0, 88.0)))



def rope_tables(inv_freq: np.ndarray, n: int):
    """(cos, sin) float32 [n, head_dim/2] for positions 0..n-1."""
    # Angles in float64 then cast: position * inv_freq loses digits in float32 far out.
    angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def attention_mask(config: LlamaConfig, start: int, end: int) -> np.ndarray:
    """Additive causal mask [end - start, end]: query t (absolute start+t) sees keys j <= start+t
    (and, with a sliding window, only the last sliding_window of them)."""
    q_pos = np.arange(start, end)[:, None]
    k_pos = np.arange(end)[None, :]
    visible = k_pos <= q_pos
    if config.sliding_window is not None:
        visible &= (q_pos - k_pos) < config.sliding_window
    return np.where(visible, np.float32(0.0), np.float32(-np.inf))


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x [H, T, hd]; rotate-half form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:] = x2 * cos + x1 * sin
    return out


def block_forward(c: LlamaConfig, i: int, layer: dict, linears: Mapping, h: np.ndarray,
                  cos: np.ndarray, sin: np.ndarray, mask: np.ndarray, hook: Hook | None = None,
                  cache: "KVCache | None" = None, start: int = 0, end: int | None = None) -> np.ndarray:
    """Decoder block i on the residual stream h [T, D]; returns the new h.

    layer: the block's norms (and biases); linears: {(i, name): object with forward(x)}. The one
    block computation shared by LlamaModel.forward and the block-by-block streaming quantizer
    (decdec.stream), so that both see bit-identical activations.
    """
    T = h.shape[0]
    end = start + T if end is None else end
    H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    group = H // Hkv
    scale = np.float32(1.0 / math.sqrt(hd))

    def linear(name, x):
        if hook is not None:
            hook(i, name, x)
        y = np.asarray(linears[(i, name)].forward(x), dtype=np.float32)
        bias_name = BIAS_NAMES.get(name)
        if c.attn_bias and bias_name is not None:
            y = y + layer[bias_name]
        return y

    x = _rms_norm(h, layer["attn_norm"], c.norm_eps)
    q = linear("wq", x).reshape(T, H, hd).transpose(1, 0, 2)
    k = linear("wk", x).reshape(T, Hkv, hd).transpose(1, 0, 2)
    v = linear("wv", x).reshape(T, Hkv, hd).transpose(1, 0, 2)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    if cache is not None:
        cache.k[i, :, start:end] = k
        cache.v[i, :, start:end] = v
        keys, values = cache.k[i, :, :end], cache.v[i, :, :end]
    else:
        keys, values = k, v
    # Grouped-query attention: the `group` query heads sharing a KV head are stacked
    # along the row axis, so one batched matmul per KV head does all of them.
    qg = q.reshape(Hkv, group * T, hd)
    scores = (qg @ keys.transpose(0, 2, 1)) * scale          # [Hkv, group*T, end]
    scores = scores.reshape(Hkv, group, T, end) + mask
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    attn = scores.reshape(Hkv, group * T, end) @ values      # [Hkv, group*T, hd]
    attn = attn.reshape(H, T, hd).transpose(1, 0, 2).reshape(T, H * hd)
    h = h + linear("wo", np.ascontiguousarray(attn))

    x = _rms_norm(h, layer["ffn_norm"], c.norm_eps)
    gate = linear("w_gate", x)
    up = linear("w_up", x)
    return h + linear("w_down", _silu(gate) * up)


class LlamaModel:
    """forward(tokens [T], cache=None, hook=None) -> logits float32 [T, V].

    With a cache, the tokens continue the cached sequence (positions cache.length ...) and the
    cache advances by T. Prefill then one-token decode gives the same logits as one full pass.
    """

    def __init__(self, weights: LlamaWeights, linears: Mapping | None = None):
        self.weights = weights
        self.config = c = weights.config
        self.linears = {}
        given = dict(linears or {})
        weights.validate(replaced=frozenset(given))
        for key in given:
            if (not isinstance(key, tuple) or len(key) != 2 or key[1] not in LINEAR_NAMES
                    or not 0 <= key[0] < c.n_layers):
                raise ValueError(f"bad linears key {key!r}: expected (layer_index, name) with "
                                 f"layer_index < {c.n_layers} and name in {LINEAR_NAMES}")
            if not callable(getattr(given[key], "forward", None)):
                raise TypeError(f"linears[{key!r}] has no forward(x) method")
            # Objects that declare their sizes (DenseLinear, DecLinear) must fit the slot.
            want_out, want_in = weights.linear_shape(key[1])
            got = (getattr(given[key], "out_features", want_out),
                   getattr(given[key], "in_features", want_in))
            if got != (want_out, want_in):
                raise ValueError(f"linears[{key!r}] is {got[0]}x{got[1]} (out x in), the model "
                                 f"needs {want_out}x{want_in}")
        for i, layer in enumerate(weights.layers):
            for name in LINEAR_NAMES:
                lin = given.get((i, name))
                self.linears[(i, name)] = DenseLinear(layer[name]) if lin is None else lin
        self._inv_freq = rope_inv_freq(c)
        self._rope_cache_len = 0
        self._cos = self._sin = None

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len or self.config.max_seq_len)

    # ------------------------------------------------------------------ pieces
    def _rope_tables(self, end: int):
        if end > self._rope_cache_len:
            n = max(end, 2 * self._rope_cache_len, 256)
            self._cos, self._sin = rope_tables(self._inv_freq, n)
            self._rope_cache_len = n
        return self._cos, self._sin

    # ------------------------------------------------------------------ forward
    def forward(self, tokens, cache: KVCache | None = None, hook: Hook | None = None) -> np.ndarray:
        c = self.config
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a non-empty 1-D integer array, got shape "
                             f"{tokens.shape} dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        T = tokens.shape[0]
        start = cache.length if cache is not None else 0
        end = start + T
        if cache is not None and end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} used + {T} new "
                             f"tokens do not fit")
        if cache is not None and (cache.k.shape[0] != c.n_layers or cache.k.shape[1] != c.n_kv_heads
                                  or cache.k.shape[3] != c.head_dim):
            raise ValueError("KV cache was made for a different model configuration")

        cos_all, sin_all = self._rope_tables(end)
        cos, sin = cos_all[start:end], sin_all[start:end]          # [T, hd/2]

        mask = attention_mask(c, start, end)

        h = self.weights.tok_embeddings[tokens]                     # [T, D] (a copy)
        for i, layer in enumerate(self.weights.layers):
            h = block_forward(c, i, layer, self.linears, h, cos, sin, mask, hook, cache, start, end)

        if cache is not None:
            cache.length = end
        h = _rms_norm(h, self.weights.norm, c.norm_eps)
        return _matmul_wt(h, self.weights.lm_head)

    __call__ = forward
