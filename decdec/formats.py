"""NumPy mirror of the storage formats defined in csrc/decdec.h (read its header comment).

Packing and unpacking of the base weight (3-bit planar, 4-bit nibbles; d_in padded to 128) and of
the residual cheatsheet (input-channel-major nibbles, code + 8).  These are the only Python
functions that know bit layouts; everything else goes through them.
"""
from __future__ import annotations

import numpy as np

# decdec.h's constants, mirrored (tests/test_constants.py checks each against decdec._C)
FORMAT_VERSION = 1   # DD_FORMAT_VERSION: the storage formats below
BLOCK = 128          # d_in is padded to a multiple of this
CHUNK = 1024         # selection chunk width
NUM_BUCKETS = 32
OUT_ALIGN = 32       # d_out must be a multiple of this
RESIDUAL_MAX_CODE = 7
RESIDUAL_NIBBLE_BIAS = 8
RESIDUAL_SCALE_CANDIDATES = 32   # residual scale: the MSE-best of this many candidates per channel
N_TB_LIMIT = 1024    # DD_N_TB_LIMIT: the largest n_tb a CPU layer accepts
N_TB_DEFAULT_CPU = 16            # a CPU layer's default n_tb (kept for when its weights go to a GPU)
SUPPORTED_BITS = (3, 4)
SUPPORTED_GROUP_SIZES = (64, 128)


def n_tb_max(n_sm: int) -> int:
    """dd_n_tb_max: DEC may hold at most all but one of a GPU's n_sm multiprocessors."""
    if n_sm < 1:
        raise ValueError(f"n_sm must be >= 1, got {n_sm}")
    return max(1, n_sm - 1)


