"""Load Llama-family weights into LlamaWeights (float32, Hugging Face layout) plus a Tokenizer.

- load_gguf: a llama.cpp GGUF file (architecture 'llama'), dequantized with PyPI `gguf`. The
  dequantized tensors are the reference weights of everything downstream.
- load_hf: a Hugging Face directory (config.json + *.safetensors [+ index] + tokenizer.json) of
  LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .model import BIAS_NAMES, LINEAR_NAMES, LlamaConfig, LlamaWeights
from .tokenizer import Tokenizer

_GGUF_LINEAR = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
_HF_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                     "Qwen2ForCausalLM": "qwen2"}


def unpermute_gguf_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation, giving Hugging Face rotate-half row order.

    convert_hf_to_gguf.py stores, per head, the rows of the first and second RoPE halves
    interleaved (w.reshape(H, 2, hd/2, ...).swapaxes(1, 2)) so that llama.cpp can rotate adjacent
    pairs. The inverse views each head's rows as (hd/2, 2) and swaps the axes back.
    Works for weights [H*hd, d_in] and biases [H*hd].
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return np.ascontiguousarray(
        weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


# ============================================================================ GGUF

def _gguf_field_value(field):
    """A GGUF metadata value as plain Python (str, int, float, bool or a list of them).

    gguf >= 0.11 has ReaderField.contents(); for 0.10 the same is read from field.parts.
    """
    if hasattr(field, "contents"):
        return field.contents()
    from gguf import GGUFValueType

    def scalar(part, vtype):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part[0].item()
        return bool(value) if vtype == GGUFValueType.BOOL else value

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], main)


def _gguf_fields(reader) -> dict:
    fields = {}
    for name, field in reader.fields.items():
        try:
            fields[name] = _gguf_field_value(field)
        except Exception:  # noqa: BLE001 -- an odd entry we don't use must not block loading
            continue
    return fields


def load_gguf(path: str | Path) -> tuple[LlamaWeights, Tokenizer]:
    """Read a llama-architecture GGUF file: every hyperparameter from its metadata, every tensor
    dequantized to float32, wq/wk rows put back in rotate-half order, tied head if no output.weight.
    """
    try:
        import gguf
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a hard dependency
        raise ImportError("load_gguf needs the PyPI package `gguf`") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- re-raised with the file named
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    meta = _gguf_fields(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: unsupported GGUF architecture {arch!r} (only 'llama')")

    def need(key):
        if key not in meta:
            raise ValueError(f"{path.name}: GGUF metadata lacks {key}")
        return meta[key]

    dim = int(need("llama.embedding_length"))
    n_heads = int(need("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path.name}: different key and value head sizes are not supported")
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path.name}: partial RoPE ({rope_dims} of {head_dim} dims) unsupported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{path.name}: RoPE scaling {scaling!r} is not supported")
    if meta.get("llama.expert_count", 0):
        raise ValueError(f"{path.name}: mixture-of-experts models are not supported")

    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path.name}: per-frequency RoPE factors (rope_freqs) are not supported")

    def tensor(name, shape):
        if name not in tensors:
            raise ValueError(f"{path.name}: tensor {name} missing")
        t = tensors[name]
        # dequantize returns NumPy order (ggml dims reversed): [d_out, d_in] for matrices.
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"{path.name}: tensor {name} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr)

    tok_embd_t = tensors.get("token_embd.weight")
    if tok_embd_t is None:
        raise ValueError(f"{path.name}: tensor token_embd.weight missing")
    vocab = int(meta.get("llama.vocab_size", int(tok_embd_t.shape[-1])))
    n_layers = int(need("llama.block_count"))
    ffn = int(need("llama.feed_forward_length"))
    tie = "output.weight" not in tensors
    config = LlamaConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=ffn, vocab_size=vocab,
        norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings=tie, max_seq_len=int(meta.get("llama.context_length", 2048)),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"))
    config.validate()

    tok_embeddings = tensor("token_embd.weight", (vocab, dim))
    shapes = {"wq": (n_heads * head_dim, dim), "wk": (n_kv * head_dim, dim),
              "wv": (n_kv * head_dim, dim), "wo": (dim, n_heads * head_dim),
              "w_gate": (ffn, dim), "w_up": (ffn, dim), "w_down": (dim, ffn)}
    layers = []
    for i in range(n_layers):
        layer = {"attn_norm": tensor(f"blk.{i}.attn_norm.weight", (dim,)),
                 "ffn_norm": tensor(f"blk.{i}.ffn_norm.weight", (dim,))}
        for name in LINEAR_NAMES:
            layer[name] = tensor(f"blk.{i}.{_GGUF_LINEAR[name]}.weight", shapes[name])
        layer["wq"] = unpermute_gguf_qk(layer["wq"], n_heads)
        layer["wk"] = unpermute_gguf_qk(layer["wk"], n_kv)
        layers.append(layer)
    norm = tensor("output_norm.weight", (dim,))
    lm_head = tok_embeddings if tie else tensor("output.weight", (vocab, dim))
    weights = LlamaWeights(config=config, tok_embeddings=tok_embeddings, layers=layers,
                           norm=norm, lm_head=lm_head)
    weights.validate()
    tokenizer = Tokenizer.from_gguf_fields(meta)
    if tokenizer.vocab_size != vocab:
        raise ValueError(f"{path.name}: tokenizer has {tokenizer.vocab_size} tokens, model {vocab}")
    return weights, tokenizer


# ============================================================================ Hugging Face

def _hf_config(cfg: dict, source: str) -> LlamaConfig:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    kind = _HF_ARCHITECTURES.get(arch)
    if kind is None:
        raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: "
                         f"{', '.join(_HF_ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} unsupported (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: MLP biases (mlp_bias=true) are not supported")
    attn_bias = kind == "qwen2" or bool(cfg.get("attention_bias", False))
    if kind == "llama" and cfg.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which the forward does not carry.
        raise ValueError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes one
    # rope_parameters dict holding rope_theta and rope_type (+ the scaling constants).
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = cfg.get("rope_scaling") or (rope_params or None)
    if rope_scaling is not None:
        rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rtype == "default":
            rope_scaling = None
        elif rtype != "llama3":
            raise ValueError(f"{source}: rope_scaling type {rtype!r} unsupported (only llama3)")
    sliding = cfg.get("sliding_window") if kind == "mistral" else None
    if kind == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return LlamaConfig(
        dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        ffn_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        bos_id=cfg.get("bos_token_id"), eos_id=eos, rope_scaling=rope_scaling,
        sliding_window=int(sliding) if sliding else None, attn_bias=attn_bias)


def load_hf(directory: str | Path, *, tokenizer: bool = True):
    """Read a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

    Returns (LlamaWeights, Tokenizer); the tokenizer is None if tokenizer=False or the directory
    has no tokenizer.json. Weights of any float dtype (bf16 included) are converted to float32.
    """
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("load_hf needs the PyPI package `safetensors`") from e
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    config = _hf_config(cfg, str(directory))
    config.validate()

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (.bin is unsupported)")

    # Open every shard lazily; read each tensor once, converting to float32.
    handles = {}
    where = {}
    for fname in files:
        fpath = directory / fname
        if not fpath.is_file():
            raise FileNotFoundError(f"{fpath} listed in the index but missing")
        # safetensors' NumPy API cannot return bf16 (NumPy has no such dtype): see _read_bf16.
        handles[fname] = safe_open(str(fpath), framework="np")
        for key in handles[fname].keys():
            where[key] = fname

    def read(name, shape):
        if name not in where:
            raise ValueError(f"{directory}: tensor {name} missing")
        arr = _safetensors_get(handles[where[name]], name, directory / where[name])
        if arr.shape != tuple(shape):
            raise ValueError(f"{directory}: tensor {name} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
              "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim),
              "w_down": (c.dim, c.ffn_dim)}
    tok_embeddings = read("model.embed_tokens.weight", (c.vocab_size, c.dim))
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layer = {"attn_norm": read(p + "input_layernorm.weight", (c.dim,)),
                 "ffn_norm": read(p + "post_attention_layernorm.weight", (c.dim,))}
        for name in LINEAR_NAMES:
            layer[name] = read(p + _HF_LINEAR[name] + ".weight", shapes[name])
        if c.attn_bias:
            for name, bias in BIAS_NAMES.items():
                layer[bias] = read(p + _HF_LINEAR[name] + ".bias", (shapes[name][0],))
        layers.append(layer)
    norm = read("model.norm.weight", (c.dim,))
    if c.tie_embeddings or "lm_head.weight" not in where:
        if not c.tie_embeddings:
            raise ValueError(f"{directory}: lm_head.weight missing and tie_word_embeddings false")
        lm_head = tok_embeddings
    else:
        lm_head = read("lm_head.weight", (c.vocab_size, c.dim))
    weights = LlamaWeights(config=config, tok_embeddings=tok_embeddings, layers=layers,
                           norm=norm, lm_head=lm_head)
    weights.validate()
    tok = None
    if tokenizer and (directory / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(directory, bos_id=cfg.get("bos_token_id"),
                                 eos_id=cfg.get("eos_token_id"))
    return weights, tok


def _safetensors_get(handle, name, path) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except (TypeError, ValueError) as e:
        # NumPy has no bfloat16: safetensors refuses it. Read the raw bytes and widen them.
        return _read_bf16(path, name, e)


def _read_bf16(path: Path, name: str, original: Exception) -> np.ndarray:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        info = header.get(name)
        if info is None or info.get("dtype") != "BF16":
            raise ValueError(f"{path}: cannot read tensor {name}: {original}") from original
        begin, end = info["data_offsets"]
        f.seek(8 + header_len + begin)
        raw = np.frombuffer(f.read(end - begin), dtype=np.uint16)
    # bfloat16 is the top half of a float32.
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def load_model(source: str | Path | None = None, *, cache_dir=None, verbose: bool = False):
    """(LlamaWeights, Tokenizer) from a GGUF file, a Hugging Face directory, or None/'smollm2'
    (the default model, fetched and verified by decdec.fetch). For CLI --model arguments."""
    if source is None or str(source).lower() in ("smollm2", "smollm2-135m-instruct"):
        from .fetch import fetch_smollm2
        return load_gguf(fetch_smollm2(cache_dir, **({"verbose": True} if verbose else {})))
    path = Path(source).expanduser()
    if path.is_dir():
        weights, tok = load_hf(path)
        if tok is None:
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        return weights, tok
    if path.is_file():
        return load_gguf(path)
    raise FileNotFoundError(f"model not found: {source} (give a .gguf file, a Hugging Face "
                            f"directory, or 'smollm2')")
