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


GGUF_LINEAR = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
               "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def add_gguf_block(w, i, layer, n_heads, n_kv, quant_up=False):
    """Block i's tensors as llama.cpp's converter writes them: the norms, the linears with wq / wk
    rows permuted, w_up in Q8_0 when quant_up (returns its dequantization then, else None)."""
    w.add_tensor(f"blk.{i}.attn_norm.weight", layer["attn_norm"])
    w.add_tensor(f"blk.{i}.ffn_norm.weight", layer["ffn_norm"])
    dq = None
    for n in LINEAR_NAMES:
        stored = layer[n]
        if n == "wq":
            stored = llama_cpp_permute(stored, n_heads)
        elif n == "wk":
            stored = llama_cpp_permute(stored, n_kv)
        if quant_up and n == "w_up":
            # Q8_0 as llama.cpp stores it; the loader must dequantize it.
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.{GGUF_LINEAR[n]}.weight", q, raw_shape=q.shape,
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            dq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"blk.{i}.{GGUF_LINEAR[n]}.weight", stored)
    return dq


def write_tiny_gguf(path, *, tied=True, arch="llama", quant_ffn=False, extra_kv=None):
    rng = np.random.default_rng(0)
    hf = {"tok": rng.standard_normal((VOCAB, DIM)).astype(np.float32),
          "norm": rng.standard_normal(DIM).astype(np.float32),
          "out": rng.standard_normal((VOCAB, DIM)).astype(np.float32), "layers": []}
    shapes = {"wq": (HEADS * HEAD_DIM, DIM), "wk": (KV * HEAD_DIM, DIM), "wv": (KV * HEAD_DIM, DIM),
              "wo": (DIM, HEADS * HEAD_DIM), "w_gate": (FFN, DIM), "w_up": (FFN, DIM),
              "w_down": (DIM, FFN)}
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
        dq = add_gguf_block(w, i, layer, HEADS, KV, quant_up=quant_ffn)
        if dq is not None:
            layer["w_up_dequant"] = dq
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


# ---------------------------------------------------------------- corrupt and lying files
# Each test below failed before the layout check (a NumPy message, a KeyError/ZeroDivisionError or
# silent acceptance); bench/reliability.py --target gguf / safetensors fuzzes the same classes.

