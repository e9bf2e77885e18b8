"""Write Hugging Face Llama-family checkpoints: config.json + (sharded) safetensors [+ tokenizer.json].

- save_hf(weights, directory): export LlamaWeights (e.g. SmolLM2's dequantized GGUF) so that the
  streaming quantizer (decdec.stream), which reads safetensors, can run on it.
- write_random_hf(directory, config): a synthetic checkpoint of any shape (Llama-3-8B: ~16 GB of
  bf16) with random weights, for scale benchmarks; tensors are generated and written in row
  chunks, so memory stays at one chunk whatever the model size.

The safetensors files are written by hand (header, then the tensors' bytes) because NumPy has no
bfloat16 and safetensors.numpy.save_file needs every tensor of a shard in memory at once.
bf16 is rounded to nearest even from float32. The directory is written under a temporary name and
renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .model import BIAS_NAMES, LINEAR_NAMES, LlamaConfig

_HF_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
_CHUNK_ELEMS = 1 << 24          # 16M values (64 MB of float32) per generated / converted chunk

# Llama-3-8B (Meta-Llama-3-8B config.json), the shape issue 10 asks the pipeline to handle.
LLAMA3_8B = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                        ffn_dim=14336, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
                        tie_embeddings=False, max_seq_len=8192, bos_id=128000, eos_id=128001)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _encode(chunk: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return to_bf16_bits(chunk).tobytes()
    return np.ascontiguousarray(chunk, dtype="<f2" if dtype == "float16" else "<f4").tobytes()


def hf_config_dict(c: LlamaConfig, dtype: str = "bfloat16") -> dict:
    """config.json for a LlamaConfig (what decdec.loaders reads back to the same config)."""
    arch = ("Qwen2ForCausalLM" if c.attn_bias else
            "MistralForCausalLM" if c.sliding_window else "LlamaForCausalLM")
    cfg = {"architectures": [arch], "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
           "head_dim": c.head_dim, "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size,
           "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "tie_word_embeddings": bool(c.tie_embeddings),
           "max_position_embeddings": c.max_seq_len, "hidden_act": "silu",
           "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "torch_dtype": dtype}
    if c.rope_scaling:
        cfg["rope_scaling"] = dict(c.rope_scaling, rope_type="llama3")
    if c.sliding_window:
        cfg["sliding_window"] = c.sliding_window
    return cfg


# A tensor to write: (name, shape, rows(start, stop) -> float32 rows).
TensorSpec = tuple[str, tuple, Callable[[int, int], np.ndarray]]


def tensor_names(c: LlamaConfig) -> list[tuple[str, tuple]]:
    """(HF name, shape) of every tensor of a checkpoint of config c, in the usual order."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
              "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim), "w_down": (c.dim, c.ffn_dim)}
    out = [("model.embed_tokens.weight", (c.vocab_size, c.dim))]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (c.dim,)),
                (p + "post_attention_layernorm.weight", (c.dim,))]
        for n in LINEAR_NAMES:
            out.append((p + _HF_LINEAR[n] + ".weight", shapes[n]))
        if c.attn_bias:
            out += [(p + _HF_LINEAR[n] + ".bias", (shapes[n][0],)) for n in BIAS_NAMES]
    out.append(("model.norm.weight", (c.dim,)))
    if not c.tie_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, c.dim)))
    return out


