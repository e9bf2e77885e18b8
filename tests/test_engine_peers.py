"""bench/engine_peers.py (the torch peers of a Llama decode step) on the CPU: the cached decode step
equals one full forward over the prompt, the byte accounting, the int4 quantization convention, the
CLI smoke run, and that the module imports without torch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "engine_peers.py"


def _load():
    spec = importlib.util.spec_from_file_location("engine_peers_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ep = _load()

SHAPES = {
    "gqa": dict(name="t-gqa", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab=256),
    "mha-tied": dict(name="t-mha", dim=48, n_layers=3, n_heads=3, n_kv_heads=3, head_dim=16, ffn_dim=96,
                     vocab=200, tied=True, rope_theta=100000.0),
    "mqa": dict(name="t-mqa", dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, ffn_dim=64, vocab=128),
}


def _model(shape, max_seq=64, seed=0):
    return ep.PeerModel(ep.resolve_shape(shape), "bf16", "cpu", torch.float32, max_seq, seed=seed)


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_cached_decode_equals_full_forward(key):
    """Step-by-step decode through the KV cache (T == 1 path: query heads along SDPA's query axis)
    gives the logits of one causal full forward over the prompt, at every position (fp32)."""
    shape = SHAPES[key]
    T = 13
    torch.manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (T,))
    with torch.no_grad():
        full = _model(shape).forward(tokens, 0)  # [T, vocab]
        assert full.shape == (T, shape["vocab"])
        m = _model(shape)
        steps = torch.cat([m.forward(tokens[i:i + 1], i) for i in range(T)])
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
        # prefill T-1 tokens, then one decode step (what the --check path does on the GPU)
        m2 = _model(shape)
        m2.forward(tokens[:-1], 0, last_only=True)
        last = m2.forward(tokens[-1:], T - 1, last_only=True)
        torch.testing.assert_close(last[0], full[-1], rtol=1e-4, atol=1e-5)
        # a chunk after a prefix (T > 1 with start_pos > 0: the explicit causal mask)
        m3 = _model(shape)
        m3.forward(tokens[:5], 0)
        chunk = m3.forward(tokens[5:], 5)
        torch.testing.assert_close(chunk, full[5:], rtol=1e-4, atol=1e-5)


def test_decode_logits_depend_on_the_cache():
    """The decode step really attends over the cache (a different prefix changes its logits)."""
    shape = SHAPES["gqa"]
    torch.manual_seed(2)
    a = torch.randint(0, shape["vocab"], (8,))
    b = a.clone()
    b[0] = (b[0] + 1) % shape["vocab"]
    with torch.no_grad():
        la = _model(shape).forward(a, 0)[-1]
        lb = _model(shape).forward(b, 0)[-1]
    assert not torch.allclose(la, lb)


def test_measure_peer_cpu_record_and_bytes():
    s = ep.resolve_shape("tiny")
    r = ep.measure_peer("tiny", "bf16", device="cpu", position=40, iters=2, reps=3, warmup=1, prefill=True,
                        prefill_tokens=64, prefill_reps=2, check=True, raise_errors=True)
    assert r["available"] and r["error"] is None
    assert r["cuda_graph"] is False and r["dtype"] == "fp32"
    assert r["us_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(1e6 / r["us_per_step"])
    # weights read per step: layers (fused qkv, o, gate/up, down) + 2 norms/layer + final norm + head
    # (untied) + one embedding row; KV: K and V, (position + 1) entries per layer; fp32 = 4 bytes
    per_layer = ((s.n_heads + 2 * s.n_kv_heads) * s.head_dim * s.dim + s.dim * s.n_heads * s.head_dim
                 + 2 * s.ffn_dim * s.dim + s.dim * s.ffn_dim + 2 * s.dim)
    weights = 4 * (s.n_layers * per_layer + s.dim + s.vocab * s.dim + s.dim)
    kv = 4 * 2 * s.n_layers * s.n_kv_heads * 41 * s.head_dim
    assert r["weight_bytes_per_step"] == weights and r["kv_bytes_per_step"] == kv
    assert r["bytes_per_step"] == weights + kv
    assert r["roofline_fraction"] == pytest.approx(r["bytes_per_step"] / (r["us_per_step"] * 1e-6) / 4627e9)
    assert r["check_rel_err"] < 1e-5 and r["check_argmax_match"]
    assert r["prefill_tokens"] == 64 and r["prefill_tokens_per_s"] > 0
    for key in ("preset", "variant", "us_per_step", "tokens_per_s", "bytes_per_step", "roofline_fraction",
                "prefill_tokens_per_s", "torch_version", "device_name", "date"):
        assert key in r
    json.dumps(r)  # JSON-ready


def test_int4_is_unavailable_on_cpu_with_a_reason():
    r = ep.measure_peer("tiny", "int4", device="cpu", iters=1, reps=1, warmup=0)
    assert r["available"] is False and "CUDA" in r["error"] and r["us_per_step"] is None


def test_presets_and_layers_note():
    s = ep.resolve_shape("llama3-70b-layers")
    assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim, s.vocab) == (8192, 8, 64, 8, 28672, 128256)
    assert "8 of 80 layers" in ep.shape_note(s)
    assert "12 of 80 layers" in ep.shape_note(ep.resolve_shape("llama3-70b-layers", layers=12))
    s8 = ep.resolve_shape("llama3-8b")
    assert (s8.dim, s8.n_layers, s8.n_heads, s8.n_kv_heads, s8.head_dim, s8.ffn_dim, s8.vocab, s8.tied) == \
        (4096, 32, 32, 8, 128, 14336, 128256, False)
    sm = ep.resolve_shape("smollm2-135m")
    assert (sm.dim, sm.n_layers, sm.n_heads, sm.n_kv_heads, sm.head_dim, sm.ffn_dim, sm.vocab, sm.tied) == \
        (576, 30, 9, 3, 64, 1536, 49152, True)
    assert ep.shape_note(s8) == ""
    # tinygemm constraints on the presets' input dims: SmolLM2's 576 needs group 64 and 4 inner k-tiles
    assert ep.int4_group_size(4096) == 128 and ep.int4_group_size(576) == 64
    assert ep.int4_inner_k_tiles(14336) == 8 and ep.int4_inner_k_tiles(576) == 4


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                    reason="torch without the CPU int4 kernel")
@pytest.mark.parametrize("group", [64, 128])
def test_int4_scales_and_zeros_convention(group):
    """quantize_int4_groupwise's scales_and_zeros follow torch's int4pack convention: the CPU kernel
    (same [k/g, n, 2] layout as the CUDA tinygemm one) reproduces x @ dequant(W)^T."""
    torch.manual_seed(3)
    n, k = 64, 256
    w = torch.randn(n, k) * 0.02
    q, saz = ep.quantize_int4_groupwise(w, group)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert saz.shape == (k // group, n, 2)
    deq = ep.dequantize_int4_groupwise(q, saz, group)
    assert ep._rel_err(deq, w) < 0.15  # 4-bit RTN on gaussians
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(3, k)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, saz)
    assert ep._rel_err(y, x @ deq.t()) < 1e-5


def test_cli_smoke_cpu(tmp_path):
    out = tmp_path / "peers.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--variants", "bf16",
                        "int4", "--prefill", "--prefill-tokens", "64", "--prefill-reps", "2", "--position", "32",
                        "--iters", "2", "--reps", "3", "--warmup", "1", "--check", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "| preset | variant | us/step | tok/s | bytes/step | % HBM roofline | prefill tok/s |" in p.stdout
    assert "| tiny | int4 | unavailable |" in p.stdout
    assert "decode at position 32" in p.stdout
    recs = json.loads(out.read_text())
    assert [(r["preset"], r["variant"], r["available"]) for r in recs] == [("tiny", "bf16", True),
                                                                          ("tiny", "int4", False)]
    assert recs[0]["torch_version"] == torch.__version__ and recs[0]["date"]


def test_imports_and_reports_without_torch():
    code = ("import sys, importlib.util; sys.modules['torch'] = None\n"
            f"spec = importlib.util.spec_from_file_location('ep', {str(SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "r = m.measure_peer('llama3-8b', 'bf16')\n"
            "assert m.TORCH_AVAILABLE is False and r['available'] is False, r\n"
            "assert 'torch' in r['error'] and r['torch_version'] is None\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                    reason="torch without the CPU int4 kernel")
def test_int4_model_path_with_the_cpu_kernel(monkeypatch):
    """The int4 variant's model path (quantize, pack with the uint8-then-int32 fallback, self-check,
    forward) run with torch's CPU int4 ops standing in for the CUDA ones: decode == full forward."""
    monkeypatch.setattr(ep, "_int4_ops", lambda: (torch.ops.aten._convert_weight_to_int4pack_for_cpu,
                                                  torch.ops.aten._weight_int4pack_mm_for_cpu))
    shape = dict(SHAPES["gqa"], dim=128, ffn_dim=256)
    m = ep.PeerModel(ep.resolve_shape(shape), "int4", "cpu", torch.float32, 32, group_size=128)
    assert m.info["int4_pack_input"] == "int32[n,k]"  # the CPU op refuses uint8; the fallback is taken
    assert m.info["int4_check_rel_err"] < 1e-2
    lin = m.layers[0].w13
    assert isinstance(lin, ep.Int4Linear) and lin.group_size == 128
    held = sum(t.numel() * t.element_size() for t in lin.tensors())
    assert held == 2 * 256 * 128 // 2 + (128 // 128) * 2 * 256 * 2 * 2  # nibbles + bf16 scales/zeros
    torch.manual_seed(4)
    tokens = torch.randint(0, shape["vocab"], (9,))
    with torch.no_grad():
        full = m.forward(tokens, 0)
        steps = torch.cat([m.forward(tokens[i:i + 1], i) for i in range(9)])
    torch.testing.assert_close(steps, full, rtol=2e-2, atol=2e-3)  # bf16 activations in the int4 linears


def test_measure_peer_accepts_the_engine_bench_keyword_names():
    """decdec/bench_engine.py calls measure_peer(preset, variant, pos=..., n_layers=...)."""
    r = ep.measure_peer("tiny", "bf16", device="cpu", pos=7, n_layers=1, iters=1, reps=1, warmup=0,
                        raise_errors=True)
    assert r["position"] == 7 and r["n_layers"] == 1 and r["available"]
