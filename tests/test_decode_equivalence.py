"""DecDEC evaluated on one windowed pass equals DecDEC applied token by token at decode.

SmolLM2-135M-Instruct with all 210 linear layers replaced by 3-bit RTN DecLinear objects
(group 128, k_chunk 8, bucket selection, thresholds from two short Emma windows). Decoding a
64-token Persuasion sequence one token at a time through the KV cache must give the logits of one
windowed forward over the whole sequence. Why it holds: DecLinear.forward compensates each row of
a [T, d_in] block from that row alone (the selection S(x_t) reads only x_t and the fixed
thresholds), and the rest of the model is causal. What remains is float32 rounding outside the
linear layers (attention over a [T, T] block versus a growing cache, RMSNorm on other shapes);
the tolerance below bounds that, and a selection flip (a channel near a bucket floor landing on
the other side after rounding) is ruled out directly by comparing the selected channel sets.
"""
from __future__ import annotations

import numpy as np
import pytest

from decdec import data
from decdec.calibrate import ThresholdCalibrator
from decdec.cheatsheet import build_cheatsheet
from decdec.layer import make_declinear
from decdec.model import LINEAR_NAMES, LlamaModel
from decdec.quantize import quantize_rtn
from decdec.reference import reference_forward

BITS, GROUP, K_CHUNK = 3, 128, 8
# The residual scale search tries 8 candidates instead of 32: the cheatsheet's quality is not what
# this test is about, and it saves ~10 s of quantization on a 2-core machine.
SCALE_CANDIDATES = 8
SEQ_LEN = 64            # BOS + 63 text tokens
TEXT_OFFSET = 1000      # past Persuasion's title page, into running prose
CALIB_WINDOWS, CALIB_LEN = 2, 256
# Measured max |decode - windowed| on these logits: 5.9e-5 (|logits| up to ~39, i.e. 1.5e-6
# relative, a dozen fp32 ulps). The bound leaves ~17x headroom for other BLAS builds; a single
# selection flip moves logits by ~1e-2 and more, so it could not hide under it.
LOGIT_ATOL = 1e-3


def _text(name: str) -> str:
    return data.text(name)  # shipped with the package (decdec/data)


@pytest.fixture(scope="module")
def quantized(smollm2):
    """(reference model, DecDEC model, its DecLinears, their (qweight, cheatsheet), eval ids)."""
    weights, tok = smollm2
    bos = weights.config.bos_id
    reference = LlamaModel(weights)

    calibrators = {}

    def calibrate(layer, name, x):
        calibrators.setdefault((layer, name), ThresholdCalibrator(x.shape[1])).update(x)

    emma = tok.encode(_text("emma")[:40000])
    step = CALIB_LEN - 1
    for w in range(CALIB_WINDOWS):
        reference.forward(np.concatenate([[bos], emma[w * step:(w + 1) * step]]), hook=calibrate)

    linears, pieces = {}, {}
    for i, layer in enumerate(weights.layers):
        for name in LINEAR_NAMES:
            W = layer[name]
            qw = quantize_rtn(W, BITS, GROUP)
            cs = build_cheatsheet(W, qw.dequantize(), candidates=SCALE_CANDIDATES)
            pieces[(i, name)] = (qw, cs)
            linears[(i, name)] = make_declinear(qw, cs, calibrators[(i, name)].thresholds,
                                                k_chunk=K_CHUNK)
    assert len(linears) == 210

    pers = tok.encode(_text("persuasion")[:40000])
    ids = np.concatenate([[bos], pers[TEXT_OFFSET:TEXT_OFFSET + SEQ_LEN - 1]]).astype(np.int64)
    return reference, LlamaModel(weights, linears), linears, pieces, ids


def _recording(store):
    def hook(layer, name, x):
        store.setdefault((layer, name), []).append(np.array(x, copy=True))
    return hook


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    L = logits[:-1].astype(np.float64)
    top = L.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(L - top).sum(axis=1)) + top[:, 0]
    return float(np.exp(np.mean(log_z - L[np.arange(len(L)), ids[1:]])))


