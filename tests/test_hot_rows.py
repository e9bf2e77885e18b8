"""bench/hot_rows.py: resident ("hot") residual rows. The byte rules and the hot-set choice against
brute force (Fractions, float64, decdec.reference's per-token selection), both policies against
per-token brute-force walks, the "extended" policy with no resident rows against the default
selection (DecLinear, reference_select, residual_precision's stand-in bit for bit), the PCIe
accounting, and the calibration pass on a tiny quantized model."""
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hot_rows as hr  # noqa: E402
import residual_precision as rp  # noqa: E402
from decdec import _C, formats, pipeline  # noqa: E402
from decdec.calibrate import calibrate_thresholds  # noqa: E402
from decdec.cheatsheet import build_cheatsheet  # noqa: E402
from decdec.layer import make_declinear  # noqa: E402
from decdec.quantize import quantize_rtn  # noqa: E402
from decdec.reference import reference_select  # noqa: E402

NB = formats.NUM_BUCKETS


# ----------------------------------------------------------------------------- brute force
def bf_buckets(x, floors):
    """Bucket of each channel of one token, written as decdec.h says: the smallest i with
    |x| >= floors[i] (NaN: none, NB)."""
    out = []
    for v in np.abs(np.asarray(x, np.float32)):
        b = NB
        for i in range(NB):
            if v >= floors[i]:
                b = i
                break
        out.append(b)
    return out


def bf_order(buckets, lo, hi):
    """Channels of [lo, hi) in the rule's order: bucket ascending, then index."""
    return sorted((j for j in range(lo, hi) if buckets[j] < NB), key=lambda j: (buckets[j], j))


def bf_extended(x, floors, quotas, hot):
    b = bf_buckets(x, floors)
    hot = set(int(h) for h in hot)
    taken = set()
    for c, q in enumerate(quotas):
        lo, hi = c * formats.CHUNK, min(len(x), (c + 1) * formats.CHUNK)
        n = 0
        for j in bf_order(b, lo, hi):
            if n == q:
                break
            taken.add(j)
            n += j not in hot
    return taken


def bf_always(x, floors_nonres, quotas, hot):
    hot = set(int(h) for h in hot)
    b = bf_buckets(x, floors_nonres)
    b = [NB if j in hot else v for j, v in enumerate(b)]
    taken = set(hot)
    for c, q in enumerate(quotas):
        lo, hi = c * formats.CHUNK, min(len(x), (c + 1) * formats.CHUNK)
        taken.update(bf_order(b, lo, hi)[:q])
    return taken


def bf_nonres_thresholds(X, hot):
    """float64: max over tokens of the r-th largest |x_j| over j not in hot."""
    keep = np.setdiff1d(np.arange(X.shape[1]), hot)
    A = np.abs(X[:, keep].astype(np.float64))
    return (-np.sort(-A, axis=1)).max(axis=0)


def _acts(rng, T, d_in, outliers=(3, 17, 40)):
    X = rng.standard_t(3, size=(T, d_in)).astype(np.float32)
    for j in outliers:                  # a few channels that are large most of the time
        if j < d_in:
            X[:, j] *= 6.0
    return X


SHAPES = [(96, 32), (576, 64), (1536, 96), (2100, 64)]


# ----------------------------------------------------------------------------- byte rules
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("d_in,d_out", SHAPES + [(160, 192)])
def test_base_bytes_and_budget_rows(d_in, d_out, bits, group):
    rng = np.random.default_rng(d_in + d_out + bits)
    qw = quantize_rtn(rng.standard_normal((d_out, d_in)).astype(np.float32), bits, group)
    base = hr.base_weight_nbytes(d_in, d_out, bits, group)
    assert base == qw.nbytes                          # qweight + scales + zeros
    assert hr.resident_row_nbytes(d_out) * 2 == d_out
    for budget in (0.0, 0.005, 0.01, 0.02, 0.04, 0.1, 3.0):
        n = hr.hot_rows_for_budget(d_in, d_out, bits, group, budget)
        cap = Fraction(str(budget)) * base
        brute = max(m for m in range(d_in + 1) if m * Fraction(d_out, 2) <= cap)
        assert n == brute
        assert n * d_out // 2 <= cap


