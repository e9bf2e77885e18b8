"""The NumPy Llama forward against Hugging Face transformers run in float64 (the reference), on
small random checkpoints written by the test (Llama, tied + Llama-3.1 RoPE scaling, Qwen2 with
q/k/v biases, Mistral with a sliding window) and on the real SmolLM2 GGUF (which transformers
dequantizes and un-permutes on its own: an independent path)."""

import json

import numpy as np
import pytest

from decdec.loaders import load_hf
from decdec.model import LINEAR_NAMES, DenseLinear, LlamaModel

try:  # the references; tests of the NumPy model alone run without them
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch and transformers not installed")

# float32 NumPy vs float64 torch on tiny random models: rounding differences only.
RANDOM_ATOL = 2e-4


def _base_config(**overrides):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=300.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


VARIANTS = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", _base_config()),
    "llama_tied_llama3_rope": ("LlamaConfig", "LlamaForCausalLM", _base_config(
        tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", _base_config(
        tie_word_embeddings=True, use_sliding_window=False)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", _base_config(sliding_window=5)),
}


def _write_random_checkpoint(tmp_path, variant, dtype=None, **save_kwargs):
    config_cls, model_cls, cfg = VARIANTS[variant]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**cfg)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # Default init gives near-zero logits; widen the norms and biases so that every term
        # (including RoPE and the biases) visibly affects the output.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp_path, safe_serialization=True, **save_kwargs)
    return model


def _torch_logits64(model, tokens):
    model = model.to(torch.float64)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))[None]).logits[0].numpy()