@pytest.fixture(scope="module")
def both_passes(quantized):
    """DecDEC logits and linear inputs of one windowed pass and of token-by-token decoding."""
    _, model, linears, _, ids = quantized
    for lin in linears.values():
        lin.k_chunk = K_CHUNK
    win_inputs, dec_inputs = {}, {}
    windowed = model.forward(ids, hook=_recording(win_inputs))
    cache = model.new_cache(len(ids))
    decoded = np.concatenate([model.forward(ids[t:t + 1], cache=cache, hook=_recording(dec_inputs))
                              for t in range(len(ids))])
    return windowed, decoded, win_inputs, dec_inputs


def test_decode_selects_the_same_channels_as_the_windowed_pass(quantized, both_passes):
    _, _, linears, _, ids = quantized
    _, _, win_inputs, dec_inputs = both_passes
    compared = 0
    for key, lin in linears.items():
        X_win = win_inputs[key][0]
        X_dec = np.concatenate(dec_inputs[key])
        assert X_win.shape == X_dec.shape == (len(ids), lin.in_features)
        for t in range(len(ids)):
            s_win, s_dec = lin.select(X_win[t]), lin.select(X_dec[t])
            assert len(s_win) > 0
            assert np.array_equal(s_win, s_dec), f"selection differs at layer {key}, token {t}"
            compared += 1
    assert compared == 210 * len(ids)


def test_decode_logits_equal_windowed_logits(both_passes):
    windowed, decoded, _, _ = both_passes
    assert windowed.shape == decoded.shape
    assert np.isfinite(windowed).all() and np.isfinite(decoded).all()
    worst = float(np.abs(windowed - decoded).max())
    assert worst <= LOGIT_ATOL, f"max |decode - windowed| = {worst:.3g} > {LOGIT_ATOL}"
    # the same next-token prediction everywhere
    assert np.array_equal(windowed.argmax(axis=1), decoded.argmax(axis=1))


def test_rows_of_a_block_are_compensated_independently(quantized):
    """The property the equivalence rests on, per layer: forward on [T, d_in] equals T one-row
    forwards bit for bit, and both match the float64 reference of per-token compensation."""
    _, _, linears, pieces, _ = quantized
    rng = np.random.default_rng(0)
    for key in ((0, "wq"), (7, "wo"), (15, "w_up"), (29, "w_down")):
        lin = linears[key]
        lin.k_chunk = K_CHUNK
        X = (rng.standard_t(3, size=(12, lin.in_features)) * 2).astype(np.float32)
        block = lin.forward(X)
        rows = np.concatenate([lin.forward(X[t:t + 1]) for t in range(len(X))])
        np.testing.assert_array_equal(block, rows)
        qw, cs = pieces[key]
        expected = reference_forward(qw, cs, lin.thresholds, X, K_CHUNK)
        # fp32 accumulation over d_in terms of size ~|x||w|: a few 1e-6 relative to the scale
        scale = np.abs(X).astype(np.float64) @ np.abs(qw.dequantize().astype(np.float64)).T
        assert np.all(np.abs(block - expected) <= 1e-5 * scale + 1e-6), key


def test_perplexity_order_reference_decdec_plain_3bit(quantized, both_passes):
    reference, model, linears, _, ids = quantized
    windowed, _, _, _ = both_passes
    ppl_reference = _perplexity(reference.forward(ids), ids)
    ppl_decdec = _perplexity(windowed, ids)
    try:
        for lin in linears.values():
            lin.k_chunk = 0
        ppl_3bit = _perplexity(model.forward(ids), ids)
    finally:
        for lin in linears.values():
            lin.k_chunk = K_CHUNK
    assert ppl_reference < ppl_decdec < ppl_3bit, (ppl_reference, ppl_decdec, ppl_3bit)
