"""PyTorch peers of a Llama-family decode step, to print beside decdec's engine in the same run.

    python3 bench/engine_peers.py --preset llama3-8b --variants bf16 int4 --prefill --json out.json
    python3 bench/engine_peers.py --preset llama3-70b-layers --layers 8 --variants bf16 int4
    python3 bench/engine_peers.py --device cpu --preset tiny --variants bf16 int4 --prefill   # smoke

A minimal Llama decoder written in torch (RMSNorm, rotate-half RoPE, GQA attention over a static KV
cache, SwiGLU, tied or untied head in the model dtype) with random weights (randn * 0.02, built
directly on the device), for a preset or a custom shape:

    llama3-8b          dim 4096, 32 layers, 32/8 heads, head_dim 128, ffn 14336, vocab 128256
    llama3-70b-layers  dim 8192, --layers of the 80 (default 8), 64/8 heads, ffn 28672, vocab 128256
    smollm2-135m       dim 576, 30 layers, 9/3 heads, head_dim 64, ffn 1536, vocab 49152, tied
    tiny               dim 64, 2 layers, 4/2 heads, head_dim 16, ffn 128, vocab 256 (CPU smoke)

q/k/v are one fused projection and gate/up another (as gpt-fast / vLLM do); embedding and head stay
in the model dtype in every variant.

Variants
    bf16  dense weights in the model dtype (bf16 by default on CUDA), F.linear (cuBLAS GEMV at batch 1).
    int4  weight-only int4, group size 128 (a smaller group only where 128 does not divide the input
          dim, e.g. SmolLM2's 576: reported), through torch's tinygemm kernel
          torch.ops.aten._convert_weight_to_int4pack / _weight_int4pack_mm on CUDA (the gpt-fast way).
          The API has changed across torch versions (uint8 [n, k/2] input since ~2.5, int32 [n, k]
          before); both are tried. A missing or failing op makes the variant "unavailable" with the
          error text, never a crash. A one-linear self-check (tinygemm vs x @ dequant(W)^T) is recorded
          as int4_check_rel_err.

Decode: one token at a FIXED position (default 256; the KV cache holds random values in slots
[0, position)). The step is captured once in a torch.cuda.CUDAGraph with static input/output tensors
and replayed at that same position: each replay rewrites slot `position` and attends over exactly
position + 1 cached entries, so the KV bytes read are exact. Timing: warm-up replays, then the median
over --reps of CUDA-event timings of --iters back-to-back replays; tokens/s = 1e6 / us_per_step.
bytes_per_step = every weight byte read (layers incl. int4 scales/zeros, norms, head, one embedding
row) + the K and V read at that position; roofline_fraction = bytes / time / --hbm-gbs.
No weight rotation is needed: a whole-model step streams far more than the L2 (50 MB on H100/H200);
the output says by how much (SmolLM2's ~270 MB bf16 exceeds it too, by ~5x; its int4 by ~2x, so a
little L2 reuse between replays is possible there).

Prefill (--prefill): a random prompt of --prefill-tokens (512) in the model dtype, the whole model
forward with causal F.scaled_dot_product_attention (writing the KV cache; the head only on the last
token, as an engine does), eager, median of CUDA-event timings; prefill tokens/s = tokens / time.

On the CPU (--device cpu) there is no CUDA graph (eager, perf_counter) and int4 is reported as
unavailable; it exists for a smoke check with the tiny preset.

Importable without torch: measure_peer(preset_or_shape, variant, ...) -> dict returns a record with
available=False when torch (or CUDA) is missing. From the repo root: `from bench.engine_peers import
measure_peer`, or load this file with importlib.util.spec_from_file_location.
"""

# (no `from __future__ import annotations`: the dataclass must build when this file is loaded with
# importlib.util.spec_from_file_location without registering it in sys.modules)
import argparse
import dataclasses
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback

try:  # torch is optional: the module imports (and reports "unavailable") without it
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised by a subprocess test
    torch = None
    F = None

