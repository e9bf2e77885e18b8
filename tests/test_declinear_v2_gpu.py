"""CUDA DecLinear v2 against the CPU backend and a float64 reference, with tolerances DERIVED from
the fp16 rounding of the same computation (not picked to pass), tight enough that one wrongly
selected residual row fails.  GPU tests carry the `gpu` marker and skip without a CUDA build and a
GPU; the tolerance argument itself (test_tolerance_detects_one_wrong_row) runs everywhere.

Numerics of the CUDA layer (csrc/cuda/dd_cuda.h):
  base  x is scaled by a power of two per 64-input segment (exact), products and sums inside one
        32-weight (4-bit) / 64-weight (3-bit) run are fp16 FMAs on centred codes, everything beyond
        is fp32, and the base result is rounded to fp16 once;
  DEC   fp32 throughout, its delta added to the fp16 output (fp16 rounding per add; at most one add
        per DEC thread block and output, i.e. at most n_tb roundings; the fork/join path also adds
        the base atomically onto a zeroed y, in any order: two roundings more).
So with y0 = the k_chunk=0 output (the base alone) and yK = the output at k_chunk=K, both on the
SAME fp16 input x:
  |y0 - base64| <= ulp16(|base64|)/2 + gamma16(RUN) * P + gamma32(d_in) * A          (base bound)
  |(yK - y0) - delta64| <= (n_tb + 2) * ulp16(M)/2 + gamma32(k_total + 1) * D          (DEC bound)
with base64 = W_hat x and delta64 = sum_{i in S} x_i R_hat[i, :] in float64, S the CPU backend's
selection (equal to the GPU's index for index, asserted first), P = sum_j s |q_j - c| |x_j| over
the worst centring c, A = sum_j |W_hat[o, j] x_j|, D = sum_{i in S} |x_i R_hat[i, o]|,
M = max(|y0|, |yK|) + |delta64|, gamma_u(n) = n u / (1 - n u), u16 = 2^-11, u32 = 2^-24."""
import threading

import numpy as np
import pytest

import decdec
from decdec import formats

_C = decdec._C
HAVE_GPU = _C.built_with_cuda() and _C.cuda_available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA build of decdec and a GPU")
U16, U32 = 2.0**-11, 2.0**-24


def gamma(n, u):
    return n * u / (1 - n * u)


def half_ulp16(a):
    """Half an fp16 ulp at |a| (normal range; the subnormal spacing below 2^-14)."""
    a = np.maximum(np.abs(np.asarray(a, np.float64)), 2.0**-14)
    return 2.0 ** (np.floor(np.log2(a)) - 10) / 2


