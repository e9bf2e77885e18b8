"""decdec.cache: quantized artifacts reused between runs, keyed by checksums of their inputs and code."""
import warnings

import pytest

from decdec import artifacts, cache, pipeline
from tiny_llama import assert_same_quantized, calib_tokens, tiny_weights

GRIDS = dict(alpha_grid=(0.0, 0.5), clip_grid=(1.0, 0.8))


def _run(tmp_path, weights, **kw):
    args = dict(model_id="tiny", method="awq", group_size=128, n_windows=2, sensitivity_tokens=64,
                progress=False, cache_dir=tmp_path, **GRIDS)
    args.update(kw)
    return cache.cached_quantize_models(weights, calib_tokens(), (3, 4), **args)


def test_second_call_reads_the_cache_and_equals_the_computation(tmp_path):
    w = tiny_weights()
    first, hit = _run(tmp_path, w)
    assert hit is False and set(first) == {3, 4}
    again, hit = _run(tmp_path, w)
    assert hit is True
    direct = pipeline.quantize_models(w, calib_tokens(), (3, 4), method="awq", n_windows=2,
                                      sensitivity_tokens=64, progress=False, **GRIDS)
    for b in (3, 4):
        assert_same_quantized(again[b], first[b])
        assert_same_quantized(again[b], direct[b])


def test_the_key_covers_inputs_and_code(tmp_path, monkeypatch):
    base = cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 128, 2, 64, (0.0,), (1.0,))
    assert base == cache.artifact_key("m", list(calib_tokens()), [3, 4], "awq", 128, 2, 64, [0.0], [1.0])
    for other in (cache.artifact_key("m2", calib_tokens(), (3, 4), "awq", 128, 2, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens()[:-1], (3, 4), "awq", 128, 2, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 3.5), "awq", 128, 2, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 4), "rtn", 128, 2, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 64, 2, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 128, 3, 64, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 128, 2, 32, (0.0,), (1.0,)),
                  cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 128, 2, 64, (0.5,), (1.0,))):
        assert other != base
    monkeypatch.setattr(cache, "code_digest", lambda: "changed code")
    assert cache.artifact_key("m", calib_tokens(), (3, 4), "awq", 128, 2, 64, (0.0,), (1.0,)) != base


def test_a_corrupt_cached_artifact_is_recomputed_with_a_warning(tmp_path):
    w = tiny_weights()
    first, _ = _run(tmp_path, w, method="rtn")
    entry = cache.cache_entry("tiny", calib_tokens(), (3, 4), "rtn", 128, 2, 64, cache_dir=tmp_path, **GRIDS)
    assert cache.is_cached(entry, (3, 4))
    victim = next((entry / "bits-3" / "blocks").iterdir())
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    with pytest.warns(RuntimeWarning, match="failed its check"):
        again, hit = _run(tmp_path, w, method="rtn")
    assert hit is False
    assert_same_quantized(again[3], first[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(tmp_path, w, method="rtn")[1] is True     # repaired: read cleanly now
    assert isinstance(artifacts.load(entry / "bits-3"), type(first[3]))
