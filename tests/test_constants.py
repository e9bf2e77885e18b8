"""decdec.formats is the Python mirror of csrc/decdec.h: every constant and rule it repeats is
checked here against what the compiled extension reports, so the two cannot drift apart."""
import numpy as np
import pytest

from decdec import _C, formats
from decdec.layer import make_declinear
from layer_factory import random_layer

CONSTANTS = ["FORMAT_VERSION", "CHUNK", "NUM_BUCKETS", "BLOCK", "OUT_ALIGN",
             "RESIDUAL_SCALE_CANDIDATES", "RESIDUAL_MAX_CODE", "RESIDUAL_NIBBLE_BIAS", "N_TB_LIMIT"]


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_equals_the_extensions(name):
    assert isinstance(getattr(_C, name), int)
    assert getattr(formats, name) == getattr(_C, name)


def test_constants_have_the_documented_values():
    # decdec.h's text, independently of both mirrors
    assert (formats.CHUNK, formats.NUM_BUCKETS, formats.BLOCK, formats.OUT_ALIGN) == (1024, 32, 128, 32)
    assert (formats.RESIDUAL_MAX_CODE, formats.RESIDUAL_NIBBLE_BIAS) == (7, 8)
    assert formats.RESIDUAL_SCALE_CANDIDATES == 32 and formats.N_TB_LIMIT == 1024


def test_package_level_constants_are_the_extensions():
    import decdec
    assert decdec.CHUNK == _C.CHUNK and decdec.FORMAT_VERSION == _C.FORMAT_VERSION


def test_n_tb_rule_equals_the_extensions():
    for n_sm in range(1, 201):
        assert formats.n_tb_max(n_sm) == _C.n_tb_max(n_sm), n_sm
        assert formats.n_tb_default(n_sm) == _C.n_tb_default(n_sm), n_sm


def test_n_tb_rule_hand_values():
    # max(1, n_sm - 1); clamp(n_sm // 8, 1, max): 132-SM H100/H200 -> 16, 16-SM MIG slice -> 2
    assert [formats.n_tb_max(n) for n in (1, 2, 16, 132)] == [1, 1, 15, 131]
    assert [formats.n_tb_default(n) for n in (1, 2, 7, 8, 16, 132, 200)] == [1, 1, 1, 1, 2, 16, 25]
    for n_sm in range(1, 201):
        assert 1 <= formats.n_tb_default(n_sm) <= formats.n_tb_max(n_sm) < max(2, n_sm)
    with pytest.raises(ValueError):
        formats.n_tb_max(0)


def test_check_n_tb_limits():
    assert formats.check_n_tb(1) == 1 and formats.check_n_tb(1024) == 1024
    assert formats.check_n_tb(np.int64(15), n_sm=16) == 15
    for bad, n_sm in [(0, None), (1025, None), (-1, None), (16, 16), (2, 2), (132, 132)]:
        with pytest.raises(ValueError, match="n_tb must be in"):
            formats.check_n_tb(bad, n_sm)
    for bad in (True, 2.0, "4", None):
        with pytest.raises(TypeError, match="n_tb must be an int"):
            formats.check_n_tb(bad)


def test_cpu_layer_n_tb_limits_are_the_same_in_python_and_c():
    rng = np.random.default_rng(0)
    _, qw, cs, t = random_layer(rng, 32, 128, 4, 128)
    layer = make_declinear(qw, cs, t)
    assert layer.n_tb == formats.N_TB_DEFAULT_CPU
    for n_tb in (1, formats.N_TB_LIMIT):
        layer.n_tb = n_tb
        assert layer.n_tb == n_tb == formats.check_n_tb(n_tb)
    for n_tb in (0, formats.N_TB_LIMIT + 1):
        with pytest.raises(ValueError):
            layer.n_tb = n_tb
        with pytest.raises(ValueError):
            formats.check_n_tb(n_tb)


SHAPES = [(32, 96, 3, 128), (64, 1100, 4, 64), (96, 2048, 3, 64), (160, 3000, 4, 128), (32, 128, 4, 128)]


@pytest.mark.parametrize("d_out,d_in,bits,group_size", SHAPES)
def test_layer_nbytes_is_the_bytes_of_the_arrays(d_out, d_in, bits, group_size):
    """_C.layer_nbytes (the rule pipeline's accounting calls) against the arrays the quantizer
    produces, and against a DecLinear of that shape."""
    rng = np.random.default_rng(d_in)
    _, qw, cs, t = random_layer(rng, d_out, d_in, bits, group_size, calib_tokens=16)
    thresholds = np.ascontiguousarray(t, np.float32)
    layer = make_declinear(qw, cs, thresholds)
    for k in (0, 1, 8, 16, 1024):
        n = _C.layer_nbytes(d_in, d_out, bits, group_size, k)
        assert set(n) == {"weight", "residual", "fetch"}
        assert n["weight"] == (qw.qweight.nbytes + qw.scales.nbytes + qw.zeros.nbytes
                               + cs.scales.nbytes + thresholds.nbytes)
        assert n["residual"] == cs.codes.nbytes == d_in * d_out // 2
        assert n["fetch"] == formats.total_quota(d_in, k) * (d_out // 2)
        layer.k_chunk = k
        assert (layer.weight_nbytes, layer.residual_nbytes, layer.fetch_nbytes) == (
            n["weight"], n["residual"], n["fetch"])


@pytest.mark.parametrize("d_in", [96, 1024, 1100, 1536, 2047, 3000])
@pytest.mark.parametrize("k_chunk", [0, 1, 3, 8, 16, 100, 1024])
def test_chunk_quota_equals_what_the_extension_selects(d_in, k_chunk):
    """The number of channels the C selection takes (exact top-k, no NaN) is formats' quota."""
    rng = np.random.default_rng(d_in + k_chunk)
    _, qw, cs, t = random_layer(rng, 32, d_in, 4, 128, calib_tokens=16)
    layer = make_declinear(qw, cs, t, k_chunk=k_chunk, selection="exact")
    x = rng.permutation(d_in).astype(np.float32) + 1.0  # distinct magnitudes
    idx = layer.select(x)
    assert len(idx) == formats.total_quota(d_in, k_chunk)
    for c, q in enumerate(formats.chunk_quotas(d_in, k_chunk)):
        lo, hi = c * formats.CHUNK, min(d_in, (c + 1) * formats.CHUNK)
        assert int(((idx >= lo) & (idx < hi)).sum()) == q


@pytest.mark.parametrize("d_in,k_chunk,quotas", [
    (96, 8, [1]), (160, 8, [1]), (160, 16, [3]), (2048, 8, [8, 8]), (1536, 8, [8, 4]),
    (1100, 8, [8, 1]), (1088, 8, [8, 1]), (1087, 8, [8, 0]), (64, 1024, [64])])
def test_chunk_quota_hand_values(d_in, k_chunk, quotas):
    # round_half_up(k * L / 1024), at most L: 8 * 64 / 1024 = 0.5 -> 1, 8 * 63 / 1024 < 0.5 -> 0
    assert formats.chunk_quotas(d_in, k_chunk) == quotas
    assert formats.total_quota(d_in, k_chunk) == sum(quotas)