def _write_shard(path: Path, specs: list[TensorSpec], dtype: str) -> None:
    st_dtype, item = DTYPES[dtype]
    header, offset = {}, 0
    for name, shape, _ in specs:
        n = int(np.prod(shape, dtype=np.int64)) * item
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)             # the data start is 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, rows in specs:
            n_rows = shape[0]
            per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            step = max(1, _CHUNK_ELEMS // per_row)
            for r0 in range(0, n_rows, step):
                r1 = min(n_rows, r0 + step)
                chunk = np.asarray(rows(r0, r1), dtype=np.float32)
                if chunk.shape != (r1 - r0,) + tuple(shape[1:]):
                    raise ValueError(f"tensor {name}: rows {r0}..{r1} came as {chunk.shape}")
                if not np.isfinite(chunk).all():
                    raise ValueError(f"tensor {name} holds NaN or Inf values")
                f.write(_encode(chunk, dtype))
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(directory, config: LlamaConfig, specs: Iterable[TensorSpec], *,
                     dtype: str = "bfloat16", max_shard_bytes: int = 5 << 30, tokenizer=None,
                     overwrite: bool = False) -> Path:
    """Write a checkpoint directory from tensor specs, split into shards of at most
    max_shard_bytes (a tensor is never split; one larger than the limit gets a shard of its own).
    One shard is model.safetensors; several are model-0000i-of-0000n.safetensors + an index."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    item = DTYPES[dtype][1]
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        n = int(np.prod(spec[1], dtype=np.int64)) * item
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += n
    if cur:
        shards.append(cur)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map, total = {}, 0
        for fname, specs_i in zip(names, shards):
            _write_shard(tmp / fname, specs_i, dtype)
            for name, shape, _ in specs_i:
                weight_map[name] = fname
                total += int(np.prod(shape, dtype=np.int64)) * item
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=1))
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_hf(weights, directory, *, tokenizer=None, dtype: str = "bfloat16",
            max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> Path:
    """Export LlamaWeights as a Hugging Face checkpoint directory (float32 is exact; bf16/fp16
    round the weights)."""
    c = weights.config
    arrays = {"model.embed_tokens.weight": weights.tok_embeddings, "model.norm.weight": weights.norm}
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        arrays[p + "input_layernorm.weight"] = layer["attn_norm"]
        arrays[p + "post_attention_layernorm.weight"] = layer["ffn_norm"]
        for n in LINEAR_NAMES:
            arrays[p + _HF_LINEAR[n] + ".weight"] = layer[n]
        if c.attn_bias:
            for n, b in BIAS_NAMES.items():
                arrays[p + _HF_LINEAR[n] + ".bias"] = layer[b]
    tied = weights.lm_head is weights.tok_embeddings
    if tied != bool(c.tie_embeddings):
        import dataclasses
        c = dataclasses.replace(c, tie_embeddings=tied)
    if not tied:
        arrays["lm_head.weight"] = weights.lm_head
    specs = [(name, shape, (lambda a: lambda r0, r1: a[r0:r1])(arrays[name]))
             for name, shape in tensor_names(c)]
    return write_checkpoint(directory, c, specs, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            tokenizer=tokenizer, overwrite=overwrite)


def write_random_hf(directory, config: LlamaConfig = LLAMA3_8B, *, dtype: str = "bfloat16",
                    seed: int = 0, max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> Path:
    """A synthetic checkpoint of `config`'s shape: linear weights N(0, 1/d_in), norms 1 + N(0, 0.1^2),
    embeddings N(0, 0.02^2) with three large residual channels (as real LLMs have, so that AWQ has
    something to find). Deterministic in seed; written chunk by chunk (memory: one chunk)."""
    def spec(idx, name, shape):
        def rows(r0, r1):
            # One generator per (tensor, chunk start): any chunking gives the same tensor
            # for a given chunk size; memory stays at one chunk.
            rng = np.random.default_rng([seed, idx, r0])
            x = rng.standard_normal((r1 - r0,) + tuple(shape[1:]), dtype=np.float32)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                return 1.0 + np.float32(0.1) * x
            if name.endswith(".bias"):
                return np.float32(0.02) * x
            if name == "model.embed_tokens.weight":
                x *= np.float32(0.02)
                x[:, :3] *= np.float32(8.0)
                return x
            return x * np.float32(1.0 / np.sqrt(shape[1]))
        return (name, shape, rows)
    specs = [spec(i, n, s) for i, (n, s) in enumerate(tensor_names(config))]
    return write_checkpoint(directory, config, specs, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite)
