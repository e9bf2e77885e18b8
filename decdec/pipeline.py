"""From float weights to a DecDEC model: calibrate, quantize (RTN or AWQ), build cheatsheets,
calibrate thresholds, choose 3.5-bit mixed precision, and assemble a LlamaModel of DecLinears.

Calibration protocol (stated once, used everywhere):
  * text: windows of CALIB_CONTEXT = 512 consecutive tokens of the calibration text (no BOS: as in
    AWQ's reference, windows are cut from running text), the first n_windows such windows.
  * AWQ statistics (Gram matrix and mean |x| of every linear layer's input) come from the float
    reference model.
  * Thresholds come from the float model too (as in the DecDEC paper: the full-precision model),
    in the basis each quantized layer actually sees: for AWQ the folded model, whose layer inputs are
    x / s. Every calibration token of every window contributes.
  * 3.5 bits: for each decoder block alone at 3 bits (all others float), the mean KL divergence of
    next-token distributions to the float model over the first `sensitivity_tokens` tokens of the
    first calibration window; the most sensitive half of the blocks get 4 bits.
Residuals R = W_folded - W_hat: the weights in the basis of the layer's input, so that
W_hat x' + R x' = W_folded x' = W x exactly for the input x' = x / s the layer receives.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import awq as _awq
from .awq import INPUT_KINDS, INPUT_OF_LINEAR, LINEARS_OF_INPUT, LayerScales

CALIB_CONTEXT = 512
DEFAULT_CALIB_WINDOWS = 16
METHODS = ("rtn", "awq")
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The first linear of each input group: its hook call carries the group's input.
_GROUP_LEADER = {names[0]: kind for kind, names in LINEARS_OF_INPUT.items()}


def _tqdm(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


def calibration_windows(tokens, n_windows: int = DEFAULT_CALIB_WINDOWS,
                        context: int = CALIB_CONTEXT) -> list[np.ndarray]:
    """The first n_windows non-overlapping windows of `context` tokens (ValueError if too short)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if n_windows < 1 or context < 2:
        raise ValueError(f"need n_windows >= 1 and context >= 2, got {n_windows}, {context}")
    if len(tokens) < n_windows * context:
        raise ValueError(f"calibration text has {len(tokens)} tokens, fewer than n_windows * context "
                         f"= {n_windows} * {context}")
    return [tokens[i * context:(i + 1) * context] for i in range(n_windows)]


# ----------------------------------------------------------------------------------- statistics
@dataclass
class CalibrationStats:
    """Second moments of every linear layer's input (original basis), from the float model."""
    grams: dict          # (layer, kind) -> float64 [d, d]  sum_t x x^T
    abs_sums: dict       # (layer, kind) -> float64 [d]     sum_t |x|
    n_tokens: int

    def layer(self, l: int) -> dict:
        return {k: (self.grams[(l, k)], self.abs_sums[(l, k)] / self.n_tokens) for k in INPUT_KINDS}


class GramCollector:
    """A forward hook accumulating, per (layer, input kind), sum_t x x^T and sum_t |x| (float64)
    in the order the hook sees the windows. Shared by the in-memory and the streaming pipeline so
    that both sum in one order and give bit-identical statistics."""

    def __init__(self):
        self.grams, self.abs_sums = {}, {}

    def __call__(self, l, name, x):
        kind = _GROUP_LEADER.get(name)
        if kind is None:
            return
        x = np.asarray(x, dtype=np.float32)
        g = (x.T @ x).astype(np.float64)
        a = np.abs(x).sum(axis=0, dtype=np.float64)
        if (l, kind) in self.grams:
            self.grams[(l, kind)] += g
            self.abs_sums[(l, kind)] += a
        else:
            self.grams[(l, kind)] = g
            self.abs_sums[(l, kind)] = a

    def stats(self, n_tokens: int) -> CalibrationStats:
        return CalibrationStats(self.grams, self.abs_sums, n_tokens)


def collect_gram_stats(model, windows, progress=True) -> CalibrationStats:
    hook = GramCollector()
    n = 0
    for w in _tqdm(windows, desc="calibration: activation statistics", disable=not progress):
        model.forward(w, hook=hook)
        n += len(w)
    return hook.stats(n)


