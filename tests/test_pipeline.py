"""Quantization pipeline: residuals in the layer's own basis, thresholds, 3.5-bit selection, and the
real model's perplexity ordering."""
import dataclasses

import numpy as np
import pytest

from decdec import awq, pipeline
from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate, log_softmax
from decdec.model import LINEAR_NAMES, LlamaModel
from tiny_llama import calib_tokens, tiny_weights

FAST_ALPHA = (0.0, 0.25, 0.5, 0.75)
FAST_CLIP = (1.0, 0.9, 0.8, 0.7)


@pytest.fixture(scope="module")
def tiny():
    return tiny_weights()


@pytest.fixture(scope="module", params=["rtn", "awq"])
def quantized(request, tiny):
    qms = pipeline.quantize_models(tiny, calib_tokens(), (3, 3.5, 4), method=request.param,
                                   n_windows=2, sensitivity_tokens=64, progress=False,
                                   alpha_grid=FAST_ALPHA, clip_grid=FAST_CLIP)
    return request.param, qms


class _FullResidual:
    """A layer with every input channel selected and the exact (unquantized) residual:
    W_hat x + (W_folded - W_hat) x, in float64."""

    def __init__(self, qw, W_folded):
        self.W_hat = qw.dequantize().astype(np.float64)
        self.R = np.asarray(W_folded, np.float64) - self.W_hat

    def forward(self, x):
        x = np.asarray(x, np.float64)
        return (x @ self.W_hat.T + x @ self.R.T).astype(np.float32)


def _folded_layers(w, qm):
    return [awq.fold_layer(layer, blk.scales, w.config) for layer, blk in zip(w.layers, qm.blocks)]


def test_full_unquantized_residual_reproduces_reference(tiny, quantized):
    """With every channel selected and unquantized residuals the model is the reference (AWQ
    folding included); the quantized model alone is not."""
    method, qms = quantized
    tokens = np.random.default_rng(7).integers(0, 256, 48)
    ref = LlamaModel(tiny).forward(tokens).astype(np.float64)
    for bits, qm in qms.items():
        folded = _folded_layers(tiny, qm)
        linears = {(l, n): _FullResidual(qm.blocks[l].linears[n].qweight, folded[l][n])
                   for l in range(len(folded)) for n in LINEAR_NAMES}
        model = LlamaModel(pipeline._weights_with_blocks(qm, dequantized=False), linears)
        got = model.forward(tokens).astype(np.float64)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (method, bits)
        base = pipeline.build_model(qm, 0).forward(tokens)
        assert np.abs(base - ref).max() > 1e-2 * np.abs(ref).max()


def test_cheatsheet_is_residual_of_folded_weights(tiny, quantized):
    method, qms = quantized
    qm = qms[3]
    folded = _folded_layers(tiny, qm)
    for l, blk in enumerate(qm.blocks):
        for n, ql in blk.linears.items():
            R = (folded[l][n].astype(np.float64) - ql.qweight.dequantize()).T   # [d_in, d_out]
            R_hat = ql.cheatsheet.dequantize().astype(np.float64)
            step = ql.cheatsheet.scales.astype(np.float64)
            # 4-bit symmetric codes: within half a step unless clipped at +-7 (then within |R| range)
            assert np.all(np.abs(R_hat - R) <= 0.5 * step + 1e-7 + np.maximum(0, np.abs(R) - 7 * step))


def test_declinear_compensation_moves_toward_reference(tiny, quantized):
    """Real DecLinear layers: KL to the reference falls as k_chunk grows, and with every channel
    selected (k_chunk 1024) it is far below the uncompensated model's."""
    method, qms = quantized
    tokens = np.random.default_rng(8).integers(0, 256, 64)
    ref = log_softmax(LlamaModel(tiny).forward(tokens))
    model = pipeline.build_model(qms[3], 0)
    kls = []
    for k in (0, 64, 1024):
        pipeline.set_compensation(model, k, "exact")
        lp = log_softmax(model.forward(tokens))
        kls.append(float((np.exp(ref) * (ref - lp)).sum(1).mean()))
    assert kls[0] > kls[1] > kls[2]
    assert kls[2] < 0.05 * kls[0]