TORCH_AVAILABLE = torch is not None
VARIANTS = ("bf16", "int4")
DEFAULT_HBM_GBS = 4627.0  # H200 SXM peak (the lead's number)
DEFAULT_L2_BYTES = 50 * 1024 * 1024  # H100/H200; used when the device does not report one


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    tied: bool = False
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    full_layers: int | None = None  # the real model's layer count when only some are built

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotate-half RoPE)")


def _engine_shape(name: str, full_layers: int | None = None) -> Shape:
    """A preset from decdec.engine.SHAPES, the one table of the shapes decdec's engine benchmarks
    (so the peers are always measured at the engine's shapes)."""
    s = _ENGINE_SHAPES[name]
    return Shape(name, s["dim"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["head_dim"], s["ffn_dim"],
                 s["vocab_size"], tied=s["tie"], rope_theta=s["rope_theta"], full_layers=full_layers)


sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from decdec.engine import SHAPES as _ENGINE_SHAPES  # noqa: E402

PRESETS = {
    "llama3-8b": _engine_shape("llama3-8b"),
    "llama3-70b-layers": _engine_shape("llama3-70b-layers", full_layers=80),
    "smollm2-135m": _engine_shape("smollm2-135m"),
    "tiny": Shape("tiny", 64, 2, 4, 2, 16, 128, 256, tied=False, rope_theta=10000.0),
}


def resolve_shape(preset_or_shape, layers: int | None = None) -> Shape:
    """A Shape from a preset name, a Shape, or a dict of Shape fields; `layers` overrides n_layers."""
    if isinstance(preset_or_shape, Shape):
        shape = preset_or_shape
    elif isinstance(preset_or_shape, str):
        if preset_or_shape not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_shape!r}; have {sorted(PRESETS)}")
        shape = PRESETS[preset_or_shape]
    elif isinstance(preset_or_shape, dict):
        fields = dict(preset_or_shape)
        fields.setdefault("name", "custom")
        shape = Shape(**fields)
    else:
        raise TypeError(f"preset_or_shape must be a preset name, Shape or dict, not {type(preset_or_shape)}")
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be >= 1")
        shape = dataclasses.replace(shape, n_layers=int(layers))
    return shape


def shape_note(shape: Shape) -> str:
    if shape.full_layers and shape.full_layers != shape.n_layers:
        return (f"{shape.name}: {shape.n_layers} of {shape.full_layers} layers "
                f"(+ embedding and the {shape.vocab}-vocab head); not a whole-model time")
    return ""


# ---------------------------------------------------------------- int4 (tinygemm) -----------------

class Int4Unavailable(RuntimeError):
    """torch's int4 weight-only ops are missing or fail here."""


_INT4_GROUPS = (256, 128, 64, 32)  # what tinygemm supports


def _int4_ops():
    errors = []
    ops = {}
    for name in ("_convert_weight_to_int4pack", "_weight_int4pack_mm"):
        fn = None
        for ns_name, ns in (("torch.ops.aten", getattr(torch.ops, "aten", None)), ("torch", torch)):
            try:
                fn = getattr(ns, name)
                break
            except (AttributeError, RuntimeError) as e:
                errors.append(f"{ns_name}.{name}: {e}")
        if fn is None:
            raise Int4Unavailable(f"torch {torch.__version__} has no {name} ({'; '.join(errors)})")
        ops[name] = fn
    return ops["_convert_weight_to_int4pack"], ops["_weight_int4pack_mm"]


def int4_group_size(k: int, requested: int = 128) -> int:
    """`requested` if it divides k, else the largest tinygemm group size <= requested that does."""
    for g in (requested,) + tuple(g for g in _INT4_GROUPS if g < requested):
        if g in _INT4_GROUPS and k % g == 0:
            return g
    raise Int4Unavailable(f"no tinygemm group size (32/64/128/256) divides in_features {k}")