class ThresholdCollector:
    """A forward hook feeding x / s to one ThresholdCalibrator per variant and (layer, input kind).

    scale_sets: {variant: {layer: LayerScales}} (a list indexed by layer works too)."""

    def __init__(self, scale_sets: dict):
        self.scale_sets = scale_sets
        self.cals = {v: {} for v in scale_sets}

    def __call__(self, l, name, x):
        from .calibrate import ThresholdCalibrator
        kind = _GROUP_LEADER.get(name)
        if kind is None:
            return
        x = np.asarray(x, dtype=np.float32)
        for v, per_layer in self.scale_sets.items():
            s = per_layer[l].of_input(kind)
            cal = self.cals[v].get((l, kind))
            if cal is None:
                cal = self.cals[v][(l, kind)] = ThresholdCalibrator(x.shape[1])
            cal.update(np.ascontiguousarray(x / s[None, :].astype(np.float32)))

    def thresholds(self) -> dict:
        return {v: {key: np.asarray(c.thresholds, dtype=np.float32) for key, c in d.items()}
                for v, d in self.cals.items()}


def collect_thresholds(model, windows, scale_sets: dict, progress=True) -> dict:
    """Thresholds per variant and (layer, input kind) for inputs x / s.

    scale_sets: {variant: {layer: LayerScales}}. One pass of the float model serves every variant:
    the folded models compute the same function, their layer inputs are the reference's divided by s.
    Returns {variant: {(layer, kind): float32 [d]}}.
    """
    hook = ThresholdCollector(scale_sets)
    for w in _tqdm(windows, desc="calibration: thresholds", disable=not progress):
        model.forward(w, hook=hook)
    return hook.thresholds()


# ----------------------------------------------------------------------------------- quantized model
@dataclass
class QuantizedLinear:
    qweight: object          # decdec.quantize.QuantizedWeight
    cheatsheet: object       # decdec.cheatsheet.Cheatsheet
    thresholds: np.ndarray   # float32 [d_in], in the layer's input basis


@dataclass
class QuantizedBlock:
    bits: int
    attn_norm: np.ndarray    # folded RMSNorm weights (== the float ones for RTN)
    ffn_norm: np.ndarray
    scales: LayerScales      # AWQ input scales (ones for RTN)
    linears: dict            # name -> QuantizedLinear
    biases: dict = field(default_factory=dict)   # bq/bk/bv (Qwen2-style), folded like their rows


@dataclass
class QuantizedModel:
    config: object
    tok_embeddings: np.ndarray
    norm: np.ndarray
    lm_head: np.ndarray
    blocks: list             # QuantizedBlock per decoder block
    method: str
    group_size: int
    calibration: dict = field(default_factory=dict)   # how it was calibrated (for the manifest)
    tokenizer: object = None

    @property
    def bits_per_layer(self) -> list[int]:
        return [b.bits for b in self.blocks]

    @property
    def mean_bits(self) -> float:
        """Average bits per linear-layer weight (excluding group scales/zeros)."""
        num = den = 0
        for b in self.blocks:
            for ql in b.linears.values():
                n = ql.qweight.in_features * ql.qweight.out_features
                num += b.bits * n
                den += n
        return num / den

    def label(self) -> str:
        mb = self.mean_bits
        return f"{mb:g}-bit {self.method.upper()}" if mb % 1 else f"{int(mb)}-bit {self.method.upper()}"

    def float_weights(self):
        """LlamaWeights carrying the folded norms; linear matrices are the dequantized W_hat."""
        return _weights_with_blocks(self, dequantized=True)

    def _linear_nbytes(self, k_chunk: int = 0):
        """decdec.h's byte rule for every quantized linear (_C.layer_nbytes: the numbers a
        DecLinear of that shape reports), one dict per linear."""
        from . import _C
        return [_C.layer_nbytes(ql.qweight.in_features, ql.qweight.out_features, ql.qweight.bits,
                                ql.qweight.group_size, int(k_chunk))
                for b in self.blocks for ql in b.linears.values()]

    def gpu_bytes(self) -> dict:
        """Bytes a GPU would hold: quantized linears (codes, scales, zeros, residual scales and
        thresholds: decdec.h's dd_weight_nbytes) and the fp16 embeddings / head / norms. Residual
        codes stay in host memory."""
        lin = sum(n["weight"] for n in self._linear_nbytes())
        c = self.config
        other = 2 * c.vocab_size * c.dim + 2 * c.dim * (2 * c.n_layers + 1)
        if self.lm_head is not self.tok_embeddings:
            other += 2 * c.vocab_size * c.dim
        return {"linears": int(lin), "other": int(other), "total": int(lin + other)}

    def residual_host_bytes(self) -> int:
        """Bytes of the residual codes in host memory (dd_residual_nbytes summed)."""
        return int(sum(n["residual"] for n in self._linear_nbytes()))

    def residual_bytes_per_token(self, k_chunk: int) -> int:
        """Residual bytes fetched per decoded token at a uniform k_chunk (dd_fetch_nbytes summed)."""
        return int(sum(n["fetch"] for n in self._linear_nbytes(k_chunk)))