def _tensor_info_offsets(path, name):
    """Byte offsets of (n_dims, dims[0], type, data offset) of one tensor's info in a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    pos = t.field.offset + 8 + len(name.encode())
    n_dims = len(t.shape)
    return pos, pos + 4, pos + 4 + 8 * n_dims, pos + 8 + 8 * n_dims


def _patch(path, offset, fmt, value):
    import struct
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, value)
    path.write_bytes(bytes(data))


def test_truncated_gguf_is_refused_with_a_word_about_truncation(tmp_path):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, tied=False)
    data = good.read_bytes()
    for cut in (0, 3, 20, 100, 700, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError) as e:
            load_gguf(p)
        msg = str(e.value)
        assert p.name in msg and ("truncated" in msg or "empty" in msg), (cut, msg)
        assert "larger dtype" not in msg and "reshape" not in msg and "mmap" not in msg, msg


def test_lying_tensor_offset_size_and_dims_are_refused(tmp_path):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    size = good.stat().st_size
    cases = [("offset", 3, "Q", 1 << 40, "needs bytes"),
             ("offset", 3, "Q", 64 * 1024, "needs bytes"),
             ("dims", 1, "Q", 1 << 62, "impossible dimensions|needs bytes"),
             ("dims", 1, "Q", 4096, "needs bytes"),
             ("type", 2, "I", 99, "unknown ggml type 99"),
             ("ndims", 0, "I", 7, "7 dimensions")]
    for what, field, fmt, value, match in cases:
        p = tmp_path / f"lie_{what}_{value}.gguf"
        p.write_bytes(good.read_bytes())
        offsets = _tensor_info_offsets(p, "blk.1.ffn_down.weight")
        _patch(p, offsets[field], fmt, value)
        with pytest.raises(ValueError, match=match) as e:
            load_gguf(p)
        assert p.name in str(e.value) and p.stat().st_size == size


def test_lying_counts_are_refused(tmp_path):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    for off, value in ((8, 1 << 40), (16, 1 << 40), (8, 10_000), (16, 5_000)):
        p = tmp_path / f"count_{off}_{value}.gguf"
        p.write_bytes(good.read_bytes())
        _patch(p, off, "Q", value)
        with pytest.raises(ValueError, match=r"claims|truncated or corrupt") as e:
            load_gguf(p)
        assert p.name in str(e.value)
        assert "out of bounds" not in str(e.value) and "larger dtype" not in str(e.value)


def test_bad_metadata_types_and_values_name_the_key(tmp_path):
    def variant(name, **edits):
        p = tmp_path / name
        write_tiny_gguf(p)
        data = bytearray(p.read_bytes())
        reader = gguf.GGUFReader(str(p))
        for key, (fmt, value) in edits.items():
            f = reader.fields[key]
            import struct
            struct.pack_into("<" + fmt, data, f.offset + 8 + len(key) + 4, value)
        p.write_bytes(bytes(data))
        return p

    with pytest.raises(ValueError, match=r"head_count = 0 is out of range") as e:
        load_gguf(variant("heads0.gguf", **{"llama.attention.head_count": ("I", 0)}))
    assert "heads0.gguf" in str(e.value)          # was: ZeroDivisionError
    with pytest.raises(ValueError, match=r"layer_norm_rms_epsilon = nan must be finite"):
        load_gguf(variant("eps.gguf", **{"llama.attention.layer_norm_rms_epsilon":
                                         ("f", float("nan"))}))
    with pytest.raises(ValueError, match=r"bos_token_id = 4294967295 is out of range"):
        load_gguf(variant("bos.gguf", **{"tokenizer.ggml.bos_token_id": ("I", 2**32 - 1)}))
    # a string where an integer belongs (was: "invalid literal for int()" without the file)
    p = tmp_path / "strdim.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_string("llama.embedding_length", "thirty-two")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, DIM), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"strdim.gguf: GGUF metadata llama.embedding_length "
                                         r"must be an integer"):
        load_gguf(p)


def test_broken_tokenizer_metadata_names_the_file(tmp_path):
    p = tmp_path / "tok.gguf"
    write_tiny_gguf(p, extra_kv={"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ValueError, match=r"tok.gguf: .*pre-tokenizer 'no-such-pre'"):
        load_gguf(p)


def test_nan_and_inf_weights_are_refused(tmp_path):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    reader = gguf.GGUFReader(str(good))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_norm.weight")
    for bad in (np.nan, np.inf):
        p = tmp_path / f"bad_{bad}.gguf"
        data = bytearray(good.read_bytes())
        import struct
        struct.pack_into("<f", data, reader.data_offset + t.data_offset - reader.data_offset
                         if t.data_offset >= reader.data_offset else reader.data_offset
                         + t.data_offset, bad)
        p.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=r"blk.0.ffn_norm.weight holds NaN or Inf"):
            load_gguf(p)


def test_real_gguf_truncated_to_1mb(smollm2_path, tmp_path):
    """The issue's reproducer: SmolLM2 cut to 1 MB (inside its tokenizer metadata)."""
    p = tmp_path / "smol_1mb.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match=r"smol_1mb.gguf: .*truncated") as e:
        load_gguf(p)
    assert "larger dtype" not in str(e.value)
    q = tmp_path / "smol_90mb.gguf"
    with open(smollm2_path, "rb") as f:
        q.write_bytes(f.read(90 << 20))
    with pytest.raises(ValueError, match=r"smol_90mb.gguf: truncated or corrupt: tensor .* needs "
                                         r"bytes .* but the file has only 94371840 bytes"):
        load_gguf(q)