def test_smollm2_rows_per_budget():
    """The counts quoted in the docstring and results: 3-bit g128, d_out does not matter."""
    for d_out in (192, 576, 1536):
        assert [hr.hot_rows_for_budget(576, d_out, 3, 128, b) for b in hr.BUDGETS] == [2, 5, 10, 20]
    assert [hr.hot_rows_for_budget(1536, 576, 3, 128, b) for b in hr.BUDGETS] == [6, 12, 24, 49]


# ----------------------------------------------------------------------------- hot set
def test_hot_set_bruteforce():
    rng = np.random.default_rng(0)
    for d in (7, 96, 576, 1536):
        counts = rng.integers(0, 6, d)                # many ties
        for n in (0, 1, 5, d // 3, d):
            brute = sorted(sorted(range(d), key=lambda j: (-counts[j], j))[:n])
            assert hr.hot_set(counts, n).tolist() == brute
    with pytest.raises(ValueError):
        hr.hot_set(np.zeros(4), 5)


@pytest.mark.parametrize("d_in", [96, 576, 1536, 2100])
@pytest.mark.parametrize("k", [4, 8, 16])
def test_selection_counts_bruteforce(d_in, k):
    rng = np.random.default_rng(d_in * k)
    t = calibrate_thresholds(_acts(rng, 64, d_in))
    X = _acts(rng, 24, d_in)
    X[3, 5] = np.nan                                  # NaN matches no bucket
    brute = np.zeros(d_in, np.int64)
    for x in X:
        brute[reference_select(x, t, k)] += 1
    assert np.array_equal(hr.selection_counts(X, t, k), brute)


# ----------------------------------------------------------------------------- policies
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("k", [4, 8, 16])
def test_extended_without_resident_rows_is_the_default(d_in, d_out, k):
    rng = np.random.default_rng(d_in + k)
    t = calibrate_thresholds(_acts(rng, 128, d_in))
    X = _acts(rng, 20, d_in)
    quotas = formats.chunk_quotas(d_in, k)
    f = formats.bucket_floors(t, max(1, sum(quotas)))
    empty = np.zeros(0, np.int64)
    for mask in (hr.select_extended(X, f, quotas, empty), hr.select_always(X, f, quotas, empty)):
        for x, m in zip(X, mask):
            assert np.flatnonzero(m).tolist() == reference_select(x, t, k).tolist()
    # the whole layer: bit for bit residual_precision's stand-in, and DecLinear to fp32 rounding
    W = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    qw = quantize_rtn(W, 3, 128)
    cs = build_cheatsheet(W, qw.dequantize())
    W_hat = np.ascontiguousarray(qw.dequantize(), np.float32)
    table = (formats.unpack_residual(cs.codes), cs.scales)
    hot = hr.HotLinear(W_hat, table, t, k, (), "extended")
    std = rp.ResidualLinear(W_hat, {4: table}, t, rp.layer_schedules(d_in, k, "4"))
    y = hot.forward(X)
    assert np.array_equal(y, std.forward(X))
    lin = make_declinear(qw, cs, t, k_chunk=k)
    y_ref = lin.forward(X)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5 * np.abs(y_ref).max())
    assert hot.fetch_nbytes == lin.fetch_nbytes and hot.resident_nbytes == 0


