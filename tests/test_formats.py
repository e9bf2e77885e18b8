"""Packing round trips and the NumPy mirror of decdec.h against the C core."""
import numpy as np
import pytest

import decdec
from decdec import formats


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("d_in", [64, 128, 576, 1000, 1536])
def test_weight_pack_round_trip(bits, d_in):
    rng = np.random.default_rng(d_in + bits)
    codes = rng.integers(0, 1 << bits, size=(32, d_in), dtype=np.uint8)
    packed = formats.pack_weight(codes, bits)
    assert packed.shape == (32, formats.qweight_row_bytes(d_in, bits))
    assert packed.shape[1] % 16 == 0  # every row 16-byte aligned for coalesced GPU loads
    np.testing.assert_array_equal(formats.unpack_weight(packed, bits, d_in), codes)


def test_weight_bit_layout_is_the_documented_one():
    # 4-bit: element 8w+k in bits [4k, 4k+4) of little-endian word w
    codes = np.zeros((1, 128), np.uint8)
    codes[0, 9] = 0xA  # word 1, k = 1
    word = formats.pack_weight(codes, 4).view("<u4")[0, 1]
    assert word == 0xA << 4
    # 3-bit: lo plane word w holds elements 16w..16w+15 (2 bits each); hi plane bit k = element 32w+k
    codes = np.zeros((1, 128), np.uint8)
    codes[0, 17] = 0b110
    packed = formats.pack_weight(codes, 3)
    lo = packed[0, :32].view("<u4")
    hi = packed[0, 32:].view("<u4")
    assert lo[1] == 0b10 << 2 and hi[0] == 1 << 17


def test_residual_pack_round_trip():
    rng = np.random.default_rng(1)
    codes = rng.integers(-7, 8, size=(100, 64)).astype(np.int8)
    packed = formats.pack_residual(codes)
    assert packed.shape == (100, 32)
    assert (packed & 0xF).min() >= 1  # nibble 0 (= -8) is never written
    np.testing.assert_array_equal(formats.unpack_residual(packed), codes)
    with pytest.raises(ValueError):
        formats.pack_residual(np.full((2, 4), 8))


@pytest.mark.parametrize("d_in,k_chunk,expected", [
    (4096, 8, [8, 8, 8, 8]), (576, 8, [5]), (576, 1, [1]), (1536, 8, [8, 4]),
    (1100, 16, [16, 1]), (14336, 0, [0] * 14), (100, 1024, [100]),
])
def test_chunk_quotas(d_in, k_chunk, expected):
    assert formats.chunk_quotas(d_in, k_chunk) == expected


def test_bucket_floors_match_c_bit_for_bit():
    rng = np.random.default_rng(2)
    for _ in range(50):
        t = np.sort(np.abs(rng.standard_t(2, 3000)).astype(np.float32))[::-1].copy()
        k = int(rng.integers(1, 3000))
        c = decdec._C.bucket_floors(t, k)
        py = formats.bucket_floors(t, k)
        np.testing.assert_array_equal(c.view(np.uint32), py.view(np.uint32))
        assert (np.diff(c) <= 0).all()  # non-increasing
        assert c[0] == t[0] and c[15] == t[k - 1] and c[31] == 0