def test_thresholds_are_envelopes_in_the_folded_basis(tiny, quantized):
    """Thresholds = max over calibration tokens of the r-th largest |x| of what the quantized layer
    receives: the folded float model's layer inputs, recomputed here in float64."""
    method, qms = quantized
    qm = qms[4]
    folded = dataclasses.replace(tiny, layers=_folded_layers(tiny, qm))
    seen = {}

    def hook(l, name, x):
        a = -np.sort(-np.abs(np.asarray(x, np.float64)), axis=1)
        seen[(l, name)] = np.maximum(seen.get((l, name), 0), a.max(0))

    for w in pipeline.calibration_windows(calib_tokens(), 2):
        LlamaModel(folded).forward(w, hook=hook)
    for (l, name), env in seen.items():
        th = qm.blocks[l].linears[name].thresholds
        assert np.all(np.diff(th) <= 0)
        np.testing.assert_allclose(th, env, rtol=2e-4, atol=1e-6)


def test_three_and_a_half_bits(tiny, quantized):
    method, qms = quantized
    qm = qms[3.5]
    n = len(tiny.layers)
    assert sorted(qm.bits_per_layer) == [3] * (n // 2) + [4] * (n - n // 2)
    sens = np.asarray(qm.calibration["sensitivity_kl"])
    four = [l for l, b in enumerate(qm.bits_per_layer) if b == 4]
    three = [l for l, b in enumerate(qm.bits_per_layer) if b == 3]
    assert sens[four].min() >= sens[three].max()
    assert qm.mean_bits == pytest.approx(3.5, abs=0.25)
    assert qms[3].mean_bits == 3 and qms[4].mean_bits == 4
    # blocks are shared with the uniform models, not recomputed
    for l in range(n):
        src = qms[qm.bits_per_layer[l]]
        assert qm.blocks[l] is src.blocks[l]


def test_byte_accounting(quantized):
    """Hand-derived bytes of the tiny model (4 blocks; wq/wo 96->96, wk/wv 96->32, gate/up 96->160,
    down 160->96; group 128, d_in padded to 128 / 256), and the same totals from the arrays the
    quantizer actually produced."""
    _, qms = quantized
    qm = qms[3]
    c = qm.config
    # per token at k_chunk 8: a partial chunk of 96 or 160 takes round(8 * L / 1024) = 1 row of
    # d_out / 2 bytes: 48 + 16 + 16 + 48 + 80 + 80 + 48 = 336 per block
    assert qm.residual_bytes_per_token(8) == 4 * 336
    # k_chunk 16: 2 rows of the 96-wide inputs, round(16 * 160 / 1024) = 3 rows of w_down's 48 bytes:
    # 96 + 32 + 32 + 96 + 160 + 160 + 144 = 720 per block
    assert qm.residual_bytes_per_token(16) == 4 * 720
    assert qm.residual_bytes_per_token(0) == 0
    # residual codes in host memory, d_in * d_out / 2 per linear:
    # 2 * 96*48 + 2 * 96*16 + 2 * 96*80 + 160*48 = 35328 per block
    assert qm.residual_host_bytes() == 4 * 35328
    # GPU-resident per linear: d_out * d_in_pad * bits / 8 + 4 * d_out * groups (fp16 scales and
    # zeros) + 4 * d_in (thresholds) + 2 * d_out (residual scales).  3 bit:
    # wq/wo 5568, wk/wv 2112, gate/up 9024, down 96*96 + 768 + 640 + 192 = 10816 -> 44224 per block
    # 4 bit: wq/wo 7104, wk/wv 2624, gate/up 11584, down 13888 -> 56512 per block
    assert qms[3].gpu_bytes()["linears"] == 4 * 44224
    assert qms[4].gpu_bytes()["linears"] == 4 * 56512
    assert qms[3.5].gpu_bytes()["linears"] == 2 * 44224 + 2 * 56512
    # the same numbers from the arrays themselves
    for q in qms.values():
        lins = [ql for b in q.blocks for ql in b.linears.values()]
        assert q.gpu_bytes()["linears"] == sum(
            ql.qweight.qweight.nbytes + ql.qweight.scales.nbytes + ql.qweight.zeros.nbytes
            + ql.cheatsheet.scales.nbytes + ql.thresholds.nbytes for ql in lins)
        assert q.residual_host_bytes() == sum(ql.cheatsheet.codes.nbytes for ql in lins)
    # fp16 embeddings + untied head (300 x 96 each) + 2 norms per block + the final norm
    assert c.vocab_size == 300 and c.dim == 96 and c.n_layers == 4 and not c.tie_embeddings
    assert qm.gpu_bytes()["other"] == 2 * 300 * 96 * 2 + 2 * 96 * 9
    assert qm.gpu_bytes()["total"] == qm.gpu_bytes()["linears"] + qm.gpu_bytes()["other"]


def test_with_compensation_shares_weights_and_leaves_the_model_alone(quantized):
    _, qms = quantized
    qm = qms[3]
    tokens = np.random.default_rng(11).integers(0, 256, 12)
    model = pipeline.build_model(qm, 0)
    k8 = pipeline.with_compensation(model, 8, "exact")
    assert k8.weights is model.weights
    for key, lin in model.linears.items():
        assert (lin.k_chunk, lin.selection) == (0, "bucket")
        assert (k8.linears[key].k_chunk, k8.linears[key].selection) == (8, "exact")
        # with_settings: the same residual buffer, not a copy
        assert np.shares_memory(k8.linears[key].residual_codes, lin.residual_codes)
    np.testing.assert_array_equal(k8.forward(tokens), pipeline.build_model(qm, 8, "exact").forward(tokens))
    np.testing.assert_array_equal(model.forward(tokens), pipeline.build_model(qm, 0).forward(tokens))
    # evaluate runs its configs on such copies: the model it was given keeps its settings
    evaluate(LlamaModel(pipeline._weights_with_blocks(qm, dequantized=True)),
             [EvalConfig("k16", model, 16, "bucket")], tokens, PerplexityProtocol(8, 7, 7),
             bos_id=0, progress=False)
    assert all(lin.k_chunk == 0 for lin in model.linears.values())


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="method"):
        pipeline.quantize_model(tiny, calib_tokens(), 3, method="gptq")
    with pytest.raises(ValueError, match="bits"):
        pipeline.quantize_model(tiny, calib_tokens(), 2)
    with pytest.raises(ValueError, match="fewer than"):
        pipeline.quantize_model(tiny, calib_tokens(100), 3, n_windows=2)
    with pytest.raises(ValueError, match="group_size"):
        pipeline.quantize_model(tiny, calib_tokens(), 3, group_size=32)


