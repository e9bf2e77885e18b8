"""decdec.DeviceArray: upload, download, __cuda_array_interface__ v3 and DLPack."""
import numpy as np
import pytest

_C = pytest.importorskip("decdec._C")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (_C.built_with_cuda() and _C.cuda_available()),
                                                  reason="needs a CUDA build of decdec and a GPU")]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8, np.int32])
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_roundtrip(dtype, shape):
    a = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    d = _C.DeviceArray(a)
    assert d.shape == shape and d.dtype == np.dtype(dtype) and d.nbytes == a.nbytes
    np.testing.assert_array_equal(d.numpy(), a)


def test_cuda_array_interface_v3():
    d = _C.DeviceArray(np.arange(6, dtype=np.float16).reshape(2, 3))
    cai = d.__cuda_array_interface__
    assert cai["version"] == 3 and cai["shape"] == (2, 3) and cai["typestr"] == "<f2"
    assert cai["data"][0] == d.ptr and cai["data"][1] is False and cai["strides"] is None


def test_empty_and_errors():
    d = _C.DeviceArray.empty((4, 2), np.float32)
    assert d.shape == (4, 2) and d.dtype == np.float32
    with pytest.raises(TypeError):
        _C.DeviceArray(np.zeros((2, 2, 2), np.float16))
    with pytest.raises(TypeError):
        _C.DeviceArray(np.zeros(3, np.float64))


def test_torch_interop():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    a = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float16)
    d = _C.DeviceArray(a)
    assert d.__dlpack_device__() == (2, torch.cuda.current_device())
    t = torch.from_dlpack(d)
    np.testing.assert_array_equal(t.cpu().numpy(), a)
    t2 = torch.as_tensor(d, device="cuda")  # through __cuda_array_interface__
    np.testing.assert_array_equal(t2.cpu().numpy(), a)
    del d  # the capsule keeps the memory alive for torch
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.cpu().numpy(), a)
