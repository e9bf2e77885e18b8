"""bench/nonuniform_experiment.py's weighted k-means (issue 11's first experiment) against a float64
recomputation: the objective does not increase over iterations, centroids come out sorted, codes
are the nearest fp16 centroid, and a row with k or fewer distinct values is reproduced exactly."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import nonuniform_experiment as ne  # noqa: E402
from nonuniform_experiment import objective, weighted_kmeans_rows  # noqa: E402


def _obj64(W, h, C16, codes):
    C = C16.astype(np.float64)
    return float((h[None, :] * (W.astype(np.float64) - np.take_along_axis(C, codes.astype(np.int64), 1)) ** 2).sum())


def test_objective_decreases_and_codes_are_nearest():
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((40, 300)) * np.exp(rng.standard_normal(300) * 0.5)).astype(np.float32)
    h = rng.random(300) ** 3 + 1e-3
    prev = np.inf
    for iters in (0, 1, 3, 10, 30):
        C16, codes = weighted_kmeans_rows(W, h, 8, iters=iters)
        obj = _obj64(W, h, C16, codes)
        assert obj <= prev * (1 + 1e-4), (iters, obj, prev)   # fp16 rounding of centroids aside
        prev = obj
        assert np.all(np.diff(C16.astype(np.float32), axis=1) >= 0)
        d = np.abs(W[:, :, None].astype(np.float64) - C16.astype(np.float64)[:, None, :])
        assert np.all(d[np.arange(40)[:, None], np.arange(300)[None, :], codes] <= d.min(-1) + 1e-12)
    assert objective(W, h, C16, codes) == np.float32(objective(W, h, C16, codes))
    assert abs(objective(W, h, C16, codes) - _obj64(W, h, C16, codes)) < 1e-3 * _obj64(W, h, C16, codes)


def test_few_distinct_values_are_exact():
    vals = np.array([-1.5, -0.25, 0.5, 2.0], dtype=np.float32)       # fp16-exact
    W = np.tile(vals, (3, 25)).astype(np.float32)
    C16, codes = weighted_kmeans_rows(W, np.ones(100), 8)
    rec = np.take_along_axis(C16.astype(np.float32), codes.astype(np.int64), 1)
    np.testing.assert_array_equal(rec, W)


def test_sparse_mask_keeps_the_largest_weighted_energies_against_brute_force():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    h = rng.random(64)
    m = ne.sparse_mask(W, h, 0.05)
    n = int(round(0.05 * W.size))
    e = h[None, :].astype(np.float64) * W.astype(np.float64) ** 2
    assert m.sum() == n
    assert e[m].min() >= e[~m].max()          # every kept weight outranks every dropped one
    assert not ne.sparse_mask(W, h, 0.0).any()


def test_fit_nonuniform_groups_sparse_part_and_bits():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 128)).astype(np.float32)
    h = rng.random(128) + 0.1
    What, obj, bits = ne.fit_nonuniform(W, h, 8, group=64, sparse_frac=0.05)
    m = ne.sparse_mask(W, h, 0.05)
    np.testing.assert_array_equal(What[m], W[m].astype(np.float16).astype(np.float32))  # exact (fp16) part
    for r in range(8):                         # at most 8 distinct values per 64-input group, dense part
        for g in range(2):
            seg, keep = What[r, 64 * g:64 * (g + 1)], ~m[r, 64 * g:64 * (g + 1)]
            assert len(np.unique(seg[keep])) <= 8
    dense_obj = float((np.where(m, 0.0, h[None, :]) * (W.astype(np.float64) - What) ** 2).sum())
    assert abs(obj - dense_obj) <= 1e-6 * max(1.0, dense_obj)
    assert bits == pytest.approx(3 + 16 * 8 / 64 + m.mean() * 48)
    W0, obj0, bits0 = ne.fit_nonuniform(W, h, 8)   # one table per row, no sparse part
    assert bits0 == pytest.approx(3 + 16 * 8 / 128) and obj0 > 0
    with pytest.raises(ValueError, match="does not divide"):
        ne.fit_nonuniform(W, h, 8, group=48)