# ----------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_model_perplexity_ordering(smollm2):
    """SmolLM2, AWQ (a coarse search grid to keep CI short), calibrated on 1 window of 512 Emma
    tokens, on the first 383 tokens of Persuasion (one window, BOS + 383):
    reference < 4-bit < 3-bit, and 3-bit + DecDEC k8 < 3-bit."""
    from decdec import data
    weights, tok = smollm2
    qms = pipeline.quantize_models(weights, tok.encode(data.text("emma")[:20000]), (3, 4),
                                   method="awq", n_windows=1, progress=False,
                                   alpha_grid=(0.0, 0.5), clip_grid=(1.0, 0.85))
    m3, m4 = pipeline.build_model(qms[3]), pipeline.build_model(qms[4])
    configs = [EvalConfig("ref", None), EvalConfig("4", m4, 0), EvalConfig("3", m3, 0),
               EvalConfig("3+k8", m3, 8, "bucket")]
    text = tok.encode(data.text("persuasion")[:20000])
    r = {x["name"]: x for x in evaluate(LlamaModel(weights), configs, text,
                                        PerplexityProtocol(384, 383, 383), progress=False)}
    assert r["ref"]["perplexity"] < r["4"]["perplexity"] < r["3"]["perplexity"]
    assert r["3+k8"]["perplexity"] < r["3"]["perplexity"]
    assert r["3+k8"]["kl"] < r["3"]["kl"]


@pytest.mark.slow
def test_real_model_awq_folding_exact(smollm2):
    """The real model's AWQ-folded float weights compute the reference logits."""
    from decdec import data
    weights, tok = smollm2
    tokens = tok.encode(data.text("persuasion")[:2000])[:64]
    rng = np.random.default_rng(0)
    layers = [awq.fold_layer(layer, _random_like(weights.config, rng), weights.config)
              for layer in weights.layers]
    ref = LlamaModel(weights).forward(tokens).astype(np.float64)
    got = LlamaModel(dataclasses.replace(weights, layers=layers)).forward(tokens).astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def _random_like(config, rng):
    expand, _ = awq.gqa_expand(config)
    return awq.LayerScales(np.exp(rng.normal(0, 0.3, config.dim)).astype(np.float32),
                           expand(np.exp(rng.normal(0, 0.3, config.n_kv_heads * config.head_dim))).astype(np.float32),
                           np.exp(rng.normal(0, 0.3, config.dim)).astype(np.float32),
                           np.exp(rng.normal(0, 0.3, config.ffn_dim)).astype(np.float32))
