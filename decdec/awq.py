"""Activation-aware weight quantization (AWQ-style), group-wise asymmetric, 3 or 4 bits.

What AWQ does (Lin et al., 2023), and how decdec does it:

1. Per-input-channel scale search. Input channels that carry large activations matter more, so the
   weight columns of those channels are multiplied by s_j > 1 before rounding (their relative rounding
   error shrinks) and the activation is divided by s_j (the product is unchanged). s = mean|x|^alpha,
   normalised so that sqrt(max(s) * min(s)) = 1, alpha taken from a grid by the smallest output error
   of the quantized layer(s) on calibration activations. alpha = 0 is plain RTN, so the search never
   does worse than RTN on its own objective.
2. Folding. The division by s is folded into the operation that produces the input, so the quantized
   model costs nothing extra at run time:
      attn_norm (RMSNorm weight)  -> wq, wk, wv        ffn_norm -> w_gate, w_up
      wv (output rows)            -> wo                w_up (output rows) -> w_down
   With grouped-query attention a value channel feeds several query heads, so wo's scale is tied
   across the heads that share one key/value head (the scale search runs over those tied scales).
   Folding is exact in real arithmetic; the folded float model is the reference the residuals and
   thresholds are computed against (the layer sees x / s, not x).
3. Clipping search. Per (output row, group) the quantization range [min, max] is shrunk by a ratio in
   [0.5, 1] picked by the smallest output error of that group on calibration activations. As in the
   AWQ reference, q and k are not clipped (their errors are magnified by the attention softmax).

Output error uses second moments only: for weights W, quantized W_q (in the same basis) and inputs x,
sum_t |(W - W_q) x_t|^2 = sum_o dW_o H dW_o^T with H = sum_t x_t x_t^T. So calibration keeps one Gram
matrix per layer input (accumulated over every calibration token) instead of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Which layer input feeds which linear layers (the folding groups).
INPUT_KINDS = ("attn_in", "o_in", "ffn_in", "down_in")
LINEARS_OF_INPUT = {
    "attn_in": ("wq", "wk", "wv"),
    "o_in": ("wo",),
    "ffn_in": ("w_gate", "w_up"),
    "down_in": ("w_down",),
}
INPUT_OF_LINEAR = {name: kind for kind, names in LINEARS_OF_INPUT.items() for name in names}

DEFAULT_ALPHA_GRID = tuple(np.round(np.arange(0.0, 1.0, 0.05), 2))
DEFAULT_CLIP_GRID = tuple(np.round(1.0 - 0.025 * np.arange(21), 3))  # 1.0 .. 0.5
NO_CLIP_LINEARS = ("wq", "wk")


def _d_in_pad(d_in: int) -> int:
    return -(-d_in // 128) * 128


def group_params(W: np.ndarray, bits: int, group_size: int, clip: np.ndarray | float = 1.0):
    """fp16 (scales, zeros) [d_out, n_groups] of asymmetric group quantization of W [d_out, d_in].

    Each (row, group) maps [clip * min, clip * max] of its real (unpadded) weights onto 0..2^bits-1;
    the zero point is fractional so that clip * min is exactly code 0 (decdec.h allows it). Groups
    that lie wholly in the padding get scale 1, zero 0. clip is a scalar or [d_out, n_groups].
    """
    W = np.asarray(W, dtype=np.float32)
    d_out, d_in = W.shape
    pad = _d_in_pad(d_in)
    if pad % group_size:
        raise ValueError(f"group_size {group_size} does not divide the padded width {pad}")
    n_groups = pad // group_size
    Wp = np.full((d_out, pad), np.nan, dtype=np.float32)
    Wp[:, :d_in] = W
    Wg = Wp.reshape(d_out, n_groups, group_size)
    empty = np.all(np.isnan(Wg), axis=2)
    with np.errstate(all="ignore"):
        mx = np.where(empty, 0.0, np.nanmax(np.where(np.isnan(Wg), -np.inf, Wg), axis=2))
        mn = np.where(empty, 0.0, np.nanmin(np.where(np.isnan(Wg), np.inf, Wg), axis=2))
    # The range must contain 0 only if the data does: keep min <= max after clipping.
    mx = mx * clip
    mn = mn * clip
    qmax = (1 << bits) - 1
    scales = (mx - mn) / qmax
    # A constant group (max == min) still needs a usable scale: any positive value reproduces it.
    tiny = np.maximum(np.abs(mx), 1e-6) / qmax
    scales = np.where(scales > 0, scales, tiny)
    scales = np.where(empty, 1.0, scales)
    scales16 = scales.astype(np.float16)
    # fp16 could round a tiny scale to 0 (or overflow): refuse rather than produce Inf/NaN codes.
    if not np.all(np.isfinite(scales16)) or np.any(scales16 == 0):
        raise ValueError("weights out of the fp16 range of group scales")
    zeros16 = np.where(empty, 0.0, -mn / scales16.astype(np.float32)).astype(np.float16)
    return scales16, zeros16


def fake_quantize(W: np.ndarray, bits: int, group_size: int, clip: np.ndarray | float = 1.0):
    """Quantize-dequantize W with group_params (the same arithmetic as QuantizedWeight.dequantize)."""
    W = np.asarray(W, dtype=np.float32)
    scales, zeros = group_params(W, bits, group_size, clip)
    return dequantize_with(W, scales, zeros, bits, group_size)


def dequantize_with(W, scales, zeros, bits, group_size):
    d_out, d_in = W.shape
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)[:, :d_in]
    z = np.repeat(zeros.astype(np.float32), group_size, axis=1)[:, :d_in]
    q = np.clip(np.rint(W / s + z), 0, (1 << bits) - 1)
    return (s * (q - z)).astype(np.float32)


def output_error(dW: np.ndarray, gram: np.ndarray) -> float:
    """sum_t |dW x_t|^2 = sum_o dW_o H dW_o^T for H = sum_t x_t x_t^T."""
    dW = np.asarray(dW, dtype=np.float32)
    return float(np.einsum("oi,oi->", dW @ gram.astype(np.float32), dW, dtype=np.float64))


def normalised_scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha scaled so that sqrt(max * min) = 1 (AWQ's normalisation)."""
    s = np.maximum(np.asarray(abs_mean, dtype=np.float64), 1e-8) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return s


