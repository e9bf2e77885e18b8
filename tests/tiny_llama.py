"""A tiny random Llama (GQA, untied head) and a byte-level tokenizer for the pipeline tests.

Sizes satisfy decdec.h: every d_out is a multiple of 32; d_in = 96 and 160 are not multiples of
128, so padding and a partial last quantization group are exercised.
"""
from __future__ import annotations

import numpy as np

from decdec.model import LINEAR_NAMES, LlamaConfig, LlamaWeights


def tiny_config(**kw) -> LlamaConfig:
    base = dict(dim=96, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=16, ffn_dim=160,
                vocab_size=300, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
                max_seq_len=2048, bos_id=256, eos_id=257)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_weights(seed: int = 0, outliers: bool = True, **kw) -> LlamaWeights:
    """Random weights; with outliers, a few residual-stream channels carry large activations
    (as in real LLMs) so that activation-aware scaling has something to find."""
    c = tiny_config(**kw)
    rng = np.random.default_rng(seed)
    q, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"wq": (q, c.dim), "wk": (kvd, c.dim), "wv": (kvd, c.dim), "wo": (c.dim, q),
              "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim), "w_down": (c.dim, c.ffn_dim)}
    emb = rng.standard_normal((c.vocab_size, c.dim)).astype(np.float32)
    if outliers:
        emb[:, :3] *= 8.0
    layers = []
    for _ in range(c.n_layers):
        layer = {n: (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
                 for n, s in shapes.items()}
        layer["attn_norm"] = (1.0 + 0.2 * rng.standard_normal(c.dim)).astype(np.float32)
        layer["ffn_norm"] = (1.0 + 0.2 * rng.standard_normal(c.dim)).astype(np.float32)
        layers.append(layer)
    norm = np.ones(c.dim, np.float32)
    head = (rng.standard_normal((c.vocab_size, c.dim)) / np.sqrt(c.dim)).astype(np.float32)
    return LlamaWeights(c, emb, layers, norm, head)


def byte_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes, 256 BOS, 257 EOS (no merges)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from decdec.tokenizer import Tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's alphabet in byte order: bytes_to_unicode maps byte b to one character.
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: F401
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return Tokenizer(backend, bos_id=256, eos_id=257)


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def calib_tokens(n: int = 1100, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


__all__ = ["tiny_config", "tiny_weights", "byte_tokenizer", "calib_tokens", "LINEAR_NAMES"]


def assert_same_quantized(a, b) -> None:
    """Two QuantizedModels hold equal arrays of equal dtypes: per block the bits, norms and AWQ
    scales, per linear the packed codes, scales, zeros, cheatsheet and thresholds; embeddings, head."""
    for x, y in zip(a.blocks, b.blocks):
        assert x.bits == y.bits
        np.testing.assert_array_equal(x.attn_norm, y.attn_norm)
        np.testing.assert_array_equal(x.scales.attn_in, y.scales.attn_in)
        np.testing.assert_array_equal(x.scales.down_in, y.scales.down_in)
        for name, ql in x.linears.items():
            q2 = y.linears[name]
            for u, v in ((ql.qweight.qweight, q2.qweight.qweight), (ql.qweight.scales, q2.qweight.scales),
                         (ql.qweight.zeros, q2.qweight.zeros), (ql.cheatsheet.codes, q2.cheatsheet.codes),
                         (ql.cheatsheet.scales, q2.cheatsheet.scales), (ql.thresholds, q2.thresholds)):
                assert u.dtype == v.dtype
                np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.tok_embeddings, b.tok_embeddings)
    np.testing.assert_array_equal(a.lm_head, b.lm_head)