def _weights_with_blocks(qm: QuantizedModel, dequantized: bool):
    from .model import LlamaWeights
    layers = []
    for b in qm.blocks:
        d = {"attn_norm": b.attn_norm, "ffn_norm": b.ffn_norm, **b.biases}
        for name, ql in b.linears.items():
            d[name] = ql.qweight.dequantize() if dequantized else None
        layers.append(d)
    return LlamaWeights(config=qm.config, tok_embeddings=qm.tok_embeddings, layers=layers,
                        norm=qm.norm, lm_head=qm.lm_head)


def build_model(qm: QuantizedModel, k_chunk: int = 0, selection: str = "bucket", device: str = "cpu"):
    """A LlamaModel whose every linear layer is a DecLinear (decdec.layer.make_declinear)."""
    from .layer import make_declinear
    from .model import LlamaModel
    linears = {}
    for l, b in enumerate(qm.blocks):
        for name, ql in b.linears.items():
            linears[(l, name)] = make_declinear(ql.qweight, ql.cheatsheet, ql.thresholds,
                                                k_chunk=k_chunk, selection=selection, device=device)
    return LlamaModel(_weights_with_blocks(qm, dequantized=False), linears)


def set_compensation(model, k_chunk: int, selection: str = "bucket") -> None:
    """Set k_chunk and selection on every DecLinear of a model built by build_model, in place.
    Settings apply at once; a call already running keeps the settings it started with.  To run
    several settings side by side (or from several threads) use with_compensation instead."""
    for lin in model.linears.values():
        if hasattr(lin, "k_chunk"):
            lin.k_chunk = int(k_chunk)
            lin.selection = selection


def with_compensation(model, k_chunk: int, selection: str = "bucket"):
    """A LlamaModel sharing `model`'s weights whose DecLinears run at k_chunk / selection:
    `DecLinear.with_settings` (the layers' weights are shared, not copied or uploaded again).
    `model` itself is left as it is.  Linear layers without run settings (dense stand-ins) are
    shared as they are; one with a k_chunk but no with_settings is refused (TypeError)."""
    from .model import LlamaModel
    linears = {}
    for key, lin in model.linears.items():
        if hasattr(lin, "with_settings"):
            lin = lin.with_settings(k_chunk=int(k_chunk), selection=selection)
        elif hasattr(lin, "k_chunk"):
            raise TypeError(f"linear {key} has a k_chunk but no with_settings(): cannot derive its "
                            f"settings without changing it (use set_compensation)")
        linears[key] = lin
    return LlamaModel(model.weights, linears)


