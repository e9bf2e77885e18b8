"""CUDA DecLinear against the CPU backend (the oracle).  Skipped without a CUDA build and a GPU."""
import os

import numpy as np
import pytest

_C = pytest.importorskip("decdec._C")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (_C.built_with_cuda() and _C.cuda_available()),
                                                  reason="needs a CUDA build of decdec and a GPU")]


def _layer_arrays(rng, d_in, d_out, bits, gs):
    d_pad = -(-d_in // 128) * 128
    qweight = rng.integers(0, 256, (d_out, d_pad * bits // 8), dtype=np.uint8)
    ng = d_pad // gs
    scales = (0.002 + 0.02 * rng.random((d_out, ng))).astype(np.float16)
    zeros = (rng.random((d_out, ng)) * (2**bits - 1)).astype(np.float16)
    codes = (rng.integers(1, 16, (d_in, d_out)) ).astype(np.uint8)
    rcodes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    rscales = (0.001 + 0.004 * rng.random(d_out)).astype(np.float16)
    calib = np.abs(rng.standard_normal((24, d_in)) * np.where(np.arange(d_in) % 61 == 0, 12, 1))
    thresholds = np.max(-np.sort(-calib, axis=1), axis=0).astype(np.float32)
    return dict(qweight=qweight, scales=scales, zeros=zeros, residual_codes=rcodes, residual_scales=rscales,
                thresholds=thresholds, in_features=d_in, out_features=d_out, bits=bits, group_size=gs)


def _x(rng, n_tok, d_in):
    x = rng.standard_normal((n_tok, d_in)) * np.where(np.arange(d_in) % 61 == 0, 12, 1)
    return x.astype(np.float16)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("d_in,d_out", [(576, 192), (1000, 96), (4096, 1024), (2178, 320)])
@pytest.mark.parametrize("k_chunk", [0, 8, 1024])
def test_forward_matches_cpu_backend(bits, gs, d_in, d_out, k_chunk):
    rng = np.random.default_rng(d_in * 7 + d_out + bits + gs + k_chunk)
    arrays = _layer_arrays(rng, d_in, d_out, bits, gs)
    cpu = _C.DecLinear(**arrays, k_chunk=k_chunk, device="cpu")
    gpu = _C.DecLinear(**arrays, k_chunk=k_chunk, device="cuda")
    assert gpu.backend == "cuda"
    for n_tok in (1, 3):
        x = _x(rng, n_tok, d_in)
        xin = x[0] if n_tok == 1 else x
        ref = cpu.forward(xin.astype(np.float32))
        out = _C.DeviceArray(np.full(ref.shape, np.nan, np.float16))  # poisoned
        res = gpu.forward(_C.DeviceArray(xin), out=out)
        assert res is out
        y = out.numpy()
        assert np.isfinite(y).all(), "every output element written"
        assert _rel(y, ref) < 2e-3
        # a fresh result array, same values
        y2 = gpu.forward(_C.DeviceArray(xin)).numpy()
        assert _rel(y2, ref) < 2e-3


def test_accumulate_into_out():
    rng = np.random.default_rng(1)
    arrays = _layer_arrays(rng, 1536, 576, 3, 128)
    cpu = _C.DecLinear(**arrays, k_chunk=8)
    gpu = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    x = _x(rng, 1, 1536)[0]
    y0 = rng.standard_normal(576).astype(np.float16)
    out = _C.DeviceArray(y0)
    gpu.forward(_C.DeviceArray(x), out=out, accumulate=True)
    ref = y0.astype(np.float32) + cpu.forward(x.astype(np.float32))
    assert _rel(out.numpy(), ref) < 2e-3


def test_k_chunk_change_takes_effect():
    rng = np.random.default_rng(2)
    arrays = _layer_arrays(rng, 2048, 256, 4, 128)
    gpu = _C.DecLinear(**arrays, k_chunk=0, device="cuda")
    cpu = _C.DecLinear(**arrays, k_chunk=0)
    x = _x(rng, 1, 2048)[0]
    for k in (0, 16, 3, 0):
        gpu.k_chunk = k
        cpu.k_chunk = k
        assert _rel(gpu.forward(_C.DeviceArray(x)).numpy(), cpu.forward(x.astype(np.float32))) < 2e-3


def test_nan_activation_never_crashes():
    """NaN in x: the GPU neither crashes nor selects a NaN channel, and its output equals the CPU
    backend's element for element in NaN-ness (a NaN anywhere in x reaches every output through the
    base GEMV) -- and a finite x with NaN only where the CPU also has none gives finite, equal values."""
    rng = np.random.default_rng(3)
    arrays = _layer_arrays(rng, 1024, 64, 3, 128)
    gpu = _C.DecLinear(**arrays, k_chunk=64, device="cuda")
    cpu = _C.DecLinear(**arrays, k_chunk=64)
    x = _x(rng, 1, 1024)[0]
    x[::7] = np.nan
    y = gpu.forward(_C.DeviceArray(x)).numpy()
    ref = cpu.forward(x.astype(np.float32))
    assert y.shape == ref.shape == (64,)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    sel = gpu.select(_C.DeviceArray(x))
    np.testing.assert_array_equal(sel, cpu.select(x.astype(np.float32)))
    assert not np.isnan(x[sel]).any()
    x[::7] = 0  # the same layer on a finite x is finite and matches the CPU
    y = gpu.forward(_C.DeviceArray(x)).numpy()
    assert np.isfinite(y).all() and _rel(y, cpu.forward(x.astype(np.float32))) < 2e-3


def test_bad_inputs_raise():
    rng = np.random.default_rng(4)
    arrays = _layer_arrays(rng, 256, 64, 4, 128)
    gpu = _C.DecLinear(**arrays, device="cuda")
    x = _x(rng, 1, 256)[0]
    with pytest.raises(TypeError, match="host"):
        gpu.forward(x)  # a NumPy array is host memory
    with pytest.raises(TypeError, match="float16"):
        gpu.forward(_C.DeviceArray(x.astype(np.float32)))
    with pytest.raises(ValueError, match="in_features"):
        gpu.forward(_C.DeviceArray(x[:128]))
    with pytest.raises(ValueError, match="out must hold"):
        gpu.forward(_C.DeviceArray(x), out=_C.DeviceArray(np.zeros(63, np.float16)))
    host = np.zeros(256, np.float16)
    with pytest.raises(ValueError, match="host memory"):
        gpu.forward(host.ctypes.data)
    with pytest.raises(ValueError, match="out="):
        gpu.forward(_C.DeviceArray(x), accumulate=True)


def test_torch_tensors_and_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(5)
    arrays = _layer_arrays(rng, 4096, 1024, 3, 128)
    cpu = _C.DecLinear(**arrays, k_chunk=8)
    gpu = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    x = _x(rng, 2, 4096)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xt = torch.from_numpy(x).cuda()
        out = torch.full((2, 1024), float("nan"), dtype=torch.float16, device="cuda")
        gpu.forward(xt, out=out, stream=s.cuda_stream)
    s.synchronize()
    assert _rel(out.cpu().numpy(), cpu.forward(x.astype(np.float32))) < 2e-3
    # CUDA-graph capture of a layer call through torch's graph API
    g = torch.cuda.CUDAGraph()
    out2 = torch.empty_like(out)
    cap = torch.cuda.Stream()
    gpu.prepare(cap.cuda_stream)  # the workspace must exist before the capture (v2)
    with torch.cuda.graph(g, stream=cap):
        gpu.forward(xt, out=out2, stream=cap.cuda_stream)
    out2.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out2.cpu().numpy(), cpu.forward(x.astype(np.float32))) < 2e-3


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_pinned_and_device_memory_released():
    rng = np.random.default_rng(6)
    arrays = _layer_arrays(rng, 512, 128, 4, 128)
    for _ in range(200):
        _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    before = _rss_kb()
    for _ in range(10000):
        layer = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
        del layer
    grown = _rss_kb() - before
    assert grown < 20_000, f"RSS grew by {grown} kB over 10,000 create/drop cycles"
    torch = pytest.importorskip("torch")  # device memory: the driver's count, through torch
    x = _C.DeviceArray(np.ones(512, np.float16))
    free0 = torch.cuda.mem_get_info()[0]
    for _ in range(2000):
        layer = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
        layer.forward(x)  # makes a workspace too
        del layer
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info()[0]
    assert free0 - free1 < 16 * 2**20, f"device memory fell by {free0 - free1} bytes"


class _OnlyDLPack:
    """Exposes nothing but DLPack (as JAX arrays do), to exercise the DLPack import path."""

    def __init__(self, inner):
        self.inner = inner

    def __dlpack__(self, stream=None, **kw):
        return self.inner.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.inner.__dlpack_device__()


def test_dlpack_inputs_and_outputs():
    rng = np.random.default_rng(99)
    arrays = _layer_arrays(rng, 1000, 96, 3, 128)
    cpu = _C.DecLinear(**arrays, k_chunk=8, device="cpu")
    gpu = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    x = _x(rng, 2, 1000)
    ref = cpu.forward(x.astype(np.float32))
    out = _C.DeviceArray(np.full(ref.shape, np.nan, np.float16))
    res = gpu.forward(_OnlyDLPack(_C.DeviceArray(x)), out=_OnlyDLPack(out))
    assert isinstance(res, _OnlyDLPack)
    assert _rel(out.numpy(), ref) < 2e-3
    # a DLPack tensor in host memory is refused by name, never dereferenced
    with pytest.raises(ValueError, match="not CUDA"):
        gpu.forward(_OnlyDLPack(x))
    with pytest.raises(TypeError, match="float16"):
        gpu.forward(_OnlyDLPack(_C.DeviceArray(x.astype(np.float32))))
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).cuda()
    y = gpu.forward(_OnlyDLPack(xt)).numpy()
    assert _rel(y, ref) < 2e-3


def test_n_tb_on_the_gpu():
    rng = np.random.default_rng(5)
    arrays = _layer_arrays(rng, 2048, 512, 4, 128)
    cpu = _C.DecLinear(**arrays, k_chunk=8, device="cpu")
    gpu = _C.DecLinear(**arrays, k_chunk=8, device="cuda")
    x = _x(rng, 1, 2048)[0]
    ref = cpu.forward(x.astype(np.float32))
    for n_tb in (1, 4, 32):
        gpu.n_tb = n_tb
        assert _rel(gpu.forward(_C.DeviceArray(x)).numpy(), ref) < 2e-3
    with pytest.raises(ValueError, match="multiprocessor"):
        gpu.n_tb = _C.n_tb_max(_C.cuda_sm_count()) + 1
    assert gpu.n_tb == 32
    fresh = _C.DecLinear(**arrays, device="cuda")
    assert fresh.n_tb == _C.n_tb_default(_C.cuda_sm_count())