@pytest.mark.parametrize("d_in", [96, 576, 1536, 2100])
@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("n_hot", [1, 5, 24])
def test_extended_bruteforce_and_quota(d_in, k, n_hot):
    rng = np.random.default_rng(d_in + 7 * k + n_hot)
    t = calibrate_thresholds(_acts(rng, 128, d_in))
    X = _acts(rng, 16, d_in)
    X[2, 1] = np.nan
    X[4] = 0.0                                        # a token where everything ties
    counts = hr.selection_counts(_acts(rng, 128, d_in), t, 8)
    hot = hr.hot_set(counts, min(n_hot, d_in))
    quotas = formats.chunk_quotas(d_in, k)
    f = formats.bucket_floors(t, max(1, sum(quotas)))
    mask = hr.select_extended(X, f, quotas, hot)
    hot_mask = np.zeros(d_in, bool)
    hot_mask[hot] = True
    extra = 0
    for x, m in zip(X, mask):
        taken = set(np.flatnonzero(m).tolist())
        assert taken == bf_extended(x, f, quotas, hot)
        default = set(reference_select(x, t, k).tolist())
        assert default <= taken                       # never fewer channels than the default
        assert not any(np.isnan(x[j]) for j in taken)
        for c, q in enumerate(quotas):
            lo, hi = c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK)
            n_non = int((m[lo:hi] & ~hot_mask[lo:hi]).sum())
            avail = int((~hot_mask[lo:hi] & ~np.isnan(x[lo:hi])).sum())
            assert n_non == min(q, avail)             # exactly the quota of non-resident rows
            assert n_non <= q
        extra += len(taken) - len(default)
    if sum(quotas):
        assert extra > 0                              # resident rows were actually free extras
    else:                                             # a zero quota takes nothing, resident or not
        assert not mask.any()


@pytest.mark.parametrize("d_in", [96, 576, 1536, 2100])
@pytest.mark.parametrize("k", [4, 8, 16])
@pytest.mark.parametrize("n_hot", [1, 5, 24])
def test_always_bruteforce(d_in, k, n_hot):
    rng = np.random.default_rng(d_in + 11 * k + n_hot)
    C = _acts(rng, 128, d_in)
    t = calibrate_thresholds(C)
    hot = hr.hot_set(hr.selection_counts(C, t, 8), min(n_hot, d_in))
    # non-resident thresholds as calibrate_hot computes them, against float64
    from decdec.calibrate import ThresholdCalibrator
    keep = np.setdiff1d(np.arange(d_in), hot)
    cal = ThresholdCalibrator(len(keep))
    cal.update(C[:, keep])
    t_nr = cal.thresholds
    np.testing.assert_array_equal(t_nr, bf_nonres_thresholds(C, hot).astype(np.float32))
    quotas = formats.chunk_quotas(d_in, k)
    f = formats.bucket_floors(t_nr, max(1, sum(quotas)))
    X = _acts(rng, 16, d_in)
    X[1, 2] = np.nan
    mask = hr.select_always(X, f, quotas, hot)
    hot_mask = np.zeros(d_in, bool)
    hot_mask[hot] = True
    for x, m in zip(X, mask):
        assert m[hot].all()                           # every resident row, every token
        assert set(np.flatnonzero(m).tolist()) == bf_always(x, f, quotas, hot)
        for c, q in enumerate(quotas):
            lo, hi = c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK)
            assert int((m[lo:hi] & ~hot_mask[lo:hi]).sum()) == min(q, int((~hot_mask[lo:hi] & ~np.isnan(x[lo:hi])).sum()))
    # the layer refuses "always" without non-resident thresholds of the right length
    W = np.zeros((32, d_in), np.float32)
    table = (np.zeros((d_in, 32), np.int8), np.ones(32, np.float16))
    with pytest.raises(ValueError):
        hr.HotLinear(W, table, t, k, hot, "always")
    with pytest.raises(ValueError):
        hr.HotLinear(W, table, t, k, hot, "always", t)