def n_tb_default(n_sm: int) -> int:
    """dd_n_tb_default: an eighth of the SMs (16 on a 132-SM H100/H200), within 1..n_tb_max."""
    return min(max(n_sm // 8, 1), n_tb_max(n_sm))


def check_n_tb(n_tb, n_sm: int | None = None) -> int:
    """n_tb as an int if a layer accepts it: 1..n_tb_max(n_sm) on a GPU of n_sm SMs, 1..N_TB_LIMIT
    for a CPU layer (n_sm None); ValueError (TypeError for a non-integer) otherwise, with the same
    limits as the C binding."""
    if isinstance(n_tb, bool) or not hasattr(n_tb, "__index__"):
        raise TypeError(f"n_tb must be an int, got {type(n_tb).__name__}")
    n_tb = int(n_tb)
    hi, where = (N_TB_LIMIT, "a CPU layer") if n_sm is None else (n_tb_max(n_sm), f"a GPU of {n_sm} SMs")
    if not 1 <= n_tb <= hi:
        raise ValueError(f"n_tb must be in [1, {hi}] for {where}, got {n_tb}")
    return n_tb


def padded_in_features(d_in: int) -> int:
    return -(-d_in // BLOCK) * BLOCK


def num_groups(d_in: int, group_size: int) -> int:
    return padded_in_features(d_in) // group_size


def qweight_row_bytes(d_in: int, bits: int) -> int:
    return padded_in_features(d_in) * bits // 8


def check_layer_shape(d_out: int, d_in: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if d_in <= 0 or d_out <= 0:
        raise ValueError(f"layer shape must be positive, got {d_out} x {d_in}")
    if d_out % OUT_ALIGN:
        raise ValueError(f"out_features must be a multiple of {OUT_ALIGN}, got {d_out}")


def _base_codes(codes, bits: int) -> np.ndarray:
    """codes as a 2-D integer array with every value in [0, 2**bits), else ValueError."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError("codes must be 2-D [d_out, d_in]")
    if codes.size and (codes.dtype.kind not in "iub" or int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) as integers, got {codes.dtype} in "
                         f"[{codes.min()}, {codes.max()}]")
    return codes


def pack_weight(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [d_out, d_in] in [0, 2**bits) -> packed uint8 [d_out, qweight_row_bytes]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = _base_codes(codes, bits)
    d_out, d_in = codes.shape
    q = np.zeros((d_out, padded_in_features(d_in)), np.uint8)
    q[:, :d_in] = codes
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4))
    lo = (q & 3).reshape(d_out, -1, 4)
    lo = lo[..., 0] | (lo[..., 1] << 2) | (lo[..., 2] << 4) | (lo[..., 3] << 6)
    hi = np.packbits((q >> 2) & 1, axis=1, bitorder="little")
    return np.ascontiguousarray(np.concatenate([lo, hi], axis=1))


def unpack_weight(packed: np.ndarray, bits: int, d_in: int) -> np.ndarray:
    """Inverse of pack_weight: uint8 [d_out, d_in] codes."""
    packed = np.asarray(packed, np.uint8)
    d_out = packed.shape[0]
    d_pad = padded_in_features(d_in)
    if packed.shape != (d_out, qweight_row_bytes(d_in, bits)):
        raise ValueError(f"packed weight must have shape ({d_out}, {qweight_row_bytes(d_in, bits)}),"
                         f" got {packed.shape}")
    if bits == 4:
        q = np.empty((d_out, d_pad), np.uint8)
        q[:, 0::2] = packed & 0xF
        q[:, 1::2] = packed >> 4
    else:
        lo_bytes, hi_bytes = packed[:, : d_pad // 4], packed[:, d_pad // 4:]
        lo = np.stack([(lo_bytes >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(d_out, d_pad)
        hi = np.unpackbits(hi_bytes, axis=1, bitorder="little")[:, :d_pad]
        q = lo | (hi << 2)
    return q[:, :d_in]


def fields3_from_codes(codes: np.ndarray) -> np.ndarray:
    """3-bit codes uint8 [d_out, d_in] -> the FIELDS device layout of decdec.h (the tensor-core base
    kernel's; not a storage format): per 32-element chunk c, words w0, w1 at bytes [8c, 8c+8) and w2
    at byte d_pad/4 + 4c of the row; element 10w+f in bits 3f (f < 5) or 16+3(f-5) of word w;
    elements 30 / 31: their bit b in bit 15 / 31 of word b.  Same bytes per row as planar."""
    codes = _base_codes(codes, 3)
    d_out, d_in = codes.shape
    d_pad = padded_in_features(d_in)
    q = np.zeros((d_out, d_pad), np.uint32)
    q[:, :d_in] = codes
    q = q.reshape(d_out, d_pad // 32, 32)
    words = np.zeros((d_out, d_pad // 32, 3), np.uint32)
    for e in range(30):
        w, f = divmod(e, 10)
        words[..., w] |= q[..., e] << np.uint32(3 * f if f < 5 else 16 + 3 * (f - 5))
    for e, bit in ((30, 15), (31, 31)):
        for b in range(3):
            words[..., b] |= ((q[..., e] >> np.uint32(b)) & np.uint32(1)) << np.uint32(bit)
    lo = words[..., :2].astype("<u4").reshape(d_out, -1).view(np.uint8)
    hi = words[..., 2].astype("<u4").reshape(d_out, -1).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([lo, hi], axis=1))


def codes_from_fields3(fields: np.ndarray, d_in: int) -> np.ndarray:
    """Inverse of fields3_from_codes: uint8 [d_out, d_in] codes."""
    fields = np.asarray(fields, np.uint8)
    d_out, d_pad = fields.shape[0], padded_in_features(d_in)
    if fields.shape != (d_out, qweight_row_bytes(d_in, 3)):
        raise ValueError(f"fields must have shape ({d_out}, {qweight_row_bytes(d_in, 3)}), got {fields.shape}")
    lo = np.ascontiguousarray(fields[:, : d_pad // 4]).view("<u4").reshape(d_out, -1, 2)
    hi = np.ascontiguousarray(fields[:, d_pad // 4:]).view("<u4").reshape(d_out, -1, 1)
    words = np.concatenate([lo, hi], axis=2).astype(np.uint32)
    q = np.zeros((d_out, d_pad // 32, 32), np.uint8)
    for e in range(30):
        w, f = divmod(e, 10)
        q[..., e] = (words[..., w] >> np.uint32(3 * f if f < 5 else 16 + 3 * (f - 5))) & np.uint32(7)
    for e, bit in ((30, 15), (31, 31)):
        q[..., e] = sum((((words[..., b] >> np.uint32(bit)) & np.uint32(1)) << np.uint32(b)) for b in range(3))
    return q.reshape(d_out, d_pad)[:, :d_in]


def pack_residual(codes: np.ndarray) -> np.ndarray:
    """Signed codes int [d_in, d_out] in [-7, 7] -> uint8 [d_in, d_out // 2] (nibble = code + 8)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 2:
        raise ValueError("residual codes must be 2-D [d_in, d_out] with even d_out")
    if codes.size and np.abs(codes).max() > RESIDUAL_MAX_CODE:
        raise ValueError(f"residual codes must lie in [-{RESIDUAL_MAX_CODE}, {RESIDUAL_MAX_CODE}]")
    n = (codes.astype(np.int16) + RESIDUAL_NIBBLE_BIAS).astype(np.uint8)
    return np.ascontiguousarray(n[:, 0::2] | (n[:, 1::2] << 4))


def unpack_residual(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_residual: int8 [d_in, d_out]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2] = (packed & 0xF).astype(np.int8) - RESIDUAL_NIBBLE_BIAS
    out[:, 1::2] = (packed >> 4).astype(np.int8) - RESIDUAL_NIBBLE_BIAS
    return out


def chunk_quotas(d_in: int, k_chunk: int) -> list[int]:
    """Per-chunk selection quota (decdec.h, dd_chunk_quota): k_chunk per full chunk, a partial last
    chunk of length L gets round_half_up(k_chunk * L / 1024), at most L.  The one Python definition
    of the rule: every Python user calls this (or total_quota)."""
    if not 0 <= k_chunk <= CHUNK:
        raise ValueError(f"k_chunk must be in [0, {CHUNK}], got {k_chunk}")
    quotas = []
    for start in range(0, d_in, CHUNK):
        length = min(CHUNK, d_in - start)
        quotas.append(k_chunk if length == CHUNK else min(length, (k_chunk * length + CHUNK // 2) // CHUNK))
    return quotas


def total_quota(d_in: int, k_chunk: int) -> int:
    """dd_total_quota: channels a layer of width d_in selects per token."""
    return sum(chunk_quotas(d_in, k_chunk))


def bucket_floors(thresholds: np.ndarray, k_total: int) -> np.ndarray:
    """The 32 fp32 bucket floors of decdec.h, with the same fp32 operation order as the C core."""
    t = np.asarray(thresholds, np.float32)
    a, b = np.float32(t[0]), np.float32(t[k_total - 1])
    f = np.empty(NUM_BUCKETS, np.float32)
    span = np.float32(b - a)
    for i in range(16):
        f[i] = a + np.float32(np.float32(span * np.float32(i)) / np.float32(15))
    f[15] = b
    for i in range(16, NUM_BUCKETS):
        f[i] = np.float32(b * np.float32(31 - i)) / np.float32(16)
    return f
