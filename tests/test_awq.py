"""AWQ: exact folding, quantization grids, and searches that never lose to their starting point.
Every quantity is checked against a float64 NumPy computation written here."""
import dataclasses

import numpy as np
import pytest

from decdec import awq
from decdec.model import LlamaModel
from decdec.quantize import quantize_with_params
from tiny_llama import tiny_weights


def _random_scales(config, rng):
    expand, _ = awq.gqa_expand(config)
    s_v = np.exp(rng.normal(0, 0.5, config.n_kv_heads * config.head_dim))
    return awq.LayerScales(np.exp(rng.normal(0, 0.5, config.dim)).astype(np.float32),
                           expand(s_v).astype(np.float32),
                           np.exp(rng.normal(0, 0.5, config.dim)).astype(np.float32),
                           np.exp(rng.normal(0, 0.5, config.ffn_dim)).astype(np.float32))


def test_folding_is_exact():
    """Scales folded into norms / v / up leave the model's function unchanged (float rounding only)."""
    w = tiny_weights()
    rng = np.random.default_rng(3)
    folded = dataclasses.replace(w, layers=[awq.fold_layer(layer, _random_scales(w.config, rng), w.config)
                                            for layer in w.layers])
    tokens = np.random.default_rng(4).integers(0, 256, 40)
    ref = LlamaModel(w).forward(tokens).astype(np.float64)
    got = LlamaModel(folded).forward(tokens).astype(np.float64)
    assert np.abs(got - ref).max() <= 2e-4 * np.abs(ref).max()
    # and the folding really changed the weights
    assert np.abs(folded.layers[0]["wq"] - w.layers[0]["wq"]).max() > 1e-2


def test_fold_refuses_untied_gqa_scales():
    w = tiny_weights()
    s = awq.LayerScales.identity(w.config)
    s.o_in = s.o_in.copy()
    s.o_in[0] = 2.0   # head 0 scaled but not the other heads sharing its value head
    with pytest.raises(ValueError, match="tied"):
        awq.fold_layer(w.layers[0], s, w.config)


def test_fold_scales_v_bias():
    w = tiny_weights()
    layer = dict(w.layers[0], bv=np.ones(w.config.n_kv_heads * w.config.head_dim, np.float32))
    s = _random_scales(w.config, np.random.default_rng(0))
    out = awq.fold_layer(layer, s, w.config)
    group = w.config.n_heads // w.config.n_kv_heads
    s_v = s.o_in.reshape(w.config.n_kv_heads, group, w.config.head_dim)[:, 0].reshape(-1)
    np.testing.assert_allclose(out["bv"], 1.0 / s_v, rtol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("d_in", [96, 256, 200])
def test_group_params_grid(bits, d_in):
    """Codes span the clipped [min, max] of each group: error <= half a step, and the fake
    quantizer equals the packed QuantizedWeight's dequantization."""
    rng = np.random.default_rng(bits * 1000 + d_in)
    W = rng.standard_normal((64, d_in)).astype(np.float32)
    scales, zeros = awq.group_params(W, bits, 128)
    qw = quantize_with_params(W, scales, zeros, bits, 128)
    W_hat = qw.dequantize().astype(np.float64)
    np.testing.assert_allclose(awq.fake_quantize(W, bits, 128), W_hat, rtol=0, atol=1e-6)
    step = np.repeat(scales.astype(np.float64), 128, axis=1)[:, :d_in]
    # half a step, plus the fp16 rounding of the zero point (|dz| <= 2^-11 |z|, z <= 2^bits - 1)
    bound = step * (0.5 + (2 ** bits) * 2.0 ** -11) + 1e-6
    assert np.all(np.abs(W_hat - W) <= bound)


def test_output_error_matches_float64():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 96))
    dW = rng.standard_normal((64, 96)) * 0.01
    gram = X.T @ X
    want = ((X @ dW.T) ** 2).sum()
    assert awq.output_error(dW, gram) == pytest.approx(want, rel=1e-4)


def _outlier_activations(rng, T=512, d=96):
    X = rng.standard_normal((T, d))
    X[:, [3, 17, 40]] *= 25.0   # a few salient channels, as in real LLM activations
    return X


@pytest.mark.parametrize("bits", [3, 4])
def test_scale_search_beats_rtn(bits):
    """The searched scales never do worse than RTN (alpha = 0 is in the grid), and with salient
    channels they do strictly better; the error is recomputed here in float64."""
    rng = np.random.default_rng(bits)
    X = _outlier_activations(rng)
    W = [rng.standard_normal((64, 96)).astype(np.float32) / 10, rng.standard_normal((32, 96)).astype(np.float32) / 10]
    gram = X.T @ X
    s, alpha, errors = awq.search_scale(W, gram, np.abs(X).mean(0), bits, 128)
    W_all = np.concatenate(W).astype(np.float64)

    def err(scales):
        Wq = awq.fake_quantize((W_all * scales).astype(np.float32), bits, 128) / scales
        return (((X @ (W_all - Wq).T)) ** 2).sum()

    e_rtn, e_awq = err(np.ones(96)), err(s.astype(np.float64))
    assert e_awq <= e_rtn * (1 + 1e-6)
    assert e_awq < 0.9 * e_rtn
    assert alpha > 0
    assert errors[0] == pytest.approx(e_rtn, rel=1e-3)


def test_clip_search_never_worse_per_group():
    rng = np.random.default_rng(5)
    X = _outlier_activations(rng, d=160)
    W = (rng.standard_t(3, (64, 160)) / 10).astype(np.float32)   # heavy tails: clipping helps
    gram = X.T @ X
    clip = awq.search_clip(W, gram, 3, 128)
    assert clip.shape == (64, 2) and np.all((clip >= 0.5) & (clip <= 1.0))
    assert np.any(clip < 1.0)

    def group_err(Wq):
        d = np.zeros((64, 256))
        d[:, :160] = W.astype(np.float64) - Wq
        Xp = np.zeros((len(X), 256))
        Xp[:, :160] = X
        return np.stack([((Xp[:, g * 128:(g + 1) * 128] @ d[:, g * 128:(g + 1) * 128].T) ** 2).sum(0)
                         for g in range(2)], axis=1)

    e_clip = group_err(awq.fake_quantize(W, 3, 128, clip))
    e_none = group_err(awq.fake_quantize(W, 3, 128))
    assert np.all(e_clip <= e_none * (1 + 1e-5) + 1e-9)
    assert e_clip.sum() < e_none.sum()


def test_scaled_gram():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 8))
    s = rng.uniform(0.5, 2, 8)
    np.testing.assert_allclose(awq.scaled_gram(X.T @ X, s), (X / s).T @ (X / s), rtol=1e-12)


def test_normalised_scales():
    s = awq.normalised_scales(np.array([0.1, 1.0, 10.0]), 0.5)
    assert np.sqrt(s.max() * s.min()) == pytest.approx(1.0)
    np.testing.assert_allclose(awq.normalised_scales(np.array([0.1, 5.0]), 0.0), [1.0, 1.0])
