"""bench/nonuniform_experiment.py's weighted k-means (issue 11's first experiment) against a float64
recomputation: the objective does not increase over iterations, centroids come out sorted, codes
are the nearest fp16 centroid, and a row with k or fewer distinct values is reproduced exactly."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
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
