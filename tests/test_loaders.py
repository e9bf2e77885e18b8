"""load_gguf on a tiny GGUF written by the test with gguf.GGUFWriter the way llama.cpp's converter
writes one (Q/K rows permuted, hyperparameters in metadata), plus refusals of what is unsupported.
(load_hf and the SmolLM2 GGUF are checked against transformers in test_model.py.)"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from decdec import loaders  # noqa: E402
from decdec.loaders import load_gguf, unpermute_gguf_qk  # noqa: E402
from decdec.model import LINEAR_NAMES, LlamaModel  # noqa: E402

DIM, LAYERS, HEADS, KV, FFN, VOCAB = 32, 2, 4, 2, 48, 6
HEAD_DIM = DIM // HEADS
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
            .reshape(w.shape)


def write_tiny_gguf(path, *, tied=True, arch="llama", quant_ffn=False, extra_kv=None):
    rng = np.random.default_rng(0)
    hf = {"tok": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
          "norm": rng.standard_normal(DIM).astype(np.float32),
          "out": rng.standard_normal((VOCAB, DIM)).astype(np.float32), "layers": []}
    shapes = {"wq": (HEADS * HEAD_DIM, DIM), "wk": (KV * HEAD_DIM, DIM), "wv": (KV * HEAD_DIM, DIM),
              "wo": (DIM, HEADS * HEAD_DIM), "w_gate": (FFN, DIM), "w_up": (FFN, DIM),
              "w_down": (DIM, FFN)}
    gnames = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", hf["tok"])
    w.add_tensor("output_norm.weight", hf["norm"])
    if not tied:
        w.add_tensor("output.weight", hf["out"])
    for i in range(LAYERS):
        layer = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in LINEAR_NAMES}
        layer["attn_norm"] = rng.standard_normal(DIM).astype(np.float32)
        layer["ffn_norm"] = rng.standard_normal(DIM).astype(np.float32)
        hf["layers"].append(layer)
        w.add_tensor(f"blk.{i}.attn_norm.weight", layer["attn_norm"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", layer["ffn_norm"])
        for n in LINEAR_NAMES:
            stored = layer[n]
            if n == "wq":
                stored = llama_cpp_permute(stored, HEADS)
            elif n == "wk":
                stored = llama_cpp_permute(stored, KV)
            if quant_ffn and n == "w_up":
                # Q8_0 as llama.cpp stores it; the loader must dequantize it.
                q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{i}.{gnames[n]}.weight", q, raw_shape=q.shape,
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                layer["w_up_dequant"] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{gnames[n]}.weight", stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gguf_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path, tied=False, quant_ffn=True)
    weights, tok = load_gguf(path)
    c = weights.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (DIM, LAYERS, HEADS, KV, HEAD_DIM, FFN, VOCAB)
    assert c.rope_theta == 5000.0 and c.max_seq_len == 256 and not c.tie_embeddings
    assert abs(c.norm_eps - 1e-6) < 1e-12 and (c.bos_id, c.eos_id) == (1, 2)
    np.testing.assert_array_equal(weights.tok_embeddings, hf["tok"])
    np.testing.assert_array_equal(weights.lm_head, hf["out"])
    for got, want in zip(weights.layers, hf["layers"]):
        for n in LINEAR_NAMES:
            # wq/wk come back in HF rotate-half order: the converter's permutation is undone.
            expect = want["w_up_dequant"] if n == "w_up" else want[n]
            np.testing.assert_array_equal(got[n], expect, err_msg=n)
        np.testing.assert_array_equal(got["attn_norm"], want["attn_norm"])
    # The Q8_0 tensor really was quantized (not a float passthrough).
    assert not np.array_equal(weights.layers[0]["w_up"], hf["layers"][0]["w_up"])
    assert np.abs(weights.layers[0]["w_up"] - hf["layers"][0]["w_up"]).max() < 0.05
    assert tok.encode("ab").tolist() == [5] and tok.encode("<|im_start|>a").tolist() == [1, 3]
    assert LlamaModel(weights).forward(np.array([1, 3, 4])).shape == (3, VOCAB)


def test_tied_head_shares_the_embedding(tmp_path):
    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    weights, _ = load_gguf(tmp_path / "tied.gguf")
    assert weights.config.tie_embeddings and weights.lm_head is weights.tok_embeddings


def test_unsupported_and_broken_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(junk)
    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        load_gguf(tmp_path / "qwen.gguf")
    write_tiny_gguf(tmp_path / "yarn.gguf", extra_kv={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        load_gguf(tmp_path / "yarn.gguf")
    # A truncated file (cut inside the tensor data) must not load silently.
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-4000])
    with pytest.raises(ValueError):
        load_gguf(cut)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, head_dim in [(9, 64), (3, 64), (4, 6)]:
        w = rng.standard_normal((n_head * head_dim, 10)).astype(np.float32)
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)
        np.testing.assert_array_equal(unpermute_gguf_qk(llama_cpp_permute(w, n_head), n_head), w)
        b = rng.standard_normal(n_head * head_dim)      # biases permute the same way
        np.testing.assert_array_equal(unpermute_gguf_qk(llama_cpp_permute(b, n_head), n_head), b)
    with pytest.raises(ValueError, match="heads"):
        unpermute_gguf_qk(np.zeros((10, 3)), 3)


def test_metadata_reader_without_contents_method(smollm2_path):
    """gguf 0.10 has no ReaderField.contents(); the fallback must read the same values."""
    reader = gguf.GGUFReader(str(smollm2_path))

    class OldField:
        def __init__(self, f):
            self.types, self.parts, self.data = f.types, f.parts, f.data

    for name, field in reader.fields.items():
        if hasattr(field, "contents"):
            assert loaders._gguf_field_value(OldField(field)) == field.contents(), name


def test_load_model_dispatch(tmp_path, monkeypatch):
    from decdec import fetch

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    assert loaders.load_model(path)[0].config.dim == DIM
    # 'smollm2' goes through the verified fetch (faked here to return the tiny file).
    monkeypatch.setattr(fetch, "fetch_smollm2", lambda cache_dir=None: path)
    assert loaders.load_model("smollm2")[0].config.n_layers == LAYERS
    with pytest.raises(FileNotFoundError, match="model not found"):
        loaders.load_model(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        loaders.load_model(tmp_path / "hf")
