import numpy as np
import pytest

from decdec.calibrate import ThresholdCalibrator, calibrate_thresholds


def test_thresholds_are_envelope_of_sorted_magnitudes():
    rng = np.random.default_rng(5)
    X = rng.standard_t(3, (200, 700)).astype(np.float32)
    t = calibrate_thresholds(X)
    expected = np.max(-np.sort(-np.abs(X.astype(np.float64)), axis=1), axis=0)
    np.testing.assert_allclose(t, expected, rtol=0, atol=0)
    assert (np.diff(t) <= 0).all()


def test_streaming_equals_one_shot_and_skips_non_finite_tokens():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((100, 64)).astype(np.float32)
    cal = ThresholdCalibrator(64)
    for part in np.array_split(X, 7):
        cal.update(part)
    bad = np.full((1, 64), np.nan, np.float32)
    cal.update(bad)
    np.testing.assert_array_equal(cal.thresholds, calibrate_thresholds(X))
    assert cal.count == 100
    with pytest.raises(ValueError):
        cal.update(np.zeros((3, 65)))
    with pytest.raises(ValueError, match="no calibration"):
        ThresholdCalibrator(8).thresholds


def test_quantile_thresholds():
    rng = np.random.default_rng(7)
    X = rng.standard_t(3, (300, 200)).astype(np.float32)
    t = calibrate_thresholds(X, quantile=0.9)
    srt = -np.sort(-np.abs(X.astype(np.float64)), axis=1)
    expected = np.minimum.accumulate(np.quantile(srt, 0.9, axis=0))
    np.testing.assert_allclose(t, expected, rtol=1e-6)
    assert (np.diff(t) <= 0).all() and (t <= calibrate_thresholds(X)).all()
    np.testing.assert_array_equal(calibrate_thresholds(X, quantile=1.0), calibrate_thresholds(X))
    cal = ThresholdCalibrator(200, quantile=0.5, max_rank=10)
    cal.update(X)
    tq = cal.thresholds
    assert (np.diff(tq) <= 0).all() and tq[10:].max() <= tq[9]
    with pytest.raises(ValueError, match="quantile"):
        ThresholdCalibrator(5, quantile=0.0)