@pytest.mark.parametrize("policy", hr.POLICIES)
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_forward_and_pcie_accounting(policy, d_in, d_out):
    rng = np.random.default_rng(d_in + d_out)
    C = _acts(rng, 96, d_in)
    t = calibrate_thresholds(C)
    k = 8
    hot = hr.hot_set(hr.selection_counts(C, t, 8), 7)
    keep = np.setdiff1d(np.arange(d_in), hot)
    t_nr = calibrate_thresholds(C[:, keep])
    W = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    qw = quantize_rtn(W, 3, 128)
    cs = build_cheatsheet(W, qw.dequantize())
    W_hat = np.ascontiguousarray(qw.dequantize(), np.float32)
    codes = formats.unpack_residual(cs.codes)
    lin = hr.HotLinear(W_hat, (codes, cs.scales), t, k, hot, policy, t_nr)
    X = _acts(rng, 12, d_in)
    y = lin.forward(X)
    # float64 oracle: W_hat x + sum over the policy's channels of x_i R_hat[i]
    mask = lin.select(X)
    R = codes.astype(np.float64) * cs.scales.astype(np.float64)
    y64 = X.astype(np.float64) @ W_hat.T.astype(np.float64) + (np.where(mask, X, 0).astype(np.float64) @ R)
    np.testing.assert_allclose(y, y64, rtol=0, atol=1e-5 * np.abs(y64).max())
    np.testing.assert_allclose(lin.forward(X[0]), y[0], rtol=0, atol=1e-5 * np.abs(y64).max())
    # PCIe bytes per token: the plain default's at the same k_chunk (DecLinear, _C.layer_nbytes)
    nb = _C.layer_nbytes(d_in, d_out, 3, 128, k)
    assert lin.fetch_nbytes == nb["fetch"] == hr.fetch_nbytes(d_in, d_out, k)
    assert lin.fetch_nbytes == make_declinear(qw, cs, t, k_chunk=k).fetch_nbytes
    assert lin.resident_nbytes == 7 * d_out // 2
    # counters: exactly the quota of non-resident rows per token; resident rows per the policy
    T = 2 * len(X)                                    # two calls
    assert lin.tokens == len(X) + 1 and lin.fetched == (len(X) + 1) * formats.total_quota(d_in, k)
    lin.tokens = lin.fetched = lin.resident_taken = 0
    lin.forward(np.concatenate([X, X]))
    assert lin.tokens == T and lin.fetched == T * formats.total_quota(d_in, k)
    if policy == "always":
        assert lin.resident_taken == T * 7
    else:
        assert 0 < lin.resident_taken <= T * 7
        assert lin.resident_taken == 2 * int(mask[:, hot].sum())


# ----------------------------------------------------------------------------- calibration pass
@pytest.fixture(scope="module", params=["rtn", "awq"])
def tiny_qm(request):
    from tiny_llama import calib_tokens, tiny_weights
    w = tiny_weights()
    return w, pipeline.quantize_model(w, calib_tokens(), 3, method=request.param, n_windows=2,
                                      progress=False)


TINY_BUDGETS = (0.0, 0.02, 0.05, 0.2)


def test_calibrate_hot_bruteforce(tiny_qm):
    """Counts, hot sets and non-resident thresholds of calibrate_hot against brute force on the
    float model's calibration inputs in the quantized layers' basis."""
    from decdec.awq import INPUT_OF_LINEAR
    from decdec.model import LlamaModel
    from tiny_llama import calib_tokens
    w, qm = tiny_qm
    cal = hr.calibrate_hot(qm, w, calib_tokens(), TINY_BUDGETS, k_ref=8, n_windows=2, progress=False)
    assert cal["thresholds_match"] and cal["tokens"] == 2 * pipeline.CALIB_CONTEXT
    xs = {}

    def hook(l, name, x):
        xs.setdefault((l, name), []).append(np.array(x, np.float32))
    for win in pipeline.calibration_windows(calib_tokens(), 2):
        LlamaModel(w).forward(win, hook=hook)
    n_seen, brute = set(), {}
    for (l, name, b), H in cal["hot"].items():
        kind = INPUT_OF_LINEAR[name]
        ql = qm.blocks[l].linears[name]
        X = np.concatenate(xs[(l, name)]) / qm.blocks[l].scales.of_input(kind)[None, :].astype(np.float32)
        if (l, kind) not in brute:                    # once per input (shared by its linears)
            c = np.zeros(X.shape[1], np.int64)
            for x in X:
                c[reference_select(x, ql.thresholds, 8)] += 1
            brute[(l, kind)] = c
        counts = brute[(l, kind)]
        assert np.array_equal(cal["counts"][(l, kind)], counts)
        n = hr.hot_rows_for_budget(X.shape[1], ql.qweight.out_features, 3, 128, b)
        assert cal["n_hot"][(l, name, b)] == n == len(H)
        assert H.tolist() == sorted(sorted(range(X.shape[1]), key=lambda j: (-counts[j], j))[:n])
        t_nr = cal["nonres_thresholds"][(l, name, b)]
        if n:
            np.testing.assert_array_equal(t_nr, bf_nonres_thresholds(X, H).astype(np.float32))
        else:
            assert np.array_equal(t_nr, ql.thresholds)
        hit = cal["hit_rate"][(l, kind, b)]
        assert hit == pytest.approx(counts[H].sum() / counts.sum())
        n_seen.add(n)
    assert len(n_seen) >= 4                           # the budgets gave distinct, non-empty sets