def layer_arrays(rng, d_in, d_out, bits, gs):
    d_pad = -(-d_in // 128) * 128
    qweight = rng.integers(0, 256, (d_out, d_pad * bits // 8), dtype=np.uint8)
    ng = d_pad // gs
    scales = (0.002 + 0.02 * rng.random((d_out, ng))).astype(np.float16)
    zeros = (rng.random((d_out, ng)) * (2**bits - 1)).astype(np.float16)
    codes = rng.integers(1, 16, (d_in, d_out)).astype(np.uint8)
    rcodes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    rscales = (0.001 + 0.004 * rng.random(d_out)).astype(np.float16)
    calib = np.abs(rng.standard_normal((24, d_in)) * np.where(np.arange(d_in) % 61 == 0, 12, 1))
    thresholds = np.max(-np.sort(-calib, axis=1), axis=0).astype(np.float32)
    return dict(qweight=qweight, scales=scales, zeros=zeros, residual_codes=rcodes,
                residual_scales=rscales, thresholds=thresholds, in_features=d_in, out_features=d_out,
                bits=bits, group_size=gs)


def make_x(rng, d_in, nan=False):
    x = rng.standard_normal(d_in) * np.where(np.arange(d_in) % 61 == 0, 12, 1)
    x = x.astype(np.float16)
    if nan:
        x[rng.choice(d_in, 20, replace=False)] = np.nan
        x[rng.choice(d_in, 2, replace=False)] = np.inf
    return x


class Reference:
    """float64 pieces of one layer on one fp16 token, and the derived bounds."""

    def __init__(self, arrays, x16, sel):
        bits, gs, d_in = arrays["bits"], arrays["group_size"], arrays["in_features"]
        q = formats.unpack_weight(arrays["qweight"], bits, d_in).astype(np.float64)
        g = np.arange(d_in) // gs
        s = arrays["scales"].astype(np.float64)[:, g]
        z = arrays["zeros"].astype(np.float64)[:, g]
        x = x16.astype(np.float64)
        W = s * (q - z)
        self.base = W @ x
        qc = np.maximum(q, 2**bits - 1 - q)  # |q - c| for the worst centring c in [0, 2^bits - 1]
        self.base_tol = (half_ulp16(self.base) + gamma(64, U16) * (s * qc) @ np.abs(x)
                         + gamma(d_in, U32) * np.abs(W) @ np.abs(x))
        R = formats.unpack_residual(arrays["residual_codes"]).astype(np.float64)
        R *= arrays["residual_scales"].astype(np.float64)[None, :]
        self.rows = x[sel, None] * R[sel]  # one row per selected channel
        self.delta = self.rows.sum(axis=0)
        self.delta_abs = np.abs(self.rows).sum(axis=0)
        self.k = len(sel)

    def dec_tol(self, y0, yK, n_tb):
        m = np.maximum(np.abs(y0), np.abs(yK)) + np.abs(self.delta)
        return (n_tb + 2) * half_ulp16(m) + gamma(self.k + 1, U32) * self.delta_abs


def test_tolerance_detects_one_wrong_row():
    """The DEC bound is tight enough that dropping ANY one selected row from the reference exceeds it
    at some output (the GPU outputs replaced by the fp16-rounded reference, which is what they
    approximate): so the GPU test below fails on one wrongly selected or dropped row."""
    from decdec.reference import reference_select

    rng = np.random.default_rng(100)
    for bits, d_in, d_out, k in [(3, 2048, 256, 8), (4, 4096, 512, 8), (4, 1000, 96, 16)]:
        arrays = layer_arrays(rng, d_in, d_out, bits, 128)
        x16 = make_x(rng, d_in)
        sel = reference_select(x16.astype(np.float32), arrays["thresholds"], k, "bucket")
        ref = Reference(arrays, x16, sel)
        y0 = ref.base.astype(np.float16).astype(np.float64)
        yK = (ref.base + ref.delta).astype(np.float16).astype(np.float64)
        tol = ref.dec_tol(y0, yK, n_tb=4)
        assert np.all(np.abs((yK - y0) - ref.delta) <= tol)  # the rounding model fits its own bound
        for r in range(len(sel)):
            dropped = ref.delta - ref.rows[r]
            assert np.any(np.abs(dropped - ref.delta) > tol), (bits, d_in, sel[r])
        # and one row selected too many (the largest unselected |x|) is detected as well
        rest = np.setdiff1d(np.arange(d_in), sel)
        extra = rest[np.argmax(np.abs(x16[rest].astype(np.float64)))]
        R = formats.unpack_residual(arrays["residual_codes"])[extra].astype(np.float64)
        R *= arrays["residual_scales"].astype(np.float64)
        assert np.any(np.abs(x16[extra] * R) > tol)


SHAPES = [(3, 128, 2048, 256), (4, 128, 4096, 512), (4, 64, 1000, 96), (3, 64, 2178, 320)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits,gs,d_in,d_out", SHAPES)
@pytest.mark.parametrize("k_chunk", [1, 8, 32, 200])
def test_gpu_selection_equals_cpu_index_for_index(bits, gs, d_in, d_out, k_chunk):
    rng = np.random.default_rng(d_in + k_chunk + bits)
    arrays = layer_arrays(rng, d_in, d_out, bits, gs)
    cpu = _C.DecLinear(**arrays, k_chunk=k_chunk)
    dev = _C.DecLinear(**arrays, k_chunk=k_chunk, device="cuda")
    for trial in range(6):
        x16 = make_x(rng, d_in, nan=trial >= 4)
        got = dev.select(_C.DeviceArray(x16))
        want = cpu.select(x16.astype(np.float32))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits,gs,d_in,d_out", SHAPES)
@pytest.mark.parametrize("k_chunk", [8, 32])
def test_gpu_output_within_the_derived_fp16_bounds(bits, gs, d_in, d_out, k_chunk):
    rng = np.random.default_rng(3 * d_in + k_chunk)
    arrays = layer_arrays(rng, d_in, d_out, bits, gs)
    cpu = _C.DecLinear(**arrays, k_chunk=k_chunk)
    n_tb = 4
    dev = _C.DecLinear(**arrays, k_chunk=k_chunk, device="cuda", n_tb=n_tb)
    base_only = dev.with_settings(k_chunk=0)
    for _ in range(4):
        x16 = make_x(rng, d_in)
        xd = _C.DeviceArray(x16)
        sel = dev.select(xd)
        np.testing.assert_array_equal(sel, cpu.select(x16.astype(np.float32)))
        ref = Reference(arrays, x16, sel)
        y0 = base_only.forward(xd).numpy().astype(np.float64)
        yK = dev.forward(xd).numpy().astype(np.float64)
        excess = np.abs(y0 - ref.base) - ref.base_tol
        assert excess.max() <= 0, f"base off by {excess.max()} beyond its bound"
        tol = ref.dec_tol(y0, yK, n_tb)
        excess = np.abs((yK - y0) - ref.delta) - tol
        assert excess.max() <= 0, f"DEC delta off by {excess.max()} beyond its bound"


def _deterministic(layer, xd, n=3):
    ys = [layer.forward(xd).numpy() for _ in range(n)]
    return ys[0], all(np.array_equal(ys[0], y) for y in ys[1:])


def _same(y, ref, tol, deterministic):
    if deterministic:
        np.testing.assert_array_equal(y, ref)
    else:  # fp16 atomics in another order: still within the DEC rounding bound of each other
        assert np.all(np.abs(y.astype(np.float64) - ref.astype(np.float64)) <= 2 * tol)


@pytest.mark.gpu
@gpu
def test_two_threads_on_per_thread_streams_give_the_single_stream_result():
    """Each thread calls on its per-thread default stream (CAI stream 2): two streams, two
    workspaces, one layer; plus threads sharing the legacy default stream."""
    rng = np.random.default_rng(7)
    arrays = layer_arrays(rng, 4096, 1024, 3, 128)
    dev = _C.DecLinear(**arrays, k_chunk=16, device="cuda")
    x16 = make_x(rng, 4096)
    xd = _C.DeviceArray(x16)
    ref, det = _deterministic(dev, xd)
    cpu_sel = _C.DecLinear(**arrays, k_chunk=16).select(x16.astype(np.float32))
    r = Reference(arrays, x16, cpu_sel)
    tol = r.dec_tol(ref, ref, dev.n_tb)
    for stream in (2, None):
        results, errors = [[] for _ in range(4)], []

        def work(i):
            try:
                out = _C.DeviceArray(np.zeros(1024, np.float16))
                mine = _C.DeviceArray(x16)
                for _ in range(25):
                    dev.forward(mine, out=out, stream=stream)
                    results[i].append(dev.forward(mine, stream=stream).numpy())
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        for ys in results:
            assert len(ys) == 25
            for y in ys:
                _same(y, ref, tol, det)


@pytest.mark.gpu
@gpu
def test_two_torch_streams_give_the_single_stream_result():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    arrays = layer_arrays(rng, 4096, 1024, 4, 128)
    dev = _C.DecLinear(**arrays, k_chunk=16, device="cuda")
    x16 = make_x(rng, 4096)
    ref, det = _deterministic(dev, _C.DeviceArray(x16))
    r = Reference(arrays, x16, _C.DecLinear(**arrays, k_chunk=16).select(x16.astype(np.float32)))
    tol = r.dec_tol(ref, ref, dev.n_tb)
    xt = torch.from_numpy(x16).cuda()
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [[torch.empty(1024, dtype=torch.float16, device="cuda") for _ in range(20)] for _ in streams]
    torch.cuda.synchronize()
    for j in range(20):  # interleaved launches on two streams, overlapping on the GPU
        for s, o in zip(streams, outs):
            dev.forward(xt, out=o[j], stream=s.cuda_stream)
    torch.cuda.synchronize()
    for o in outs:
        for y in o:
            _same(y.cpu().numpy(), ref, tol, det)


@pytest.mark.gpu
@gpu
def test_k_chunk_change_then_graph_capture():
    """v1 ran a synchronous cudaMemcpy inside the capture after a k_chunk change (runtime.cu:266)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    arrays = layer_arrays(rng, 2048, 512, 3, 128)
    dev = _C.DecLinear(**arrays, k_chunk=0, device="cuda")
    x16 = make_x(rng, 2048)
    xt = torch.from_numpy(x16).cuda()
    s = torch.cuda.Stream()
    dev.forward(xt, stream=s.cuda_stream)  # the stream's workspace exists (made eagerly)
    dev.k_chunk = 24                        # applied now, on the host
    eager = dev.forward(_C.DeviceArray(x16)).numpy()
    out = torch.full((512,), float("nan"), dtype=torch.float16, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        dev.forward(xt, out=out, stream=s.cuda_stream)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    cpu = _C.DecLinear(**arrays, k_chunk=24)
    r = Reference(arrays, x16, cpu.select(x16.astype(np.float32)))
    _same(out.cpu().numpy(), eager, r.dec_tol(eager, eager, dev.n_tb), False)
    # a stream without a workspace cannot allocate inside a capture: a clear error, not a crash
    fresh = torch.cuda.Stream()
    with pytest.raises(RuntimeError, match=r"prepare\(stream\)"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=fresh):
            dev.forward(xt, out=out, stream=fresh.cuda_stream)
    # after prepare() the same capture works
    fresh2 = torch.cuda.Stream()
    dev.prepare(fresh2.cuda_stream)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2, stream=fresh2):
        dev.forward(xt, out=out, stream=fresh2.cuda_stream)
    g2.replay()
    torch.cuda.synchronize()
    # out=None cannot be honoured inside a capture either
    with pytest.raises(RuntimeError, match="out= is required"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=fresh2):
            dev.forward(xt, stream=fresh2.cuda_stream)


@pytest.mark.gpu
@gpu
def test_raw_pointer_tokens_and_bounds():
    """v1: a raw-pointer x with several tokens and out=None got a 1-D (d_out,) output while the kernel
    wrote n_tok x d_out (py_declinear_cuda.c:139); n_tok was cast to int32 unchecked (:172)."""
    rng = np.random.default_rng(10)
    arrays = layer_arrays(rng, 1024, 128, 4, 128)
    dev = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    x = np.stack([make_x(rng, 1024) for _ in range(3)])
    xd = _C.DeviceArray(x)
    want = dev.forward(xd).numpy()
    y = dev.forward(xd.ptr, n_tokens=3)
    assert y.shape == (3, 128)
    np.testing.assert_array_equal(y.numpy(), want)
    y1 = dev.forward(xd.ptr)  # no n_tokens: one token, 1-D
    assert y1.shape == (128,)
    np.testing.assert_array_equal(y1.numpy(), want[0])
    for bad in (0, -1, 2**31 // 1024 + 1, 2**40):
        with pytest.raises(ValueError, match="n_tokens"):
            dev.forward(xd.ptr, n_tokens=bad)
    with pytest.raises(ValueError, match="n_tokens"):
        dev.forward(xd, n_tokens=2)  # disagrees with x's shape
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        dev.forward(xd, accumulate=True)


@pytest.mark.gpu
@gpu
def test_cuda_layer_settings_and_no_host_weights():
    rng = np.random.default_rng(11)
    arrays = layer_arrays(rng, 4096, 4096, 4, 128)
    n_sm = _C.cuda_sm_count()
    dev = _C.DecLinear(**arrays, device="cuda")
    assert dev.n_tb == _C.n_tb_default(n_sm) and dev.residual_pinned
    with pytest.raises(ValueError, match="multiprocessors"):
        dev.n_tb = _C.n_tb_max(n_sm) + 1
    dev.n_tb = _C.n_tb_max(n_sm)
    with pytest.raises(NotImplementedError, match="bucket"):
        dev.selection = "exact"
    with pytest.raises(ValueError, match="n_tb"):
        _C.DecLinear(**arrays, device="cuda", n_tb=_C.n_tb_max(n_sm) + 1)
    with pytest.raises(TypeError, match="device"):
        dev.forward(np.zeros(4096, np.float16))  # a NumPy x on a CUDA layer names device arrays
    np.testing.assert_array_equal(dev.thresholds, arrays["thresholds"])
    np.testing.assert_array_equal(dev.residual_scales, arrays["residual_scales"])
    np.testing.assert_array_equal(dev.residual_codes, arrays["residual_codes"])
    # no host copy of qweight/scales/zeros: RSS grows by about the pinned residual per layer only
    import gc

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    gc.collect()
    before = rss()
    layers = [_C.DecLinear(**arrays, device="cuda") for _ in range(8)]
    grown = (rss() - before) / len(layers)
    assert grown < arrays["residual_codes"].nbytes + arrays["qweight"].nbytes / 2, grown
    del layers


@pytest.mark.gpu
@gpu
def test_bench_variants_are_options():
    b = _C._cuda_bench_create(1024, 1024, 4, 128, 1 << 24)
    t = _C._cuda_bench_run(b, _C.BENCH_FUSED, 8, 4, 10, 3, variant={"layer_mode": 1, "base_rows": 2})
    assert t > 0
    assert _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, 10, 3) > 0
    # base kernel 2 (measurement variant), rule and forced k-split; out-of-range values refused
    # (1, the removed cp.async-ring kernel, included)
    for split in (0, 1, 8):
        assert _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, 10, 3, variant={"base_kernel": 2, "base_ksplit": split}) > 0
    assert _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, 10, 3, variant={"base_kernel": 3, "base_rows": 2}) > 0
    for bad in ({"base_kernel": 1}, {"base_kernel": 4}, {"base_kernel": 2, "base_ksplit": 3}):
        with pytest.raises(Exception):
            _C._cuda_bench_run(b, _C.BENCH_BASE, 0, 0, 10, 3, variant=bad)
    with pytest.raises(ValueError, match="unknown field"):
        _C._cuda_bench_run(b, _C.BENCH_FUSED, 8, 4, 10, 3, variant={"rows": 2})
    with pytest.raises(TypeError):
        _C._cuda_bench_run(b, _C.BENCH_FUSED, 8, 4, 10, 3, variant=[1])
    with pytest.raises(ValueError, match="mode"):
        _C._cuda_bench_run(b, 99, 8, 4, 10, 3)