def search_scale(weights: list[np.ndarray], gram: np.ndarray, abs_mean: np.ndarray, bits: int,
                 group_size: int, alpha_grid=DEFAULT_ALPHA_GRID, expand=None):
    """Best per-input-channel scale for linear layers sharing one input.

    weights: the linears' W [d_out_i, d_in] in the current basis; gram [d_in, d_in] and abs_mean [d_in]
    of their input. expand (optional) maps a vector of free scales to the d_in scales (tied scales for
    GQA); abs_mean then has the length of the free vector. Returns (scales [d_in] float32, alpha, errors
    per alpha). The error of alpha is that of all the linears together, measured in the original basis:
    W - Q(W s) / s.
    """
    W_all = np.concatenate([np.asarray(w, dtype=np.float32) for w in weights], axis=0)
    errors = []
    best = (np.inf, None, None)
    for alpha in alpha_grid:
        s_free = normalised_scales(abs_mean, alpha)
        s = (expand(s_free) if expand is not None else s_free).astype(np.float32)
        Wq = fake_quantize(W_all * s[None, :], bits, group_size) / s[None, :]
        err = output_error(W_all - Wq, gram)
        errors.append(err)
        if err < best[0]:
            best = (err, s, float(alpha))
    return best[1], best[2], errors


def search_clip(W: np.ndarray, gram: np.ndarray, bits: int, group_size: int,
                clip_grid=DEFAULT_CLIP_GRID) -> np.ndarray:
    """Per-(row, group) clip ratio minimising each group's own output error sum_t (dW_g . x_g,t)^2.

    Only the diagonal group blocks of the Gram matrix enter (cross-group terms are ignored, as in the
    AWQ reference). Returns clip [d_out, n_groups] float32.
    """
    W = np.asarray(W, dtype=np.float32)
    d_out, d_in = W.shape
    pad = _d_in_pad(d_in)
    n_groups = pad // group_size
    gram_p = np.zeros((pad, pad), dtype=np.float32)
    gram_p[:d_in, :d_in] = gram
    # [G, g, g] diagonal blocks
    blocks = np.stack([gram_p[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                       for g in range(n_groups)])
    Wp = np.zeros((d_out, pad), dtype=np.float32)
    Wp[:, :d_in] = W
    best_err = np.full((d_out, n_groups), np.inf)
    best_clip = np.ones((d_out, n_groups), dtype=np.float32)
    for ratio in clip_grid:
        Wq = np.zeros_like(Wp)
        Wq[:, :d_in] = fake_quantize(W, bits, group_size, clip=np.float32(ratio))
        # [G, O, g], contiguous so that the batched matmul takes the BLAS path
        dW = np.ascontiguousarray((Wp - Wq).reshape(d_out, n_groups, group_size).transpose(1, 0, 2))
        err = np.einsum("gok,gok->og", np.matmul(dW, blocks), dW)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_clip = np.where(better, np.float32(ratio), best_clip)
    return best_clip


@dataclass
class LayerScales:
    """Per-input-channel AWQ scales of one decoder block (the layer input is x / scale)."""
    attn_in: np.ndarray   # [dim]      folded into attn_norm; wq/wk/wv columns multiplied
    o_in: np.ndarray      # [n_heads * head_dim] folded into wv rows (tied across a GQA group)
    ffn_in: np.ndarray    # [dim]      folded into ffn_norm; w_gate/w_up columns multiplied
    down_in: np.ndarray   # [ffn_dim]  folded into w_up rows; w_down columns multiplied
    alphas: dict = field(default_factory=dict)

    def of_input(self, kind: str) -> np.ndarray:
        return getattr(self, kind)

    @classmethod
    def identity(cls, config) -> "LayerScales":
        one = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
        return cls(one(config.dim), one(config.n_heads * config.head_dim), one(config.dim),
                   one(config.ffn_dim), {k: 0.0 for k in INPUT_KINDS})


def gqa_expand(config):
    """Map value-channel scales [n_kv_heads * head_dim] to wo's input [n_heads * head_dim]."""
    group = config.n_heads // config.n_kv_heads
    hd = config.head_dim

    def expand(s_v):
        return np.repeat(np.asarray(s_v).reshape(config.n_kv_heads, 1, hd), group, axis=1).reshape(-1)

    def reduce(v):  # average over the query heads sharing one value head
        return np.asarray(v).reshape(config.n_kv_heads, group, hd).mean(axis=1).reshape(-1)

    return expand, reduce


def fold_layer(layer: dict, scales: LayerScales, config) -> dict:
    """The block's float weights with the scales folded in (a new dict; the input is not modified).

    Exact in real arithmetic: the block computes the same function.
    """
    expand, _ = gqa_expand(config)
    group = config.n_heads // config.n_kv_heads
    out = dict(layer)
    s_attn = scales.attn_in.astype(np.float32)
    s_ffn = scales.ffn_in.astype(np.float32)
    s_down = scales.down_in.astype(np.float32)
    s_o = scales.o_in.astype(np.float32)
    s_v = s_o.reshape(config.n_kv_heads, group, config.head_dim)[:, 0, :].reshape(-1)
    if not np.allclose(expand(s_v), s_o):
        raise ValueError("o_in scales must be tied across the query heads of one key/value head")
    out["attn_norm"] = (layer["attn_norm"] / s_attn).astype(np.float32)
    out["wq"] = (layer["wq"] * s_attn[None, :]).astype(np.float32)
    out["wk"] = (layer["wk"] * s_attn[None, :]).astype(np.float32)
    out["wv"] = (layer["wv"] * s_attn[None, :] / s_v[:, None]).astype(np.float32)
    if layer.get("bv") is not None:  # a v bias (Qwen2) is part of v's output: scaled with its row
        out["bv"] = (layer["bv"] / s_v).astype(np.float32)
    out["wo"] = (layer["wo"] * s_o[None, :]).astype(np.float32)
    out["ffn_norm"] = (layer["ffn_norm"] / s_ffn).astype(np.float32)
    out["w_gate"] = (layer["w_gate"] * s_ffn[None, :]).astype(np.float32)
    out["w_up"] = (layer["w_up"] * s_ffn[None, :] / s_down[:, None]).astype(np.float32)
    out["w_down"] = (layer["w_down"] * s_down[None, :]).astype(np.float32)
    return out


def scaled_gram(gram: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Gram matrix of x / s given that of x."""
    inv = 1.0 / np.asarray(s, dtype=np.float64)
    return gram * inv[:, None] * inv[None, :]


def search_layer_scales(layer: dict, stats: dict, config, bits: int, group_size: int,
                        alpha_grid=DEFAULT_ALPHA_GRID) -> LayerScales:
    """AWQ scales of one block from its calibration statistics.

    stats: {input kind: (gram [d, d] float64, abs_mean [d])} in the original (unfolded) basis.
    The v -> o search runs on wo alone (wv's rows are divided by the same scales, which only
    rescales its quantization groups row by row and leaves its relative error unchanged).
    """
    expand, reduce = gqa_expand(config)
    alphas = {}
    g, m = stats["attn_in"]
    s_attn, alphas["attn_in"], _ = search_scale([layer["wq"], layer["wk"], layer["wv"]], g, m, bits,
                                                group_size, alpha_grid)
    g, m = stats["o_in"]
    s_o, alphas["o_in"], _ = search_scale([layer["wo"]], g, reduce(m), bits, group_size, alpha_grid,
                                          expand=expand)
    g, m = stats["ffn_in"]
    s_ffn, alphas["ffn_in"], _ = search_scale([layer["w_gate"], layer["w_up"]], g, m, bits,
                                              group_size, alpha_grid)
    g, m = stats["down_in"]
    s_down, alphas["down_in"], _ = search_scale([layer["w_down"]], g, m, bits, group_size, alpha_grid)
    return LayerScales(s_attn, s_o, s_ffn, s_down, alphas)


def quantize_layer_params(folded: dict, stats: dict, scales: LayerScales, bits: int, group_size: int,
                          clip_search: bool = True, clip_grid=DEFAULT_CLIP_GRID) -> dict:
    """(scales, zeros) fp16 for every linear of a folded block, with the clipping search.

    Returns {name: (scales, zeros)} ready for decdec.quantize.quantize_with_params.
    """
    params = {}
    for kind, names in LINEARS_OF_INPUT.items():
        gram = scaled_gram(stats[kind][0], scales.of_input(kind))
        for name in names:
            W = folded[name]
            if clip_search and name not in NO_CLIP_LINEARS:
                clip = search_clip(W, gram, bits, group_size, clip_grid)
            else:
                clip = 1.0
            params[name] = group_params(W, bits, group_size, clip)
    return params
