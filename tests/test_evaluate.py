"""Evaluation protocol: windows, perplexity / KL / top-1 against float64 recomputation, DecDEC applied
per token exactly as at decode, and the sweep report files."""
import json
import math

import numpy as np
import pytest

from decdec import evaluate as ev
from decdec import pipeline
from decdec.model import LlamaModel
from tiny_llama import calib_tokens, tiny_weights


@pytest.fixture(scope="module")
def tiny():
    return tiny_weights()


@pytest.fixture(scope="module")
def qm3(tiny):
    return pipeline.quantize_model(tiny, calib_tokens(), 3, method="rtn", n_windows=2, progress=False)


@pytest.mark.parametrize("context,stride,n", [(8, 7, 30), (8, 3, 30), (16, 15, 15), (5, 1, 9)])
def test_windows_score_every_token_once(context, stride, n):
    toks = np.arange(100, 100 + n)
    proto = ev.PerplexityProtocol(context, stride, n)
    scored = []
    for ids, first in ev.eval_windows(toks, proto, bos_id=1):
        assert ids[0] == 1 and len(ids) <= context
        targets = ids[1:]
        # every scored target has at least min(position, context - 1 - stride) tokens of history
        scored.extend(targets[first:].tolist())
    assert scored == toks.tolist()


def test_protocol_validation():
    with pytest.raises(ValueError, match="stride"):
        ev.PerplexityProtocol(8, 8, 10)
    with pytest.raises(ValueError, match="context"):
        ev.PerplexityProtocol(1, 1, 10)
    with pytest.raises(ValueError, match="BOS"):
        ev.eval_windows(np.arange(5), ev.PerplexityProtocol(4, 3, 5), None)


def _lp64(logits):
    z = np.asarray(logits, np.float64)
    return z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))


def test_metrics_match_float64(tiny, qm3):
    toks = np.random.default_rng(0).integers(0, 256, 50)
    proto = ev.PerplexityProtocol(20, 12, 50)
    ref_model = LlamaModel(tiny)
    q_model = pipeline.build_model(qm3, 8, "bucket")
    res = ev.evaluate(ref_model, [ev.EvalConfig("ref", None), ev.EvalConfig("q", q_model, 8, "bucket")],
                      toks, proto, progress=False)
    nll_r = nll_q = kl = 0.0
    agree = n = 0
    for ids, first in ev.eval_windows(toks, proto, tiny.config.bos_id):
        lr = _lp64(ref_model.forward(ids))[:-1][first:]
        lq = _lp64(q_model.forward(ids))[:-1][first:]
        t = ids[1:][first:]
        nll_r -= lr[np.arange(len(t)), t].sum()
        nll_q -= lq[np.arange(len(t)), t].sum()
        kl += (np.exp(lr) * (lr - lq)).sum()
        agree += (lr.argmax(1) == lq.argmax(1)).sum()
        n += len(t)
    assert n == 50 and res[1]["n_tokens"] == 50
    assert res[0]["perplexity"] == pytest.approx(math.exp(nll_r / n), rel=1e-9)
    assert res[0]["kl"] == pytest.approx(0.0, abs=1e-12) and res[0]["top1"] == 1.0
    assert res[1]["perplexity"] == pytest.approx(math.exp(nll_q / n), rel=1e-9)
    assert res[1]["kl"] == pytest.approx(kl / n, rel=1e-9)
    assert res[1]["top1"] == pytest.approx(agree / n)
    assert res[1]["kl"] > 0


@pytest.mark.parametrize("selection", ["bucket", "exact"])
def test_windowed_pass_equals_token_by_token_decode(tiny, qm3, selection):
    """A [T, d_in] DecLinear call compensates each row on its own, so the windowed evaluation pass
    gives the logits of decoding one token at a time with a KV cache."""
    model = pipeline.build_model(qm3, 8, selection)
    ids = np.random.default_rng(1).integers(0, 256, 24)
    full = model.forward(ids)
    cache = model.new_cache(len(ids))
    steps = np.stack([model.forward(ids[i:i + 1], cache=cache)[0] for i in range(len(ids))])
    np.testing.assert_allclose(steps, full, rtol=0, atol=2e-4 * np.abs(full).max())
    # and compensation is really on: it differs from k_chunk 0
    pipeline.set_compensation(model, 0)
    assert np.abs(model.forward(ids) - full).max() > 1e-3


def test_gap_closed():
    assert ev.gap_closed(30.0, 20.0, 10.0) == pytest.approx(0.5)
    assert math.isnan(ev.gap_closed(10.0, 9.0, 10.0))


def _records():
    recs = [{"quantizer": "reference", "bits": 16, "selection": "-", "k_chunk": 0, "perplexity": 10.0,
             "kl": 0.0, "top1": 1.0, "n_tokens": 100, "residual_bytes_per_token": 0}]
    for q, p3, p35 in (("rtn", 40.0, 20.0), ("awq", 20.0, 14.0)):
        for b, base in ((3, p3), (3.5, p35), (4, 12.0)):
            recs.append({"quantizer": q, "bits": b, "selection": "none", "k_chunk": 0,
                         "perplexity": base, "kl": 0.5, "top1": 0.7, "n_tokens": 100})
            for k in (8, 16):
                for sel in ("bucket", "exact"):
                    recs.append({"quantizer": q, "bits": b, "selection": sel, "k_chunk": k,
                                 "perplexity": 10 + (base - 10) * (0.6 if k == 8 else 0.35),
                                 "kl": 0.2, "top1": 0.8, "n_tokens": 100})
    return recs


def test_summary_and_report_files(tmp_path):
    recs = _records()
    summary = {(s["quantizer"], s["selection"]): s for s in ev.summarize_sweep(recs)}
    s = summary[("awq", "bucket")]
    assert s["gap_closed_k8"] == pytest.approx(0.4) and s["gap_closed_k16"] == pytest.approx(0.65)
    # awq 3-bit + k16: 10 + 10 * 0.35 = 13.5 < 14 (3.5-bit); k8: 16 > 14
    assert s["beats_3.5bit_from_k"] == 16
    # rtn 3-bit + k16: 10 + 30 * 0.35 = 20.5, not below 3.5-bit's 20: never crosses in this sweep
    assert summary[("rtn", "exact")]["beats_3.5bit_from_k"] is None
    paths = ev.write_sweep(recs, {"command": "test"}, tmp_path)
    data = json.loads(open(paths["json"]).read())
    assert len(data["records"]) == len(recs) and data["meta"]["command"] == "test"
    md = open(paths["md"]).read()
    assert "| awq | 3 | none | 0 | 20.000 |" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