# ---------------------------------------------------------------- Hugging Face directories
def _write_hf(d, *, dtype=np.float32, cfg_edit=None, tensors_edit=None, tokenizer=True):
    from safetensors.numpy import save_file
    from decdec.tokenizer import Tokenizer
    d.mkdir(exist_ok=True)
    hd = DIM // HEADS
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": DIM, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "intermediate_size": FFN, "num_hidden_layers": 1,
           "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(cfg_edit or {})
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,),
              "model.layers.0.input_layernorm.weight": (DIM,),
              "model.layers.0.post_attention_layernorm.weight": (DIM,),
              "model.layers.0.self_attn.q_proj.weight": (HEADS * hd, DIM),
              "model.layers.0.self_attn.k_proj.weight": (KV * hd, DIM),
              "model.layers.0.self_attn.v_proj.weight": (KV * hd, DIM),
              "model.layers.0.self_attn.o_proj.weight": (DIM, HEADS * hd),
              "model.layers.0.mlp.gate_proj.weight": (FFN, DIM),
              "model.layers.0.mlp.up_proj.weight": (FFN, DIM),
              "model.layers.0.mlp.down_proj.weight": (DIM, FFN)}
    tensors = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    if tokenizer:
        fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
                  "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
        (d / "tokenizer.json").write_text(Tokenizer.from_gguf_fields(fields).backend.to_str())
    return d


import json  # noqa: E402


def test_tiny_hf_directory_loads(tmp_path):
    w, tok = loaders.load_hf(_write_hf(tmp_path / "hf"))
    assert w.config.dim == DIM and tok.vocab_size == VOCAB


def test_hf_bad_config_json_names_the_file(tmp_path):
    d = _write_hf(tmp_path / "hf")
    for text, match in (("{", "config.json is not valid JSON"), ("[1]", "must hold a JSON object"),
                        ("[" * 100000 + "]" * 100000, "nested too deeply|must hold a JSON object"),
                        (b"\xff\xfe", "not UTF-8")):
        (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=match) as e:
            loaders.load_hf(d)
        assert "config.json" in str(e.value)


@pytest.mark.parametrize("edit, match", [
    ({"hidden_size": "32"}, "hidden_size must be an integer"),
    ({"num_attention_heads": 0}, r"num_attention_heads = 0 is out of range"),
    ({"hidden_size": None, "num_attention_heads": 4}, "lacks 'hidden_size'"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps = nan must be finite"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
    ({"eos_token_id": 99}, "token id 99 is not a token id"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
])
def test_hf_bad_config_values_are_named(tmp_path, edit, match):
    d = _write_hf(tmp_path / "hf", cfg_edit=edit)
    with pytest.raises(ValueError, match=match):
        loaders.load_hf(d)


def test_hf_lying_or_truncated_safetensors_is_a_value_error(tmp_path):
    import struct
    d = _write_hf(tmp_path / "hf")
    p = d / "model.safetensors"
    data = p.read_bytes()
    for bad in (data[: len(data) // 2], struct.pack("<Q", 1 << 40) + data[8:],
                struct.pack("<Q", 3) + data[8:], data[:5]):
        p.write_bytes(bad)
        with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
            loaders.load_hf(d)


def test_hf_index_must_name_files_of_the_directory(tmp_path):
    d = _write_hf(tmp_path / "hf")
    idx = d / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"model.norm.weight": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="not a file of this directory"):
        loaders.load_hf(d)
    idx.write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(ValueError, match="weight_map must map tensor names to file names"):
        loaders.load_hf(d)
    idx.write_text("{")
    with pytest.raises(ValueError, match="index.json: safetensors index is not valid JSON"):
        loaders.load_hf(d)


def test_hf_non_float_or_non_finite_weights_are_refused(tmp_path):
    def to_int(t):
        t["model.norm.weight"] = np.ones(DIM, np.int32)

    with pytest.raises(ValueError, match=r"model.norm.weight has dtype int32, expected a float"):
        loaders.load_hf(_write_hf(tmp_path / "a", tensors_edit=to_int))

    def nan(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 4] = np.inf

    with pytest.raises(ValueError, match=r"up_proj.weight holds NaN or Inf"):
        loaders.load_hf(_write_hf(tmp_path / "b", tensors_edit=nan))


def test_hf_broken_tokenizer_files_name_the_file(tmp_path):
    d = _write_hf(tmp_path / "hf")
    (d / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer.json cannot be read"):
        loaders.load_hf(d)
    d = _write_hf(tmp_path / "hf2")
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        loaders.load_hf(d)
