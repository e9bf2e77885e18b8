"""Packing round trips and the NumPy mirror of decdec.h against the C core."""
import numpy as np
import pytest

import decdec
from decdec import _C, formats


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


@pytest.mark.parametrize("d_in", [128, 576, 1000, 4096 + 64])
def test_fields3_layout_round_trips_and_matches_the_c_repack(d_in):
    """The 3-bit FIELDS device layout (decdec.h): codes -> fields -> codes is exact, the C repack of
    the planar rows gives the NumPy layout bit for bit, and the documented positions hold (element
    10w+f of a chunk in word w at bit 3f / 16+3(f-5); elements 30, 31 spread over bits 15 / 31)."""
    rng = np.random.default_rng(d_in)
    codes = rng.integers(0, 8, size=(64, d_in), dtype=np.uint8)
    fields = formats.fields3_from_codes(codes)
    assert fields.shape == (64, formats.qweight_row_bytes(d_in, 3))
    np.testing.assert_array_equal(formats.codes_from_fields3(fields, d_in), codes)
    np.testing.assert_array_equal(_C.repack_fields3(formats.pack_weight(codes, 3), d_in), fields)
    d_pad = formats.padded_in_features(d_in)
    one = np.zeros((32, d_in), np.uint8)
    for e in range(32):
        one[e, e] = 7 if e < 30 else 5          # chunk 0 only; 5 = bits 0 and 2
    words = formats.fields3_from_codes(one)
    w = np.concatenate([words[:, :8].view("<u4"), words[:, d_pad // 4: d_pad // 4 + 4].view("<u4")], axis=1)
    for e in range(30):
        word, f = divmod(e, 10)
        expect = np.zeros(3, np.uint32)
        expect[word] = 7 << (3 * f if f < 5 else 16 + 3 * (f - 5))
        np.testing.assert_array_equal(w[e], expect)
    np.testing.assert_array_equal(w[30], [1 << 15, 0, 1 << 15])
    np.testing.assert_array_equal(w[31], [1 << 31, 0, 1 << 31])


def test_fields3_rejects_bad_input():
    with pytest.raises(ValueError, match="codes must lie"):
        formats.fields3_from_codes(np.full((32, 128), 8, np.uint8))
    for bits in (3, 4):   # negative or non-integer codes are refused, not wrapped
        with pytest.raises(ValueError, match="codes must lie .* as integers"):
            formats.pack_weight(np.full((32, 128), -1, np.int64), bits)
        with pytest.raises(ValueError, match="codes must lie .* as integers"):
            formats.pack_weight(np.full((32, 128), 0.5, np.float32), bits)
    with pytest.raises(ValueError, match="codes must lie .* as integers"):
        formats.fields3_from_codes(np.full((32, 128), -1, np.int64))
    with pytest.raises(ValueError, match="rows must be"):
        _C.repack_fields3(np.zeros((32, 47), np.uint8), 128)
    with pytest.raises(ValueError, match="not a valid 3-bit layer"):
        _C.repack_fields3(np.zeros((31, 48), np.uint8), 128)