def int4_inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (t * 16) == 0:
            return t
    raise Int4Unavailable(f"in_features {k} is not a multiple of 32 (tinygemm k tile)")


def quantize_int4_groupwise(w, group_size: int):
    """Asymmetric 4-bit RTN per group of `group_size` inputs, tinygemm's convention.

    Returns (q int32 [n, k] in 0..15, scales_and_zeros [k/g, n, 2] in w's dtype) with
    dequant(w) = (q - 8) * scale + zero, zero = min + 8 * scale (as torch's tests / gpt-fast)."""
    n, k = w.shape
    wf = w.float().reshape(n, k // group_size, group_size)
    mn = wf.amin(dim=2, keepdim=True)
    mx = wf.amax(dim=2, keepdim=True)
    scales = (mx - mn).clamp(min=1e-6) / 15.0
    zeros = mn + scales * 8.0
    q = ((wf - mn) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    saz = torch.stack([scales.reshape(n, -1), zeros.reshape(n, -1)], dim=2)  # [n, k/g, 2]
    return q, saz.transpose(0, 1).contiguous().to(w.dtype)


def dequantize_int4_groupwise(q, saz, group_size: int):
    """The float weight [n, k] (fp32) that (q, scales_and_zeros) stand for."""
    n, k = q.shape
    s = saz[..., 0].float().t().reshape(n, k // group_size, 1)
    z = saz[..., 1].float().t().reshape(n, k // group_size, 1)
    return ((q.float().reshape(n, k // group_size, group_size) - 8.0) * s + z).reshape(n, k)


def pack_int4(q, inner_k_tiles: int):
    """tinygemm's packed layout from int32 codes [n, k]; returns (packed, which input form worked)."""
    convert, _ = _int4_ops()
    q = q.contiguous()
    errors = []
    try:  # torch >= 2.5: uint8 [n, k/2], even column in the high nibble
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        return convert(u8, inner_k_tiles), "uint8[n,k/2]"
    except Exception as e:  # noqa: BLE001 - try the older form, report both
        errors.append(f"uint8[n,k/2]: {type(e).__name__}: {e}")
    try:  # torch <= 2.4: int32 [n, k]
        return convert(q, inner_k_tiles), "int32[n,k]"
    except Exception as e:  # noqa: BLE001
        errors.append(f"int32[n,k]: {type(e).__name__}: {e}")
    raise Int4Unavailable("_convert_weight_to_int4pack failed: " + " | ".join(errors))


class DenseLinear:
    def __init__(self, w):
        self.w = w
        self.out_features, self.in_features = w.shape

    def __call__(self, x):
        return F.linear(x, self.w)

    def tensors(self):
        return [self.w]


class Int4Linear:
    """Weight-only int4 via torch.ops.aten._weight_int4pack_mm (bf16 activations)."""

    def __init__(self, packed, saz, out_features, in_features, group_size, mm):
        self.packed, self.saz = packed, saz
        self.out_features, self.in_features = out_features, in_features
        self.group_size, self._mm = group_size, mm

    @classmethod
    def from_dense(cls, w, group_size: int, info: dict | None = None, check: bool = False):
        _, mm = _int4_ops()
        n, k = w.shape
        if n % 8:
            raise Int4Unavailable(f"out_features {n} is not a multiple of 8 (tinygemm)")
        g = int4_group_size(k, group_size)
        tiles = int4_inner_k_tiles(k)
        q, saz = quantize_int4_groupwise(w, g)
        saz = saz.to(torch.bfloat16)
        packed, form = pack_int4(q, tiles)
        lin = cls(packed, saz, n, k, g, mm)
        if info is not None:
            info.setdefault("int4_pack_input", form)
            info.setdefault("int4_inner_k_tiles", {})[str(k)] = tiles
            if g != group_size:
                info.setdefault("int4_group_fallback", {})[str(k)] = g
        if check and info is not None:
            x = torch.randn(1, k, device=w.device, dtype=torch.bfloat16)
            try:
                y = lin(x).float()
            except Exception as e:  # noqa: BLE001
                raise Int4Unavailable(f"_weight_int4pack_mm failed: {type(e).__name__}: {e}") from e
            ref = x.float() @ dequantize_int4_groupwise(q, saz, g).t()
            info["int4_check_rel_err"] = float((y - ref).norm() / ref.norm().clamp(min=1e-30))
        del q
        return lin

    def __call__(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = self._mm(x2.contiguous(), self.packed, self.group_size, self.saz)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def tensors(self):
        return [self.packed, self.saz]


# ---------------------------------------------------------------- the model ------------------------

def _rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, cos, sin):
    """Rotate-half RoPE; x [T, H, hd], cos/sin [T, 1, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


_SDPA_GQA = None  # whether F.scaled_dot_product_attention takes enable_gqa (torch >= 2.5)


def _sdpa_gqa(q, k, v, group, **kw):
    global _SDPA_GQA
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if _SDPA_GQA is not False:
        try:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            _SDPA_GQA = True
            return out
        except TypeError:
            _SDPA_GQA = False
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                          v.repeat_interleave(group, dim=1), **kw)


class Layer:
    def __init__(self, attn_norm, wqkv, wo, ffn_norm, w13, w2):
        self.attn_norm, self.wqkv, self.wo = attn_norm, wqkv, wo
        self.ffn_norm, self.w13, self.w2 = ffn_norm, w13, w2

    def linears(self):
        return [self.wqkv, self.wo, self.w13, self.w2]


class PeerModel:
    """The decoder, its static KV cache [n_layers, 1, n_kv, max_seq, head_dim] and RoPE tables."""

    def __init__(self, shape: Shape, variant: str, device, dtype, max_seq: int, group_size: int = 128,
                 seed: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; have {VARIANTS}")
        self.shape, self.variant = shape, variant
        self.device, self.dtype, self.max_seq = torch.device(device), dtype, max_seq
        self.info: dict = {}
        s = shape
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*size, scale=0.02):
            return torch.randn(*size, device=self.device, dtype=dtype, generator=gen) * scale

        checked = [False]

        def linear(n, k):
            w = randn(n, k)
            if variant == "bf16":
                return DenseLinear(w)
            lin = Int4Linear.from_dense(w, group_size, self.info, check=not checked[0])
            checked[0] = True
            del w
            return lin

        self.emb = randn(s.vocab, s.dim)
        self.layers = []
        qkv_out = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        for _ in range(s.n_layers):
            self.layers.append(Layer(
                attn_norm=1.0 + randn(s.dim),
                wqkv=linear(qkv_out, s.dim),
                wo=linear(s.dim, s.n_heads * s.head_dim),
                ffn_norm=1.0 + randn(s.dim),
                w13=linear(2 * s.ffn_dim, s.dim),
                w2=linear(s.dim, s.ffn_dim),
            ))
        self.norm = 1.0 + randn(s.dim)
        self.head = self.emb if s.tied else randn(s.vocab, s.dim)
        kv = (s.n_layers, 1, s.n_kv_heads, max_seq, s.head_dim)
        self.k_cache = torch.zeros(kv, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(kv, device=self.device, dtype=dtype)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=self.device,
                                                   dtype=torch.float32) / s.head_dim))
        freqs = torch.outer(torch.arange(max_seq, device=self.device, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype).unsqueeze(1)  # [max_seq, 1, hd]
        self.sin = emb.sin().to(dtype).unsqueeze(1)

    # -- accounting
    def weight_bytes_total(self) -> int:
        """Bytes of every weight tensor held (embedding table included once)."""
        n = sum(t.numel() * t.element_size() for L in self.layers for lin in L.linears() for t in lin.tensors())
        n += sum((L.attn_norm.numel() + L.ffn_norm.numel()) * L.attn_norm.element_size() for L in self.layers)
        n += self.norm.numel() * self.norm.element_size()
        n += self.emb.numel() * self.emb.element_size()
        if not self.shape.tied:
            n += self.head.numel() * self.head.element_size()
        return n

    def weight_bytes_per_step(self) -> int:
        """Weight bytes one decode step reads: layers, norms, head, and one embedding row."""
        s = self.shape
        n = sum(t.numel() * t.element_size() for L in self.layers for lin in L.linears() for t in lin.tensors())
        n += sum((L.attn_norm.numel() + L.ffn_norm.numel()) * L.attn_norm.element_size() for L in self.layers)
        n += self.norm.numel() * self.norm.element_size()
        n += self.head.numel() * self.head.element_size()
        n += s.dim * self.emb.element_size()
        return n

    def kv_bytes_read(self, position: int) -> int:
        """K and V read by the decode step at `position` (position + 1 entries per layer)."""
        s = self.shape
        return 2 * s.n_layers * s.n_kv_heads * (position + 1) * s.head_dim * self.k_cache.element_size()

    def fill_cache(self, upto: int, seed: int = 1):
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for c in (self.k_cache, self.v_cache):
            c[:, :, :, :upto] = torch.randn(c[:, :, :, :upto].shape, device=self.device, dtype=self.dtype,
                                            generator=gen)

    # -- forward
    def forward(self, tokens, start_pos: int, last_only: bool = False):
        """Logits for tokens [T] at positions start_pos.. (writing their K/V into the cache).

        T == 1 is the decode step: the query heads of each KV head are laid along SDPA's query axis
        (no mask needed, no K/V expansion). T > 1 is causal (prefill or a chunk after start_pos)."""
        s = self.shape
        T = tokens.shape[0]
        L = start_pos + T
        if L > self.max_seq:
            raise ValueError(f"positions up to {L} exceed the cache ({self.max_seq})")
        group = s.n_heads // s.n_kv_heads
        nq, nkv, hd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
        cos, sin = self.cos[start_pos:L], self.sin[start_pos:L]
        mask = None
        if T > 1 and start_pos > 0:
            mask = (torch.arange(L, device=self.device)[None, :]
                    <= torch.arange(start_pos, L, device=self.device)[:, None])
        x = F.embedding(tokens, self.emb)  # [T, dim]
        for li, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, s.norm_eps)
            qkv = layer.wqkv(h)
            qk = _rope(qkv[:, :nq + nkv].view(T, s.n_heads + s.n_kv_heads, hd), cos, sin)
            q, k = qk[:, :s.n_heads], qk[:, s.n_heads:]
            v = qkv[:, nq + nkv:].view(T, s.n_kv_heads, hd)
            self.k_cache[li, 0, :, start_pos:L] = k.transpose(0, 1)
            self.v_cache[li, 0, :, start_pos:L] = v.transpose(0, 1)
            K, V = self.k_cache[li, :, :, :L], self.v_cache[li, :, :, :L]  # [1, nkv, L, hd]
            if T == 1:
                o = F.scaled_dot_product_attention(q.reshape(1, s.n_kv_heads, group, hd), K, V)
                o = o.reshape(1, nq)
            else:
                qh = q.transpose(0, 1).unsqueeze(0)  # [1, nh, T, hd]
                if mask is None:
                    o = _sdpa_gqa(qh, K, V, group, is_causal=True)
                else:
                    o = _sdpa_gqa(qh, K, V, group, attn_mask=mask)
                o = o[0].transpose(0, 1).reshape(T, nq)
            x = x + layer.wo(o)
            h = _rms_norm(x, layer.ffn_norm, s.norm_eps)
            gu = layer.w13(h)
            x = x + layer.w2(F.silu(gu[:, :s.ffn_dim]) * gu[:, s.ffn_dim:])
        if last_only:
            x = x[-1:]
        return F.linear(_rms_norm(x, self.norm, s.norm_eps), self.head)


# ---------------------------------------------------------------- timing ---------------------------

def _median_graph_us(g, iters, reps, warmup):
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / iters)
    return statistics.median(times), times


def _median_eager_us(fn, iters, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000.0 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(times), times


def _capture(fn):
    """Capture fn() in a CUDA graph (after side-stream warm-up); returns (graph, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def _base_record(shape_name, variant):
    return {
        "preset": shape_name, "variant": variant, "available": False, "error": None,
        "us_per_step": None, "tokens_per_s": None, "bytes_per_step": None, "roofline_fraction": None,
        "prefill_tokens_per_s": None,
        "torch_version": torch.__version__ if TORCH_AVAILABLE else None,
        "device_name": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_peer(preset_or_shape, variant: str, *, device: str | None = None, dtype: str | None = None,
                 position: int = 256, iters: int = 100, reps: int = 20, warmup: int = 10,
                 prefill: bool = False, prefill_tokens: int = 512, prefill_reps: int = 10,
                 hbm_gbs: float = DEFAULT_HBM_GBS, layers: int | None = None, group_size: int = 128,
                 cuda_graph: bool = True, check: bool = False, seed: int = 0,
                 raise_errors: bool = False, pos: int | None = None, n_layers: int | None = None) -> dict:
    """Measure one torch peer (preset or shape x variant); returns a JSON-ready record.

    device defaults to cuda when available (else cpu); dtype to bf16 on cuda, fp32 on cpu.
    check=True also compares the graph-replayed decode logits with one full forward over the prompt
    (check_rel_err, check_argmax_match). A missing torch/CUDA/int4 op, OOM or any failure gives
    available=False with the error text (raise_errors=True re-raises instead, for tests).
    pos and n_layers are aliases of position and layers (decdec/bench_engine.py's names)."""
    if pos is not None:
        position = pos
    if n_layers is not None:
        layers = n_layers
    shape = resolve_shape(preset_or_shape, layers)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; have {VARIANTS}")
    rec = _base_record(shape.name, variant)
    rec.update(shape=dataclasses.asdict(shape), n_layers=shape.n_layers, position=position,
               hbm_gbs=hbm_gbs, note=shape_note(shape) or None)
    if not TORCH_AVAILABLE:
        rec["error"] = "torch is not installed"
        return rec
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        rec["error"] = f"torch {torch.__version__} has no CUDA device"
        return rec
    cuda = dev.type == "cuda"
    dname = dtype or ("bf16" if cuda else "fp32")
    if dname not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    tdtype = getattr(torch, _DTYPES[dname])
    rec.update(device_name=_device_name(dev), device=str(dev), dtype=dname,
               cuda_graph=bool(cuda and cuda_graph),
               graph_mode=("fixed position: one graph captured at `position`, replayed there"
                           if cuda and cuda_graph else "eager (no CUDA graph)"),
               iters=iters, reps=reps, warmup=warmup)
    if variant == "int4":
        rec["group_size"] = group_size
        if not cuda:
            rec["error"] = ("int4 peer needs CUDA: torch.ops.aten._weight_int4pack_mm is the CUDA tinygemm "
                            "kernel; skipped on cpu")
            return rec
    max_seq = max(position + 1, prefill_tokens if prefill else 0)
    model = g = static_out = None
    try:
        torch.manual_seed(seed)
        model = PeerModel(shape, variant, dev, tdtype, max_seq, group_size=group_size, seed=seed)
        rec.update(model.info)
        if variant == "int4" and rec.get("int4_check_rel_err", 0.0) > 0.05:
            rec["int4_check_warning"] = ("tinygemm output differs from x @ dequant(W)^T: packing/scale "
                                         "convention mismatch for this torch version (timing still valid)")
        wtotal = model.weight_bytes_total()
        wstep = model.weight_bytes_per_step()
        kvb = model.kv_bytes_read(position)
        rec.update(weight_bytes_held=wtotal, weight_bytes_per_step=wstep, kv_bytes_per_step=kvb,
                   bytes_per_step=wstep + kvb)
        if cuda:
            props = torch.cuda.get_device_properties(dev)
            l2 = int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)
            rec["l2_bytes"] = l2
            rec["l2_note"] = (f"weights read per step {wstep / 1e6:.0f} MB = {wstep / l2:.1f}x the "
                              f"{l2 / 2**20:.0f} MiB L2: each replay streams them from HBM, no rotation"
                              + (" (a little L2 reuse between replays is possible at this ratio)"
                                 if wstep < 10 * l2 else ""))
        model.fill_cache(position, seed=seed + 1)
        static_tok = torch.randint(0, shape.vocab, (1,), device=dev,
                                   generator=torch.Generator(device=dev).manual_seed(seed + 2))

        def step():
            return model.forward(static_tok, position, last_only=True)

        with torch.no_grad():
            if cuda and cuda_graph:
                g, static_out = _capture(step)
                us, all_us = _median_graph_us(g, iters, reps, warmup)
            else:
                us, all_us = _median_eager_us(step, iters, reps, warmup, cuda)
            rec.update(us_per_step=us, tokens_per_s=1e6 / us, us_per_step_reps=all_us,
                       achieved_gbs=rec["bytes_per_step"] / (us * 1e-6) / 1e9)
            rec["roofline_fraction"] = rec["achieved_gbs"] / hbm_gbs

            if check:
                gen = torch.Generator(device=dev).manual_seed(seed + 3)
                prompt = torch.randint(0, shape.vocab, (position + 1,), device=dev, generator=gen)
                ref = model.forward(prompt, 0, last_only=True)[0]
                if position:
                    model.forward(prompt[:position], 0, last_only=True)
                static_tok.copy_(prompt[position:])
                if g is not None:
                    g.replay()
                    got = static_out[0]
                else:
                    got = step()[0]
                if cuda:
                    torch.cuda.synchronize()
                rec["check_rel_err"] = _rel_err(got, ref)
                rec["check_argmax_match"] = bool(int(got.float().argmax()) == int(ref.float().argmax()))

            if prefill:
                gen = torch.Generator(device=dev).manual_seed(seed + 4)
                ptok = torch.randint(0, shape.vocab, (prefill_tokens,), device=dev, generator=gen)
                pus, _ = _median_eager_us(lambda: model.forward(ptok, 0, last_only=True), 1,
                                          prefill_reps, 2, cuda)
                rec.update(prefill_tokens=prefill_tokens, prefill_ms=pus / 1000.0,
                           prefill_tokens_per_s=prefill_tokens / (pus * 1e-6),
                           prefill_attention=("causal F.scaled_dot_product_attention"
                                              + (", enable_gqa" if _SDPA_GQA else
                                                 ", K/V repeat_interleave" if _SDPA_GQA is False else "")))
        rec["available"] = True
    except Exception as e:  # noqa: BLE001 - report, never crash the caller's run
        if raise_errors:
            raise
        rec["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, Int4Unavailable):
            rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    finally:
        del g, static_out, model
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return rec


def measure_peers(presets, variants, **kw) -> list[dict]:
    """measure_peer over presets x variants (weights freed between them)."""
    return [measure_peer(p, v, **kw) for p in presets for v in variants]


# ---------------------------------------------------------------- output ---------------------------

def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_table(records) -> str:
    """A markdown table of the records, then the notes (graph mode, partial models, L2, errors)."""
    lines = ["| preset | variant | us/step | tok/s | bytes/step | % HBM roofline | prefill tok/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for r in records:
        if r.get("available"):
            pre = r.get("prefill_tokens_per_s")
            lines.append(f"| {r['preset']} | {r['variant']} | {r['us_per_step']:.1f} | {r['tokens_per_s']:.1f} "
                         f"| {_fmt_bytes(r['bytes_per_step'])} | {100 * r['roofline_fraction']:.1f}% "
                         f"| {f'{pre:.0f}' if pre else '-'} |")
        else:
            lines.append(f"| {r['preset']} | {r['variant']} | unavailable | - | - | - | - |")
            notes.append(f"{r['preset']}/{r['variant']} unavailable: {r.get('error')}")
    seen = set()
    for r in records:
        for key in ("note", "l2_note"):
            t = r.get(key)
            if t and (r["preset"], t) not in seen:
                seen.add((r["preset"], t))
                notes.append(f"{r['preset']}/{r['variant']}: {t}" if key == "l2_note" else t)
        if r.get("available"):
            if r.get("int4_group_fallback"):
                notes.append(f"{r['preset']}/int4: group {r.get('group_size')} does not divide in_features "
                             f"{', '.join(r['int4_group_fallback'])}; used group(s) "
                             f"{', '.join(map(str, r['int4_group_fallback'].values()))} there")
            if "int4_check_rel_err" in r:
                notes.append(f"{r['preset']}/int4: tinygemm self-check rel err {r['int4_check_rel_err']:.2e} "
                             f"(pack input {r.get('int4_pack_input')})"
                             + (f" WARNING: {r['int4_check_warning']}" if r.get("int4_check_warning") else ""))
            if "check_rel_err" in r:
                notes.append(f"{r['preset']}/{r['variant']}: decode vs full forward rel err "
                             f"{r['check_rel_err']:.2e}, argmax {'equal' if r['check_argmax_match'] else 'DIFFERS'}")
    first = next((r for r in records if r.get("available")), None)
    if first:
        notes.insert(0, f"decode at position {first['position']} ({first['graph_mode']}); median of "
                        f"{first['reps']} x {first['iters']} steps; {first['dtype']} activations; "
                        f"roofline at {first['hbm_gbs']:.0f} GB/s; torch {first['torch_version']} on "
                        f"{first['device_name']}")
        if first.get("prefill_tokens"):
            notes.insert(1, f"prefill: {first['prefill_tokens']} tokens, eager, "
                            f"{first.get('prefill_attention')}, head on the last token only")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["llama3-8b"], choices=sorted(PRESETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--layers", type=int, default=None,
                    help="layers to build (llama3-70b-layers: default 8 of 80; overrides any preset)")
    ap.add_argument("--position", type=int, default=256, help="decode position (KV entries before it)")
    ap.add_argument("--iters", type=int, default=100, help="graph replays per timed rep")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prefill", action="store_true", help="also time a prefill forward")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-reps", type=int, default=10)
    ap.add_argument("--hbm-gbs", type=float, default=DEFAULT_HBM_GBS)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                    help="model dtype (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--no-graph", action="store_true", help="time the eager step instead (CUDA)")
    ap.add_argument("--check", action="store_true",
                    help="also compare graph-decode logits with a full forward (check_rel_err)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the records here (a JSON list)")
    args = ap.parse_args(argv)
    if not TORCH_AVAILABLE:
        print("engine_peers: torch is not installed", file=sys.stderr)
        return 2
    recs = []
    for preset in args.preset:
        for variant in args.variants:
            r = measure_peer(preset, variant, device=args.device, dtype=args.dtype, position=args.position,
                             iters=args.iters, reps=args.reps, warmup=args.warmup, prefill=args.prefill,
                             prefill_tokens=args.prefill_tokens, prefill_reps=args.prefill_reps,
                             hbm_gbs=args.hbm_gbs, layers=args.layers, group_size=args.group_size,
                             cuda_graph=not args.no_graph, check=args.check, seed=args.seed)
            status = (f"{r['us_per_step']:.1f} us/step" if r["available"] else f"unavailable ({r['error']})")
            print(f"[engine_peers] {preset}/{variant}: {status}", file=sys.stderr, flush=True)
            recs.append(r)
    print(format_table(recs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)
            f.write("\n")
    return 0 if any(r["available"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