@needs_torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_checkpoint_matches_transformers(tmp_path, variant):
    hf_model = _write_random_checkpoint(tmp_path, variant)
    weights, tok = load_hf(tmp_path)
    assert tok is None  # no tokenizer.json written
    tokens = np.random.default_rng(1).integers(0, weights.config.vocab_size, 23)
    ours = LlamaModel(weights).forward(tokens)
    ref = _torch_logits64(hf_model, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # a meaningful signal, not all-zero logits
    np.testing.assert_allclose(ours, ref, rtol=0, atol=RANDOM_ATOL)


@needs_torch
def test_config_read_from_file(tmp_path):
    _write_random_checkpoint(tmp_path, "qwen2_bias")
    c = load_hf(tmp_path)[0].config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (64, 3, 8, 2, 8, 112, 97)
    assert c.attn_bias and c.tie_embeddings and c.norm_eps == 1e-5 and c.max_seq_len == 128
    assert c.rope_theta == 300.0 and c.rope_scaling is None
    _write_random_checkpoint(tmp_path, "mistral_window")
    assert load_hf(tmp_path)[0].config.sliding_window == 5


@needs_torch
def test_sharded_and_bf16_checkpoints(tmp_path):
    model = _write_random_checkpoint(tmp_path, "llama_gqa_untied", dtype=torch.bfloat16,
                                     max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    weights, _ = load_hf(tmp_path)
    expect = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.float32).numpy()
    np.testing.assert_array_equal(weights.layers[1]["w_down"], expect)
    tokens = np.arange(11) * 7 % 97
    # Reload for the reference: model.to(bfloat16) also rounded its RoPE inv_freq buffer.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    ref = _torch_logits64(reloaded, tokens)  # bf16 weights widened to float64 exactly
    np.testing.assert_allclose(LlamaModel(weights).forward(tokens), ref, rtol=0, atol=RANDOM_ATOL)


@needs_torch
def test_unsupported_configs_are_refused(tmp_path):
    _write_random_checkpoint(tmp_path, "llama_gqa_untied")
    cfg_path = tmp_path / "config.json"
    original = json.loads(cfg_path.read_text())
    cases = [({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
             ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
             ({"hidden_act": "gelu"}, "hidden_act"),
             ({"attention_bias": True}, "attention_bias")]
    for change, message in cases:
        cfg_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path)
    cfg_path.write_text(json.dumps(original))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    if torch is None:
        pytest.skip("torch and transformers not installed")
    path = tmp_path_factory.mktemp("random_llama")
    _write_random_checkpoint(path, "llama_gqa_untied")
    return LlamaModel(load_hf(path)[0])


@needs_torch
@pytest.mark.parametrize("variant", ["llama_gqa_untied", "mistral_window"])
def test_kv_cache_decode_equals_full_pass(tmp_path, variant):
    _write_random_checkpoint(tmp_path, variant)
    model = LlamaModel(load_hf(tmp_path)[0])
    tokens = np.random.default_rng(2).integers(0, 97, 17)
    full = model.forward(tokens)
    cache = model.new_cache(32)
    steps = [model.forward(tokens[:9], cache=cache)]
    for t in tokens[9:]:
        steps.append(model.forward(np.array([t]), cache=cache))
    assert cache.length == 17
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-4)


@needs_torch
def test_hook_sees_every_linear_input(random_model):
    seen = {}

    def hook(layer, name, x):
        assert x.dtype == np.float32 and x.ndim == 2
        seen[(layer, name)] = x.copy()

    tokens = np.array([3, 14, 15, 92, 65])
    random_model.forward(tokens, hook=hook)
    c = random_model.config
    assert set(seen) == {(i, n) for i in range(c.n_layers) for n in LINEAR_NAMES}
    for i in range(c.n_layers):
        assert seen[(i, "wq")].shape == (5, c.dim)
        assert seen[(i, "w_down")].shape == (5, c.ffn_dim)
        assert seen[(i, "wo")].shape == (5, c.n_heads * c.head_dim)
        np.testing.assert_array_equal(seen[(i, "wq")], seen[(i, "wk")])
        np.testing.assert_array_equal(seen[(i, "w_gate")], seen[(i, "w_up")])
    # Layer 0's attention input is RMSNorm(embedding) * weight, recomputed here in float64.
    w = random_model.weights
    e = w.tok_embeddings[tokens].astype(np.float64)
    rms = np.sqrt(np.mean(e * e, axis=-1, keepdims=True) + c.norm_eps)
    expect = e / rms * w.layers[0]["attn_norm"]
    np.testing.assert_allclose(seen[(0, "wq")], expect, rtol=1e-5, atol=1e-6)


@needs_torch
def test_replacement_linears_are_used(random_model):
    w = random_model.weights
    tokens = np.array([5, 6, 7, 8])
    calls = []

    class Recorder(DenseLinear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    perturbed = w.layers[1]["w_up"] + np.float32(0.05)
    model = LlamaModel(w, linears={(1, "w_up"): Recorder(perturbed)})
    out = model.forward(tokens)
    assert calls == [(4, w.config.dim)]
    assert np.abs(out - random_model.forward(tokens)).max() > 1e-3
    # Same result as a model whose weights carry the perturbation.
    layers = [dict(layer) for layer in w.layers]
    layers[1]["w_up"] = perturbed
    from decdec.model import LlamaWeights
    alt = LlamaWeights(config=w.config, tok_embeddings=w.tok_embeddings, layers=layers,
                       norm=w.norm, lm_head=w.lm_head)
    np.testing.assert_allclose(out, LlamaModel(alt).forward(tokens), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="bad linears key"):
        LlamaModel(w, linears={(9, "w_up"): DenseLinear(perturbed)})
    with pytest.raises(TypeError, match="forward"):
        LlamaModel(w, linears={(0, "w_up"): perturbed})
    with pytest.raises(ValueError, match="needs"):
        LlamaModel(w, linears={(0, "w_up"): DenseLinear(perturbed.T)})
    # A replaced layer needs no float matrix (quantized models keep none); others still do.
    layers[0]["w_gate"] = None
    lean = LlamaWeights(config=w.config, tok_embeddings=w.tok_embeddings, layers=layers,
                        norm=w.norm, lm_head=w.lm_head)
    gate = DenseLinear(w.layers[0]["w_gate"])
    np.testing.assert_array_equal(
        LlamaModel(lean, linears={(0, "w_gate"): gate, (1, "w_up"): DenseLinear(perturbed)})
        .forward(tokens), out)
    with pytest.raises(ValueError, match=r"layers\[0\]\['w_gate'\]"):
        LlamaModel(lean)


@needs_torch
def test_bad_inputs_raise(random_model):
    with pytest.raises(ValueError, match="token ids"):
        random_model.forward(np.array([0, 97]))
    with pytest.raises(ValueError, match="1-D integer"):
        random_model.forward(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        random_model.forward(np.array([], dtype=np.int64))
    cache = random_model.new_cache(4)
    random_model.forward(np.array([1, 2, 3]), cache=cache)
    with pytest.raises(ValueError, match="do not fit"):
        random_model.forward(np.array([1, 2]), cache=cache)
    with pytest.raises(ValueError, match="last dim"):
        DenseLinear(np.zeros((3, 4), np.float32)).forward(np.zeros((1, 5), np.float32))


# ------------------------------------------------------------------------------ SmolLM2 (real)

def test_smollm2_config_from_metadata(smollm2):
    weights, _ = smollm2
    c = weights.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (576, 30, 9, 3, 64, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.max_seq_len == 8192 and c.tie_embeddings
    assert abs(c.norm_eps - 1e-5) < 1e-12 and (c.bos_id, c.eos_id) == (1, 2)
    assert weights.lm_head is weights.tok_embeddings


@needs_torch
def test_smollm2_matches_transformers_gguf(smollm2_path, smollm2, smollm2_model):
    """transformers reads the same GGUF with its own dequantizer and Q/K un-permutation."""
    pytest.importorskip("accelerate")  # transformers requires it for gguf_file=
    pytest.importorskip("gguf")
    weights, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float64)
    hf.eval()
    # Same dequantized numbers (transformers goes through float32 too).
    q_hf = hf.model.layers[7].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(weights.layers[7]["wq"], q_hf.astype(np.float32))
    tokens = tok.encode("The quick brown fox jumps over the lazy dog. In 1813, Jane Austen wrote")
    ours = smollm2_model.forward(tokens)
    ref = _torch_logits64(hf, tokens)
    # Logits reach ~34 in magnitude; float32 over 30 layers measured 1.2e-4 from float64.
    err = np.abs(ours - ref).max()
    assert err < 1e-3, err
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_kv_cache_decode_equals_full_pass(smollm2, smollm2_model):
    tokens = smollm2[1].encode("It is a truth universally acknowledged, that a single man")
    full = smollm2_model.forward(tokens)
    cache = smollm2_model.new_cache(64)
    parts = [smollm2_model.forward(tokens[:6], cache=cache)]
    for t in tokens[6:]:
        parts.append(smollm2_model.forward(np.array([t]), cache=cache))
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=2e-3)