# ----------------------------------------------------------------------------------- quantization
def _quantize_block(layer: dict, config, bits: int, group_size: int, method: str,
                    stats_layer: dict | None, alpha_grid, clip_grid):
    """(LayerScales, folded layer dict, {name: (QuantizedWeight, Cheatsheet)}) of one block."""
    from .cheatsheet import build_cheatsheet
    from .quantize import quantize_rtn, quantize_with_params
    if method == "rtn":
        scales = LayerScales.identity(config)
        folded = layer
        out = {}
        for name in LINEAR_NAMES:
            qw = quantize_rtn(layer[name], bits, group_size)
            out[name] = qw
    elif method == "awq":
        scales = _awq.search_layer_scales(layer, stats_layer, config, bits, group_size, alpha_grid)
        folded = _awq.fold_layer(layer, scales, config)
        params = _awq.quantize_layer_params(folded, stats_layer, scales, bits, group_size,
                                            clip_grid=clip_grid)
        out = {name: quantize_with_params(folded[name], *params[name], bits, group_size)
               for name in LINEAR_NAMES}
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    pairs = {}
    for name in LINEAR_NAMES:
        qw = out[name]
        pairs[name] = (qw, build_cheatsheet(folded[name], qw.dequantize()))
    return scales, folded, pairs


def quantize_block(layer: dict, config, bits: int, group_size: int, method: str,
                   stats_layer: dict | None, alpha_grid=_awq.DEFAULT_ALPHA_GRID,
                   clip_grid=_awq.DEFAULT_CLIP_GRID) -> QuantizedBlock:
    """One decoder block quantized (thresholds still None: assign_thresholds sets them).

    stats_layer: CalibrationStats.layer(l) for AWQ, None for RTN. The in-memory and the streaming
    pipeline both call this, so a block comes out the same whichever path ran it."""
    scales, folded, pairs = _quantize_block(layer, config, bits, group_size, method, stats_layer,
                                            alpha_grid, clip_grid)
    linears = {name: QuantizedLinear(qw, cs, None) for name, (qw, cs) in pairs.items()}
    biases = {k: folded[k] for k in ("bq", "bk", "bv") if folded.get(k) is not None}
    return QuantizedBlock(bits, folded["attn_norm"], folded["ffn_norm"], scales, linears, biases)


def assign_thresholds(block: QuantizedBlock, l: int, thresholds: dict) -> None:
    """Set each linear's thresholds from {(layer, input kind): float32 [d_in]} (one variant)."""
    for name, ql in block.linears.items():
        ql.thresholds = thresholds[(l, INPUT_OF_LINEAR[name])]


def calibration_record(calib_tokens, n_windows: int, method: str, alpha_grid, clip_grid) -> dict:
    """How a model was calibrated, for its manifest (both pipelines write the same record)."""
    return {"text_tokens": int(len(np.asarray(calib_tokens).reshape(-1))),
            "n_windows": n_windows, "context": CALIB_CONTEXT, "bos": False,
            "threshold_model": "float reference (folded basis for AWQ)",
            "awq_alpha_grid": list(map(float, alpha_grid)) if method == "awq" else None,
            "awq_clip_grid": list(map(float, clip_grid)) if method == "awq" else None}


