"""bench/residual_precision.py: its NumPy stand-in layer equals DecLinear at 4 bits (same k_chunk,
same selection rule) on real activations, its b-bit scale search is the cheatsheet's at b = 4, and
every format's bytes stay within the 4-bit default's."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import residual_precision as rp  # noqa: E402
from decdec import formats, pipeline  # noqa: E402
from decdec.cheatsheet import build_cheatsheet, residual_scales  # noqa: E402
from decdec.layer import make_declinear  # noqa: E402


def _tables_from_cheatsheet(cs):
    return {4: (formats.unpack_residual(cs.codes), cs.scales)}


def _check_layer(qw, cs, thresholds, X, k_chunk, selection):
    """The stand-in at the 4-bit default schedule vs DecLinear on the same activations X."""
    lin = make_declinear(qw, cs, thresholds, k_chunk=k_chunk, selection=selection)
    W = np.ascontiguousarray(qw.dequantize(), np.float32)
    sched = rp.layer_schedules(qw.in_features, k_chunk, "4")
    std = rp.ResidualLinear(W, _tables_from_cheatsheet(cs), thresholds, sched, selection)
    assert std.fetch_nbytes == lin.fetch_nbytes
    quotas = formats.chunk_quotas(qw.in_features, k_chunk)
    sel = np.concatenate(rp.select_ranked(X, thresholds, quotas, selection), axis=1)
    for t in range(0, len(X), max(1, len(X) // 16)):     # the same channels as the C layer
        assert np.array_equal(np.sort(sel[t]), np.sort(np.asarray(lin.select(X[t])))), t
    y_ref = lin.forward(X)
    y = std.forward(X)
    scale = np.abs(y_ref).max()
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5 * scale)
    comp = y_ref - X @ W.T                      # the compensation itself matches too
    np.testing.assert_allclose(y - X @ W.T, comp, rtol=0, atol=2e-5 * max(np.abs(comp).max(), 1e-30))


def test_scale_search_is_the_cheatsheets_at_4_bits():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 160)).astype(np.float32)
    W_hat = (np.round(W * 2) / 2).astype(np.float32)
    R = (W.astype(np.float64) - W_hat).T
    assert np.array_equal(rp.residual_scales_bits(R, 4), residual_scales(R))
    codes, scales = rp.quantize_residual(R, 4)
    cs = build_cheatsheet(W, W_hat)
    assert np.array_equal(formats.pack_residual(codes), cs.codes) and np.array_equal(scales, cs.scales)
    for b in rp.RESIDUAL_BITS:          # more bits, smaller error; codes in range
        c, s = rp.quantize_residual(R, b)
        assert np.abs(c).max() <= rp.max_code(b)
    errs = [np.sum((rp.quantize_residual(R, b)[0] * rp.quantize_residual(R, b)[1].astype(np.float64)
                    - R) ** 2) for b in rp.RESIDUAL_BITS]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("k", [8, 16, 32, 100])
@pytest.mark.parametrize("d_in", [96, 576, 1536, 2048, 2100])
def test_schedules_spend_at_most_the_4bit_bytes(k, d_in):
    base = rp.layer_fetch_bytes(d_in, 64, k, "4")
    for fmt in rp.FORMATS:
        scheds = rp.layer_schedules(d_in, k, fmt)
        for s, q4 in zip(scheds, formats.chunk_quotas(d_in, k)):
            assert sum(s) <= 4 * q4 and 4 * q4 - sum(s) <= 1     # at most one bit-row short
            assert s == sorted(s, reverse=True)                   # more bits for higher ranks
        assert rp.layer_fetch_bytes(d_in, 64, k, fmt) <= base


@pytest.fixture(scope="module", params=["rtn", "awq"])
def tiny_qm(request):
    from tiny_llama import calib_tokens, tiny_weights
    w = tiny_weights()
    return w, pipeline.quantize_model(w, calib_tokens(), 3, method=request.param, n_windows=2,
                                      progress=False)


def _inputs(model, tokens):
    xs = {}

    def hook(l, name, x):
        xs[(l, name)] = np.array(x, np.float32)
    model.forward(tokens, hook=hook)
    return xs


@pytest.mark.parametrize("selection", ["bucket", "exact"])
def test_standin_equals_declinear_tiny(tiny_qm, selection):
    from tiny_llama import calib_tokens
    w, qm = tiny_qm
    xs = _inputs(pipeline.build_model(qm, k_chunk=64), calib_tokens(200, seed=7))
    for (l, name), X in xs.items():
        ql = qm.blocks[l].linears[name]
        for k in (32, 64, 200):
            _check_layer(ql.qweight, ql.cheatsheet, ql.thresholds, X, k, selection)


def test_standin_model_logits_tiny(tiny_qm, tmp_path):
    from tiny_llama import calib_tokens
    w, qm = tiny_qm
    tables = rp.residual_tables(qm, w, tmp_path, "tiny", progress=False)   # checks 4-bit == stored
    toks = calib_tokens(120, seed=9)
    real = pipeline.build_model(qm, k_chunk=64).forward(toks)
    std = rp.standin_model(qm, rp.dequantized_base(qm), tables, 64, "4").forward(toks)
    np.testing.assert_allclose(std, real, rtol=0, atol=1e-4 * np.abs(real).max())
    other = rp.standin_model(qm, rp.dequantized_base(qm), tables, 64, "2").forward(toks)
    assert np.isfinite(other).all() and not np.allclose(other, real)
    again = rp.residual_tables(qm, w, tmp_path, "tiny", progress=False)     # the cached copy
    assert all(np.array_equal(again[key][b][0], tables[key][b][0]) for key in tables for b in tables[key])


def _cached_gguf():
    from decdec.fetch import default_cache_dir
    p = default_cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        pytest.skip("SmolLM2 GGUF not cached")
    return p


def test_standin_equals_declinear_smollm2():
    """Real activations: SmolLM2's layer inputs on Emma, layers quantized to 3-bit RTN, thresholds
    calibrated on the same text, DecLinear vs the stand-in at k_chunk 8 and 16 (bucket)."""
    from decdec import data
    from decdec.calibrate import calibrate_thresholds
    from decdec.loaders import load_gguf
    from decdec.model import LlamaModel
    from decdec.quantize import quantize_rtn
    weights, tok = load_gguf(_cached_gguf())
    xs = _inputs(LlamaModel(weights), np.asarray(tok.encode(data.text("emma"))[:192]))
    for l in (0, 15, 29):
        for name in pipeline.LINEAR_NAMES:
            X = xs[(l, name)]
            W = weights.layers[l][name]
            qw = quantize_rtn(W, 3, 128)
            cs = build_cheatsheet(W, qw.dequantize())
            t = calibrate_thresholds(X[:128])
            for k in (8, 16):
                _check_layer(qw, cs, t, X[128:], k, "bucket")
