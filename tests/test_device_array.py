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


class _CAI:
    def __init__(self, cai):
        self.__cuda_array_interface__ = cai


class _DLPackOnly:
    def __init__(self, make):
        self.make = make

    def __dlpack__(self, stream=None, **kw):
        return self.make()

    def __dlpack_device__(self):
        return (2, 0)


@pytest.fixture(scope="module")
def layer_and_x():
    rng = np.random.default_rng(3)
    d_in, d_out = 256, 64
    qweight = rng.integers(0, 256, (d_out, d_in // 2), dtype=np.uint8)
    scales = np.full((d_out, 2), 0.01, np.float16)
    zeros = np.full((d_out, 2), 8, np.float16)
    rcodes = rng.integers(0, 256, (d_in, d_out // 2), dtype=np.uint8)
    layer = _C.DecLinear(qweight, scales, zeros, rcodes, np.full(d_out, 0.002, np.float16),
                         np.linspace(5, 0, d_in).astype(np.float32), in_features=d_in,
                         out_features=d_out, bits=4, group_size=128, k_chunk=8, device="cuda")
    x = rng.standard_normal(d_in).astype(np.float16)
    return layer, x


def test_malformed_cuda_array_interface_is_an_exception_not_a_crash(layer_and_x):
    """v1: unchecked PyTuple_GET_ITEM on strides/data (py_device_array.c:435-441), NULL from
    PyUnicode_AsUTF8 into strcmp (:434), size products without overflow checks (:62-65)."""
    layer, x = layer_and_x
    d = _C.DeviceArray(x)
    good = dict(d.__cuda_array_interface__)
    bad_cases = [
        {**good, "shape": [256]}, {**good, "shape": ()}, {**good, "shape": (1, 2, 3)},
        {**good, "shape": ("256",)}, {**good, "shape": (-1,)}, {**good, "shape": (2**62, 2**62)},
        {**good, "shape": (True,)}, {**good, "shape": (2**70,)},
        {**good, "typestr": 5}, {**good, "typestr": "<f8"}, {**good, "typestr": "\udcff"},
        {**good, "typestr": "<f2\0x"},  # an embedded NUL must not pass as "<f2" (fuzz, H200)
        {**good, "data": (d.ptr,)}, {**good, "data": (d.ptr, False, 1)}, {**good, "data": [d.ptr, False]},
        {**good, "data": ("p", False)}, {**good, "data": (d.ptr, 0)}, {**good, "data": (-5, False)},
        {**good, "data": (2**80, False)}, {**good, "data": None},
        {**good, "strides": (2,) * 2}, {**good, "strides": ()}, {**good, "strides": ("2",)},
        {**good, "strides": 2}, {**good, "strides": (4,)},
        {**good, "stream": "s"}, {**good, "stream": 0}, {**good, "stream": -3},
        {**good, "mask": 1}, {k: v for k, v in good.items() if k != "data"}, [], None, 3,
    ]
    for cai in bad_cases:
        with pytest.raises((TypeError, ValueError)) as e:
            layer.forward(_CAI(cai))
        assert str(e.value).startswith("x"), (cai, e.value)  # names the argument
    # the well-formed dict still works, and an int-like (numpy) shape entry is accepted
    y = layer.forward(_CAI(good)).numpy()
    np.testing.assert_array_equal(layer.forward(_CAI({**good, "shape": (np.int64(256),)})).numpy(), y)


def test_device_array_size_overflow_is_a_value_error():
    for shape in [(2**62, 2**62), (2**63 - 1, 4)]:
        with pytest.raises((ValueError, OverflowError)):
            _C.DeviceArray.empty(shape, np.float16)
    with pytest.raises(TypeError):
        _C.DeviceArray.empty([3, 4], np.float16)
    with pytest.raises(TypeError):
        _C.DeviceArray.empty(("3",), np.float16)
    assert _C.DeviceArray.empty((0,), np.float16).shape == (0,)


def test_dlpack_import_keeps_the_tensor_alive_and_deletes_it_once(layer_and_x):
    """v1 read the tensor, dropped its capsule and then used the pointer (:379-382).  Now the
    consumed tensor is kept by the view until the call is enqueued and its deleter runs once."""
    import gc
    import sys

    layer, x = layer_and_x
    want = layer.forward(_C.DeviceArray(x)).numpy()
    inner = _C.DeviceArray(x)
    base = sys.getrefcount(inner)
    for _ in range(50):
        np.testing.assert_array_equal(layer.forward(_DLPackOnly(inner.__dlpack__)).numpy(), want)
    gc.collect()
    assert sys.getrefcount(inner) == base  # each deleter ran exactly once
    # the producer's only reference is the capsule: the tensor must stay valid during the call
    ephemeral = _DLPackOnly(lambda: _C.DeviceArray(x).__dlpack__())
    for _ in range(50):
        np.testing.assert_array_equal(layer.forward(ephemeral).numpy(), want)
    # a used capsule is refused, not read
    cap = inner.__dlpack__()
    layer.forward(_DLPackOnly(lambda: cap))
    with pytest.raises(TypeError, match="unconsumed"):
        layer.forward(_DLPackOnly(lambda: cap))
    del cap
    gc.collect()
    assert sys.getrefcount(inner) == base