def test_hot_model_tiny(tiny_qm, tmp_path):
    """Whole model: no resident rows = residual_precision's plain stand-in bit for bit (= the real
    DecLinear model to fp32 rounding); with resident rows both policies differ from it; the
    whole-model byte sums agree with the QuantizedModel's."""
    from tiny_llama import calib_tokens
    w, qm = tiny_qm
    cal = hr.calibrate_hot(qm, w, calib_tokens(), TINY_BUDGETS, k_ref=8, n_windows=2, progress=False)
    tables = rp.residual_tables(qm, w, tmp_path, "tiny", bits_list=(4,), progress=False)
    w_hats = rp.dequantized_base(qm)
    toks = calib_tokens(100, seed=5)
    k = 64
    plain = rp.standin_model(qm, w_hats, tables, k, "4").forward(toks)
    real = pipeline.build_model(qm, k_chunk=k).forward(toks)
    np.testing.assert_allclose(plain, real, rtol=0, atol=1e-4 * np.abs(real).max())
    for pol in hr.POLICIES:
        m0 = hr.hot_model(qm, w_hats, tables, cal, k, 0.0, pol)
        assert np.array_equal(m0.forward(toks), plain)
        m = hr.hot_model(qm, w_hats, tables, cal, k, 0.2, pol)
        out = m.forward(toks)
        assert np.isfinite(out).all() and not np.array_equal(out, plain)
        u = hr.usage(m)
        n_lin = len(m.linears)
        assert u["fetched_rows_per_token"] == pytest.approx(
            sum(formats.total_quota(ql.qweight.in_features, k) for b in qm.blocks for ql in b.linears.values()))
        total_res = sum(len(cal["hot"][(l, n, 0.2)]) for l in range(len(qm.blocks)) for n in pipeline.LINEAR_NAMES)
        if pol == "always":
            assert u["resident_rows_per_token"] == pytest.approx(total_res)
            assert u["resident_hbm_bytes_per_token"] == pytest.approx(hr.resident_bytes(qm, cal, 0.2))
        else:
            assert 0 < u["resident_rows_per_token"] <= total_res
            assert 0 < u["resident_hbm_bytes_per_token"] < hr.resident_bytes(qm, cal, 0.2)
        assert n_lin == 7 * len(qm.blocks)
    assert hr.model_fetch_bytes(qm, k) == qm.residual_bytes_per_token(k)
    assert hr.base_bytes(qm) == sum(ql.qweight.nbytes for b in qm.blocks for ql in b.linears.values())
    assert hr.resident_bytes(qm, cal, 0.2) == sum(
        len(cal["hot"][(l, n, 0.2)]) * ql.qweight.out_features // 2
        for l, b in enumerate(qm.blocks) for n, ql in b.linears.items())