def check_quantizer_args(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group_size not in (64, 128):
        raise ValueError(f"group_size must be 64 or 128, got {group_size}")


def _kl_rows(ref_logits, logits) -> np.ndarray:
    """KL(P_ref || P) per row, float64."""
    a = np.asarray(ref_logits, dtype=np.float64)
    b = np.asarray(logits, dtype=np.float64)
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(axis=1)


def block_sensitivity(weights, per_bits_blocks: dict, low_bits: int, tokens, progress=True) -> np.ndarray:
    """Mean KL to the float model when block l alone is quantized to low_bits (others float)."""
    from .model import DenseLinear, LlamaModel
    ref = LlamaModel(weights).forward(tokens)
    out = np.zeros(len(weights.layers))
    for l in _tqdm(range(len(weights.layers)), desc=f"3.5-bit: sensitivity of each block at {low_bits} bits",
                   disable=not progress):
        blk = per_bits_blocks[low_bits][l]
        layers = list(weights.layers)
        layers[l] = dict(layers[l], attn_norm=blk.attn_norm, ffn_norm=blk.ffn_norm, **blk.biases)
        w = dataclasses.replace(weights, layers=layers)
        linears = {(l, name): DenseLinear(ql.qweight.dequantize()) for name, ql in blk.linears.items()}
        out[l] = _kl_rows(ref, LlamaModel(w, linears).forward(tokens)).mean()
    return out


def quantize_models(weights, calib_tokens, bits_list=(3, 4), method: str = "awq",
                    group_size: int = 128, n_windows: int = DEFAULT_CALIB_WINDOWS,
                    sensitivity_tokens: int = 256, tokenizer=None, progress: bool = True,
                    alpha_grid=_awq.DEFAULT_ALPHA_GRID, clip_grid=_awq.DEFAULT_CLIP_GRID) -> dict:
    """Quantize to every bit width in bits_list (3, 4 and/or 3.5), sharing the calibration passes.

    Returns {bits: QuantizedModel}. 3.5 needs 3 and 4 internally (computed even if not asked for).
    A list of per-block bit widths may be given as an element of bits_list (a tuple, keyed by tuple).
    """
    from .model import LlamaModel
    check_quantizer_args(method, group_size)
    config = weights.config
    n_layers = len(weights.layers)
    wanted = list(bits_list)
    uniform = set()
    for b in wanted:
        if isinstance(b, (tuple, list)):
            if len(b) != n_layers or any(x not in (3, 4) for x in b):
                raise ValueError(f"per-block bits must be {n_layers} values in (3, 4), got {b}")
            uniform.update(b)
        elif b == 3.5:
            uniform.update((3, 4))
        elif b in (3, 4):
            uniform.add(int(b))
        else:
            raise ValueError(f"bits must be 3, 3.5, 4 or a per-block list, got {b!r}")
    t0 = time.time()
    windows = calibration_windows(calib_tokens, n_windows)
    ref_model = LlamaModel(weights)
    stats = collect_gram_stats(ref_model, windows, progress) if method == "awq" else None

    blocks = {b: [] for b in sorted(uniform)}

    def one_block(b, l):
        st = stats.layer(l) if stats is not None else None
        return quantize_block(weights.layers[l], config, b, group_size, method, st, alpha_grid,
                              clip_grid)

    # Blocks are independent; NumPy releases the GIL in its kernels, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for b in sorted(uniform):
            futures = [pool.submit(one_block, b, l) for l in range(n_layers)]
            for fut in _tqdm(futures, desc=f"quantize {b}-bit {method.upper()}", disable=not progress):
                blocks[b].append(fut.result())
    # Thresholds: one float pass serves every (bits) variant (RTN variants share one set).
    scale_sets = {b: [blk.scales for blk in blocks[b]] for b in blocks}
    if method == "rtn":
        first = next(iter(scale_sets))
        scale_sets = {first: scale_sets[first]}
    th = collect_thresholds(ref_model, windows, scale_sets, progress)
    for b in blocks:
        src = th[b] if b in th else th[next(iter(th))]
        for l, blk in enumerate(blocks[b]):
            assign_thresholds(blk, l, src)

    calibration = calibration_record(calib_tokens, n_windows, method, alpha_grid, clip_grid)
    result = {}
    sens = None
    for b in wanted:
        if isinstance(b, (tuple, list)):
            per_block = [int(x) for x in b]
        elif b == 3.5:
            if sens is None:
                sens = block_sensitivity(weights, blocks, 3, windows[0][:sensitivity_tokens], progress)
            order = np.argsort(-sens, kind="stable")
            four = set(order[:n_layers // 2].tolist())
            per_block = [4 if l in four else 3 for l in range(n_layers)]
        else:
            per_block = [int(b)] * n_layers
        cal = dict(calibration)
        if b == 3.5:
            cal["sensitivity_kl"] = [float(x) for x in sens]
            cal["sensitivity_tokens"] = int(min(sensitivity_tokens, len(windows[0])))
        cal["seconds"] = round(time.time() - t0, 1)
        qm = QuantizedModel(config, weights.tok_embeddings, weights.norm, weights.lm_head,
                            [blocks[pb][l] for l, pb in enumerate(per_block)], method, group_size,
                            cal, tokenizer)
        result[tuple(b) if isinstance(b, list) else b] = qm
    return result


def quantize_model(weights, calib_tokens, bits=3, method: str = "awq", group_size: int = 128,
                   **kw) -> QuantizedModel:
    """Quantize one model: bits 3, 4, 3.5 (mixed by measured sensitivity) or a per-block list."""
    key = tuple(bits) if isinstance(bits, (list, tuple)) else bits
    return quantize_models(weights, calib_tokens, [key], method, group_size, **kw)[key]
