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


# GGUF value types (gguf.GGUFValueType) -> struct code and size; 8 string, 9 array.
_GGUF_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
                 6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGML_MAX_DIMS = 4


def check_gguf_layout(path: str | Path) -> dict:
    """Walk a GGUF file's header, metadata and tensor table and check every length, count, type,
    dimension and tensor data range against the file's real size, without reading tensor data.

    Raises ValueError naming the file and what is wrong (truncated file, lying counts, sizes or
    offsets, unknown types, bad alignment) -- so that no reader downstream meets a short buffer.
    Returns {"version", "n_tensors", "n_kv", "alignment", "data_offset", "tensors": {name:
    (ggml_type, dims, offset, nbytes)}}.
    """
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{name} is not a readable GGUF file: it is empty (0 bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if size < 24:
            raise ValueError(f"{name}: truncated: {size} bytes cannot hold a GGUF header (24 bytes)")
        if buf[:4] != b"GGUF":
            raise ValueError(f"{name} is not a readable GGUF file: magic {bytes(buf[:4])!r}, "
                             f"expected b'GGUF'")
        version = struct.unpack_from("<I", buf, 4)[0]
        order = "<"
        if version & 0xFFFF == 0:          # written on a machine of the other byte order
            order = ">"
            version = struct.unpack_from(">I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{name}: unsupported GGUF version {version} (decdec reads 2 and 3)")
        n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
        # Smallest encodings: a metadata entry 13 bytes (empty key, type, u8), a tensor 24 bytes.
        if n_kv * 13 > size - 24:
            raise ValueError(f"{name}: the header claims {n_kv} metadata entries, more than a "
                             f"{size}-byte file can hold (truncated file or lying header)")
        if n_tensors * 24 > size - 24:
            raise ValueError(f"{name}: the header claims {n_tensors} tensors, more than a "
                             f"{size}-byte file can hold (truncated file or lying header)")
        pos = 24

        def need(n, what):
            if n < 0 or pos + n > size:
                raise ValueError(f"{name}: truncated or corrupt: {what} at byte {pos} needs {n} "
                                 f"bytes but the file ends at byte {size}")

        def u(fmt, what):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n, what)
            v = struct.unpack_from(order + fmt, buf, pos)[0]
            pos += n
            return v

        def string(what):
            nonlocal pos
            n = u("Q", what + " length")
            need(n, what)
            raw = bytes(buf[pos:pos + n])
            pos += n
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{name}: {what} at byte {pos - n} is not valid UTF-8") from None

        def skip_value(vtype, what, depth=0):
            nonlocal pos
            if vtype in _GGUF_SCALARS:
                code, n = _GGUF_SCALARS[vtype]
                need(n, what)
                v = struct.unpack_from(order + code, buf, pos)[0]
                pos += n
                return v
            if vtype == _GGUF_STRING:
                return string(what)
            if vtype == _GGUF_ARRAY and depth < 2:
                etype = u("I", what + " element type")
                count = u("Q", what + " element count")
                if etype in _GGUF_SCALARS:
                    n = _GGUF_SCALARS[etype][1]
                    need(count * n, f"{what} ({count} elements)")
                    pos += count * n
                elif etype in (_GGUF_STRING, _GGUF_ARRAY):
                    if count * 8 > size - pos:
                        raise ValueError(f"{name}: {what} claims {count} elements, more than the "
                                         f"rest of the file can hold (corrupt or truncated)")
                    for i in range(count):
                        skip_value(etype, f"{what}[{i}]", depth + 1)
                else:
                    raise ValueError(f"{name}: {what} has unknown element type {etype}")
                return None
            raise ValueError(f"{name}: {what} has unknown value type {vtype}")

        alignment = 32
        keys = set()
        for i in range(n_kv):
            key = string(f"metadata key {i}")
            if key in keys:
                raise ValueError(f"{name}: metadata key {key!r} appears twice")
            keys.add(key)
            vtype = u("I", f"type of metadata {key!r}")
            value = skip_value(vtype, f"metadata {key!r}")
            if key == "general.alignment":
                if vtype != 4:
                    raise ValueError(f"{name}: general.alignment must be a uint32")
                if value == 0 or value & (value - 1):
                    raise ValueError(f"{name}: general.alignment {value} is not a power of two")
                alignment = value
        infos = []
        names = set()
        for i in range(n_tensors):
            tname = string(f"name of tensor {i}")
            if tname in names:
                raise ValueError(f"{name}: tensor {tname!r} appears twice")
            names.add(tname)
            n_dims = u("I", f"tensor {tname!r} dimension count")
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise ValueError(f"{name}: tensor {tname!r} has {n_dims} dimensions "
                                 f"(1..{_GGML_MAX_DIMS} allowed)")
            dims = [u("Q", f"tensor {tname!r} dimensions") for _ in range(n_dims)]
            raw_type = u("I", f"tensor {tname!r} type")
            offset = u("Q", f"tensor {tname!r} offset")
            try:
                gtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[gtype]
            except (ValueError, KeyError):
                raise ValueError(f"{name}: tensor {tname!r} has unknown ggml type {raw_type}") from None
            n_elem = 1
            for d in dims:
                n_elem *= d
            if any(d == 0 for d in dims) or n_elem >= 1 << 62:
                raise ValueError(f"{name}: tensor {tname!r} has impossible dimensions {dims}")
            if dims[0] % block:
                raise ValueError(f"{name}: tensor {tname!r} of type {gtype.name} needs its first "
                                 f"dimension ({dims[0]}) to be a multiple of {block}")
            if offset % alignment:
                raise ValueError(f"{name}: tensor {tname!r} data offset {offset} is not a multiple "
                                 f"of the alignment {alignment}")
            infos.append((tname, gtype, dims, offset, n_elem // block * type_size))
        data_offset = pos + (-pos) % alignment
        tensors = {}
        for tname, gtype, dims, offset, nbytes in infos:
            end = data_offset + offset + nbytes
            if end > size:
                raise ValueError(f"{name}: truncated or corrupt: tensor {tname!r} ({gtype.name} "
                                 f"{dims}) needs bytes {data_offset + offset}..{end} but the file "
                                 f"has only {size} bytes")
            tensors[tname] = (gtype, dims, offset, nbytes)
    return {"version": version, "n_tensors": n_tensors, "n_kv": n_kv, "alignment": alignment,
            "data_offset": data_offset, "tensors": tensors}


class _Meta:
    """Typed access to GGUF metadata: every failure is a ValueError naming the file and key."""

    def __init__(self, meta: dict, fname: str):
        self.meta, self.fname = meta, fname

    def _raw(self, key, default):
        if key not in self.meta:
            if default is _REQUIRED:
                raise ValueError(f"{self.fname}: GGUF metadata lacks {key}")
            return default
        return self.meta[key]

    def int(self, key, default=None, lo=1, hi=(1 << 31) - 1):
        v = self._raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{self.fname}: GGUF metadata {key} must be an integer, got "
                             f"{type(v).__name__} {v!r:.40}")
        if not lo <= v <= hi:
            raise ValueError(f"{self.fname}: GGUF metadata {key} = {v} is out of range [{lo}, {hi}]")
        return int(v)

    def float(self, key, default=None):
        v = self._raw(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{self.fname}: GGUF metadata {key} must be a number, got "
                             f"{type(v).__name__} {v!r:.40}")
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{self.fname}: GGUF metadata {key} = {v} must be finite and > 0")
        return float(v)

    def str(self, key, default=None):
        v = self._raw(key, default)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{self.fname}: GGUF metadata {key} must be a string, got "
                             f"{type(v).__name__} {v!r:.40}")
        return v


_REQUIRED = object()


class GGUFCheckpoint:
    """A llama-architecture GGUF file opened lazily: the layout, every hyperparameter and the
    presence and shape of every tensor are checked at once; tensors are dequantized one at a time,
    when asked for (the same interface as HFCheckpoint, so decdec.stream reads either).

    wq / wk rows come back in rotate-half order (llama.cpp's converter interleaves them); the head
    is the embedding matrix when the file has no output.weight. A file that is truncated, corrupt,
    inconsistent or unsupported raises ValueError naming the file and the problem
    (FileNotFoundError if it does not exist); tensors holding NaN or Inf are refused when read.
    The file is memory-mapped (gguf.GGUFReader): pages it has read count in the resident set while
    the checkpoint lives.
    """

    def __init__(self, path: str | Path):
        try:
            import gguf
            from gguf import GGUFReader
        except ImportError as e:  # pragma: no cover - gguf is a hard dependency
            raise ImportError("reading GGUF files needs the PyPI package `gguf`") from e
        self._gguf = gguf
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        # Lengths, counts, types and tensor data ranges are checked against the file size first:
        # GGUFReader slices its memmap unchecked and then fails with NumPy's view/reshape messages.
        self.layout = layout = check_gguf_layout(path)
        try:
            reader = GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 -- re-raised with the file named
            raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        self.meta = meta = _gguf_fields(reader)
        m = _Meta(meta, path.name)
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path.name}: unsupported GGUF architecture {arch!r:.60} (only 'llama')")
        R = _REQUIRED

        dim = m.int("llama.embedding_length", R)
        n_heads = m.int("llama.attention.head_count", R)
        n_kv = m.int("llama.attention.head_count_kv", n_heads)
        head_dim = m.int("llama.attention.key_length", max(dim // n_heads, 1))
        if m.int("llama.attention.value_length", head_dim) != head_dim:
            raise ValueError(f"{path.name}: different key and value head sizes are not supported")
        rope_dims = m.int("llama.rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise ValueError(f"{path.name}: partial RoPE ({rope_dims} of {head_dim} dims) unsupported")
        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ValueError(f"{path.name}: RoPE scaling {scaling!r:.60} is not supported")
        if m.int("llama.expert_count", 0, lo=0):
            raise ValueError(f"{path.name}: mixture-of-experts models are not supported")

        self.tensors = tensors = {t.name: t for t in reader.tensors}
        if "rope_freqs.weight" in tensors:
            raise ValueError(f"{path.name}: per-frequency RoPE factors (rope_freqs) are not supported")
        if tensors.get("token_embd.weight") is None:
            raise ValueError(f"{path.name}: tensor token_embd.weight missing")
        vocab = m.int("llama.vocab_size", int(layout["tensors"]["token_embd.weight"][1][-1]))
        n_layers = m.int("llama.block_count", R)
        ffn = m.int("llama.feed_forward_length", R)
        tie = "output.weight" not in tensors
        bos, eos = (m.int(k, None, lo=0, hi=vocab - 1) for k in
                    ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"))
        config = LlamaConfig(
            dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_dim=ffn, vocab_size=vocab,
            norm_eps=m.float("llama.attention.layer_norm_rms_epsilon", R),
            rope_theta=m.float("llama.rope.freq_base", 10000.0),
            tie_embeddings=tie, max_seq_len=m.int("llama.context_length", 2048),
            bos_id=bos, eos_id=eos)
        try:
            config.validate()
        except ValueError as e:
            raise ValueError(f"{path.name}: inconsistent hyperparameters: {e}") from None
        self.config = config
        self.shapes = {"wq": (n_heads * head_dim, dim), "wk": (n_kv * head_dim, dim),
                       "wv": (n_kv * head_dim, dim), "wo": (dim, n_heads * head_dim),
                       "w_gate": (ffn, dim), "w_up": (ffn, dim), "w_down": (dim, ffn)}
        self._check_shape("token_embd.weight", (vocab, dim))
        for i in range(n_layers):   # every tensor present with its shape before any is dequantized
            for name in [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"] + \
                    [f"blk.{i}.{_GGUF_LINEAR[n]}.weight" for n in LINEAR_NAMES]:
                if name not in tensors:
                    raise ValueError(f"{path.name}: tensor {name} missing "
                                     f"(llama.block_count says {n_layers} blocks)")

    @property
    def head_tied(self) -> bool:
        """True when the head is the embedding matrix (the file has no output.weight)."""
        return self.config.tie_embeddings

    def _check_shape(self, name, shape):
        if name not in self.tensors:
            raise ValueError(f"{self.path.name}: tensor {name} missing")
        # NumPy order is ggml's dims reversed: [d_out, d_in] for matrices. Checked before any
        # dequantization, so a lying shape costs nothing.
        np_shape = tuple(int(d) for d in reversed(self.layout["tensors"][name][1]))
        if np_shape != tuple(shape):
            raise ValueError(f"{self.path.name}: tensor {name} has shape {np_shape}, expected {shape}")

    def read(self, name: str, shape, rows: tuple | None = None) -> np.ndarray:
        """Tensor `name` (of `shape`) dequantized to float32 and checked (shape, finite); `rows`
        (start, stop) reads only those rows of a matrix (its blocks are row-contiguous)."""
        self._check_shape(name, shape)
        t = self.tensors[name]
        data = t.data
        if rows is not None:
            start, stop = rows
            if not 0 <= start <= stop <= shape[0]:
                raise ValueError(f"rows {start}..{stop} outside tensor {name} of {shape[0]} rows")
            data = data[start:stop]
            shape = (stop - start,) + tuple(shape[1:])
        try:
            arr = np.asarray(self._gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 -- gguf's errors are NumPy's or NotImplementedError
            raise ValueError(f"{self.path.name}: tensor {name} ({t.tensor_type.name}) cannot be "
                             f"dequantized: {e}") from e
        if arr.shape != tuple(shape):
            raise ValueError(f"{self.path.name}: tensor {name} has shape {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{self.path.name}: tensor {name} holds NaN or Inf values (corrupt file)")
        return np.ascontiguousarray(arr)

    def layer(self, i: int) -> dict:
        """Block i's float32 weights: the two norms and LINEAR_NAMES (wq / wk in rotate-half order)."""
        c = self.config
        if not 0 <= i < c.n_layers:
            raise ValueError(f"block {i} outside 0..{c.n_layers - 1}")
        layer = {"attn_norm": self.read(f"blk.{i}.attn_norm.weight", (c.dim,)),
                 "ffn_norm": self.read(f"blk.{i}.ffn_norm.weight", (c.dim,))}
        for name in LINEAR_NAMES:
            layer[name] = self.read(f"blk.{i}.{_GGUF_LINEAR[name]}.weight", self.shapes[name])
        layer["wq"] = unpermute_gguf_qk(layer["wq"], c.n_heads)
        layer["wk"] = unpermute_gguf_qk(layer["wk"], c.n_kv_heads)
        return layer

    def norm(self) -> np.ndarray:
        return self.read("output_norm.weight", (self.config.dim,))

    def embedding_rows(self, start: int, stop: int, head: bool = False) -> np.ndarray:
        """Rows of the token embeddings (or of the untied head) as float32."""
        c = self.config
        name = "output.weight" if head and not self.head_tied else "token_embd.weight"
        return self.read(name, (c.vocab_size, c.dim), rows=(start, stop))

    def tokenizer(self) -> Tokenizer:
        tokenizer = _gguf_tokenizer(self.meta, self.path.name)
        if tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(f"{self.path.name}: tokenizer has {tokenizer.vocab_size} tokens, model "
                             f"{self.config.vocab_size}")
        return tokenizer

    def fingerprint(self) -> str:
        """sha256 over the file's size and its header (metadata and tensor table, up to the data):
        what a resumed run checks to know it reads the file it started on."""
        import hashlib
        h = hashlib.sha256(f"gguf\0{self.path.stat().st_size}\0".encode())
        with open(self.path, "rb") as f:
            h.update(f.read(int(self.layout["data_offset"])))
        return h.hexdigest()


def load_gguf(path: str | Path) -> tuple[LlamaWeights, Tokenizer]:
    """Read a llama-architecture GGUF file: every hyperparameter from its metadata, every tensor
    dequantized to float32, wq/wk rows put back in rotate-half order, tied head if no output.weight
    (all through GGUFCheckpoint, which decdec.stream reads block by block).

    A file that is truncated, corrupt, inconsistent or unsupported raises ValueError naming the file
    and the problem (FileNotFoundError if it does not exist); tensors holding NaN or Inf are refused.
    """
    ck = GGUFCheckpoint(path)
    c = ck.config
    tok_embeddings = ck.read("token_embd.weight", (c.vocab_size, c.dim))
    layers = [ck.layer(i) for i in range(c.n_layers)]
    norm = ck.norm()
    lm_head = tok_embeddings if ck.head_tied else ck.read("output.weight", (c.vocab_size, c.dim))
    weights = LlamaWeights(config=c, tok_embeddings=tok_embeddings, layers=layers,
                           norm=norm, lm_head=lm_head)
    weights.validate()
    return weights, ck.tokenizer()


def _gguf_tokenizer(meta: dict, fname: str) -> Tokenizer:
    """Tokenizer.from_gguf_fields with the metadata types checked and any failure (including
    the `tokenizers` package's own exceptions) raised as ValueError naming the file."""
    def str_list(key):
        v = meta.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) for s in v)):
            raise ValueError(f"{fname}: GGUF metadata {key} must be an array of strings")
    str_list("tokenizer.ggml.tokens")
    str_list("tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in types)):
        raise ValueError(f"{fname}: GGUF metadata tokenizer.ggml.token_type must be an array of "
                         f"integers")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        _Meta(meta, fname).str(key)
    n_tok = len(meta.get("tokenizer.ggml.tokens") or ())
    for key in ("tokenizer.ggml.eot_token_id",):
        if key in meta:
            _Meta(meta, fname).int(key, None, lo=0, hi=max(n_tok - 1, 0))
    if "tokenizer.ggml.add_bos_token" in meta and not isinstance(
            meta["tokenizer.ggml.add_bos_token"], bool):
        raise ValueError(f"{fname}: GGUF metadata tokenizer.ggml.add_bos_token must be a bool")
    try:
        return Tokenizer.from_gguf_fields(meta)
    except Exception as e:  # noqa: BLE001 -- ValueError from us, Exception from `tokenizers`
        raise ValueError(f"{fname}: cannot build the tokenizer from GGUF metadata: {e}") from e


# ============================================================================ Hugging Face

def _read_json(path: Path, what: str):
    """json.loads of a file; ValueError naming the file for undecodable or invalid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} is nested too deeply to be a real {what}") from None


def _cfg_int(cfg: dict, key: str, source: str, default=_REQUIRED, lo=1, hi=(1 << 31) - 1):
    v = cfg.get(key)
    if v is None:                     # absent or null: the default, if there is one
        if default is _REQUIRED:
            raise ValueError(f"{source}: config.json lacks {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{source}: config.json {key} must be an integer, got "
                         f"{type(v).__name__} {v!r:.40}")
    if not lo <= v <= hi:
        raise ValueError(f"{source}: config.json {key} = {v} is out of range [{lo}, {hi}]")
    return v


def _cfg_float(cfg: dict, key: str, source: str, default):
    v = cfg.get(key, default)
    if v is _REQUIRED:
        raise ValueError(f"{source}: config.json lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{source}: config.json {key} must be a number, got "
                         f"{type(v).__name__} {v!r:.40}")
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{source}: config.json {key} = {v} must be finite and > 0")
    return float(v)


def _hf_config(cfg: dict, source: str) -> LlamaConfig:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: config.json must hold a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ValueError(f"{source}: config.json architectures must be a list of names")
    arch = archs[0] if archs else None
    kind = _HF_ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if kind is None:
        raise ValueError(f"{source}: unsupported architecture {arch!r:.60}; supported: "
                         f"{', '.join(_HF_ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r:.60} unsupported (SwiGLU with silu only)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: MLP biases (mlp_bias=true) are not supported")
    attn_bias = kind == "qwen2" or bool(cfg.get("attention_bias", False))
    if kind == "llama" and cfg.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which the forward does not carry.
        raise ValueError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes one
    # rope_parameters dict holding rope_theta and rope_type (+ the scaling constants).
    rope_params = cfg.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ValueError(f"{source}: config.json rope_parameters must be an object")
    rope_theta = _cfg_float({"rope_theta": cfg.get("rope_theta", rope_params.get("rope_theta",
                                                                                 10000.0))},
                            "rope_theta", source, 10000.0)
    rope_scaling = cfg.get("rope_scaling") or (rope_params or None)
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"{source}: config.json rope_scaling must be an object or null")
        rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rtype == "default":
            rope_scaling = None
        elif rtype != "llama3":
            raise ValueError(f"{source}: rope_scaling type {rtype!r:.60} unsupported (only llama3)")
        else:
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                _cfg_float(rope_scaling, key, source + " rope_scaling", _REQUIRED)
    sliding = _cfg_int(cfg, "sliding_window", source, None) if kind == "mistral" else None
    if kind == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: Qwen2 with use_sliding_window=true is not supported")
    dim = _cfg_int(cfg, "hidden_size", source)
    n_heads = _cfg_int(cfg, "num_attention_heads", source)
    n_kv = _cfg_int(cfg, "num_key_value_heads", source, None) or n_heads
    head_dim = _cfg_int(cfg, "head_dim", source, None) or max(dim // n_heads, 1)
    vocab = _cfg_int(cfg, "vocab_size", source)
    eos = cfg.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    for e in eos_list + [cfg.get("bos_token_id")]:
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab):
            raise ValueError(f"{source}: config.json bos/eos token id {e!r:.40} is not a token id "
                             f"in [0, {vocab})")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return LlamaConfig(
        dim=dim, n_layers=_cfg_int(cfg, "num_hidden_layers", source), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=_cfg_int(cfg, "intermediate_size", source), vocab_size=vocab,
        norm_eps=_cfg_float(cfg, "rms_norm_eps", source, 1e-6),
        rope_theta=rope_theta,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=_cfg_int(cfg, "max_position_embeddings", source, 2048),
        bos_id=cfg.get("bos_token_id"), eos_id=eos, rope_scaling=rope_scaling,
        sliding_window=sliding or None, attn_bias=attn_bias)


_HF_EMBED, _HF_NORM, _HF_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class HFCheckpoint:
    """A Hugging Face checkpoint directory opened lazily: config.json, the index and every shard's
    tensor table are read and checked at once; tensors are read one at a time, when asked for.

    load_hf reads everything through this; decdec.stream reads it block by block, so peak memory
    is one block, not the model. Shards are not kept open (mapped) between reads: pages of a file
    mapping that was read count in the process's resident set for as long as it stays mapped.
    A missing config.json or shard raises FileNotFoundError; anything corrupt, inconsistent or
    unsupported raises ValueError naming the file and the problem.
    """

    def __init__(self, directory: str | Path):
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise ImportError("reading Hugging Face checkpoints needs the PyPI package `safetensors`") from e
        self._safe_open = safe_open
        directory = Path(directory)
        self.directory = directory
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found")
        self.cfg = cfg = _read_json(cfg_path, "config.json")
        config = _hf_config(cfg, str(directory))
        try:
            config.validate()
        except ValueError as e:
            raise ValueError(f"{cfg_path}: inconsistent hyperparameters: {e}") from None
        self.config = config

        index_path = directory / "model.safetensors.index.json"
        if index_path.is_file():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map", {}) if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError(f"{index_path}: weight_map must map tensor names to file names")
            files = sorted(set(weight_map.values()))
            for fname in files:
                if Path(fname).name != fname or fname in ("", ".", ".."):
                    raise ValueError(f"{index_path}: weight_map names {fname!r:.80}, not a file of "
                                     f"this directory")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files (.bin is unsupported)")
        self.files = files

        where = {}
        for fname in files:
            fpath = directory / fname
            if not fpath.is_file():
                raise FileNotFoundError(f"{fpath} listed in the index but missing")
            # safetensors checks the header and that every tensor's byte range lies inside the file.
            try:
                with safe_open(str(fpath), framework="np") as handle:
                    keys = list(handle.keys())
            except Exception as e:  # noqa: BLE001 -- SafetensorError derives from Exception only
                raise ValueError(f"{fpath} is not a readable safetensors file: {e}") from e
            for key in keys:
                if key in where:
                    raise ValueError(f"{directory}: tensor {key} is stored twice ({where[key]} and "
                                     f"{fname})")
                where[key] = fname
        self.where = where
        c = config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.shapes = {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
                       "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim),
                       "w_down": (c.dim, c.ffn_dim)}
        if not c.tie_embeddings and _HF_HEAD not in where:
            raise ValueError(f"{directory}: lm_head.weight missing and tie_word_embeddings false")

    @property
    def head_tied(self) -> bool:
        """True when the head is the embedding matrix (tied, or no lm_head.weight stored)."""
        return self.config.tie_embeddings or _HF_HEAD not in self.where

    def _locate(self, name):
        if name not in self.where:
            raise ValueError(f"{self.directory}: tensor {name} missing")
        return self.directory / self.where[name]

    def read(self, name: str, shape) -> np.ndarray:
        """Tensor `name` as a float32 array of `shape`, checked (shape, float dtype, finite)."""
        fpath = self._locate(name)
        try:
            handle_cm = self._safe_open(str(fpath), framework="np")
        except Exception as e:  # noqa: BLE001 -- the file changed since it was opened
            raise ValueError(f"{fpath} is not a readable safetensors file: {e}") from e
        with handle_cm as handle:
            arr = _safetensors_get(handle, name, fpath)
            if arr.shape != tuple(shape):
                raise ValueError(f"{fpath}: tensor {name} has shape {arr.shape}, expected {shape}")
            if arr.dtype.kind != "f":
                raise ValueError(f"{fpath}: tensor {name} has dtype {arr.dtype}, expected a float "
                                 f"dtype (F32, F16 or BF16)")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{fpath}: tensor {name} holds NaN or Inf values")
        return arr

    def read_rows(self, name: str, shape, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of the 2-D tensor `name` (of `shape`) as float32, read with plain file
        reads (no mapping of the whole tensor), checked like read()."""
        fpath = self._locate(name)
        dtype, tshape, begin, end, data_start = _safetensors_entry(fpath, name)
        if tshape != tuple(shape):
            raise ValueError(f"{fpath}: tensor {name} has shape {tshape}, expected {tuple(shape)}")
        if dtype not in _ST_FLOAT:
            raise ValueError(f"{fpath}: tensor {name} has dtype {dtype}, expected a float "
                             f"dtype (F32, F16 or BF16)")
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}..{stop} outside tensor {name} of {shape[0]} rows")
        np_dtype = np.dtype(_ST_FLOAT[dtype])
        row = int(np.prod(shape[1:], dtype=np.int64)) * np_dtype.itemsize
        with open(fpath, "rb") as f:
            f.seek(data_start + begin + start * row)
            raw = f.read((stop - start) * row)
        if len(raw) != (stop - start) * row:
            raise ValueError(f"{fpath}: tensor {name} is truncated (file changed while reading?)")
        arr = np.frombuffer(raw, dtype=np_dtype).reshape((stop - start,) + tuple(shape[1:]))
        if dtype == "BF16":   # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{fpath}: tensor {name} holds NaN or Inf values")
        return arr

    def layer(self, i: int) -> dict:
        """Block i's float32 weights: norms, LINEAR_NAMES and (Qwen2) q/k/v biases."""
        c = self.config
        if not 0 <= i < c.n_layers:
            raise ValueError(f"block {i} outside 0..{c.n_layers - 1}")
        p = f"model.layers.{i}."
        layer = {"attn_norm": self.read(p + "input_layernorm.weight", (c.dim,)),
                 "ffn_norm": self.read(p + "post_attention_layernorm.weight", (c.dim,))}
        for name in LINEAR_NAMES:
            layer[name] = self.read(p + _HF_LINEAR[name] + ".weight", self.shapes[name])
        if c.attn_bias:
            for name, bias in BIAS_NAMES.items():
                layer[bias] = self.read(p + _HF_LINEAR[name] + ".bias", (self.shapes[name][0],))
        return layer

    def norm(self) -> np.ndarray:
        return self.read(_HF_NORM, (self.config.dim,))

    def embedding_rows(self, start: int, stop: int, head: bool = False) -> np.ndarray:
        """Rows of the token embeddings (or of the untied head) as float32."""
        c = self.config
        name = _HF_HEAD if head and not self.head_tied else _HF_EMBED
        return self.read_rows(name, (c.vocab_size, c.dim), start, stop)

    def tokenizer(self):
        """The directory's Tokenizer, or None when it has no tokenizer.json."""
        if not (self.directory / "tokenizer.json").is_file():
            return None
        tok = Tokenizer.from_dir(self.directory, bos_id=self.cfg.get("bos_token_id"),
                                 eos_id=self.cfg.get("eos_token_id"))
        if tok.vocab_size > self.config.vocab_size:
            raise ValueError(f"{self.directory / 'tokenizer.json'}: {tok.vocab_size} tokens, more "
                             f"than the model's vocab_size {self.config.vocab_size}")
        return tok

    def fingerprint(self) -> str:
        """sha256 over config.json, the index and every shard's name, size and header bytes: what
        a resumed run checks to know it reads the checkpoint it started on (tensor data is not
        hashed: that would read the whole model)."""
        import hashlib
        h = hashlib.sha256()
        for extra in ("config.json", "model.safetensors.index.json"):
            p = self.directory / extra
            if p.is_file():
                h.update(extra.encode() + b"\0" + p.read_bytes())
        for fname in self.files:
            p = self.directory / fname
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = f.read(min(n, 1 << 27))
            h.update(f"{fname}\0{p.stat().st_size}\0".encode() + header)
        return h.hexdigest()


def load_hf(directory: str | Path, *, tokenizer: bool = True):
    """Read a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

    Returns (LlamaWeights, Tokenizer); the tokenizer is None if tokenizer=False or the directory
    has no tokenizer.json. Weights of any float dtype (bf16 included) are converted to float32.
    A missing config.json or shard raises FileNotFoundError; anything corrupt, inconsistent or
    unsupported (bad JSON, lying safetensors headers, wrong dtypes or shapes, NaN/Inf weights)
    raises ValueError naming the file and the problem.
    """
    ck = HFCheckpoint(directory)
    c = ck.config
    tok_embeddings = ck.read(_HF_EMBED, (c.vocab_size, c.dim))
    layers = [ck.layer(i) for i in range(c.n_layers)]
    norm = ck.norm()
    lm_head = tok_embeddings if ck.head_tied else ck.read(_HF_HEAD, (c.vocab_size, c.dim))
    weights = LlamaWeights(config=c, tok_embeddings=tok_embeddings, layers=layers,
                           norm=norm, lm_head=lm_head)
    weights.validate()
    tok = ck.tokenizer() if tokenizer else None
    return weights, tok


_ST_FLOAT = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


class _NoHeaderEntry(ValueError):
    """A safetensors header without a readable entry for the tensor asked for."""


def _safetensors_entry(path: Path, name: str):
    """(dtype, shape, begin, end, data_start) of tensor `name` from a safetensors header, checked
    against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise ValueError(f"{path}: safetensors header length {header_len} exceeds the file")
        try:
            info = json.loads(f.read(header_len)).get(name)
        except (ValueError, AttributeError, RecursionError):
            info = None
    if not isinstance(info, dict):
        raise _NoHeaderEntry(f"{path}: tensor {name} has no readable header entry")
    try:
        dtype = str(info["dtype"])
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name} has a malformed header entry") from None
    n = 1
    for d in shape:
        n *= d
    item = np.dtype(_ST_FLOAT.get(dtype, "u1")).itemsize
    if not 0 <= begin <= end or 8 + header_len + end > size or min(shape, default=1) < 0 or \
            (dtype in _ST_FLOAT and end - begin != item * n):
        raise ValueError(f"{path}: tensor {name}: header says {dtype} {list(shape)} at bytes "
                         f"{begin}..{end}, which does not fit the {size}-byte file")
    return dtype, shape, begin, end, 8 + header_len


def _safetensors_get(handle, name, path) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except (TypeError, ValueError) as e:
        # NumPy has no bfloat16: safetensors refuses it. Read the raw bytes and widen them.
        return _read_bf16(path, name, e)
    except Exception as e:  # noqa: BLE001 -- SafetensorError
        raise ValueError(f"{path}: cannot read tensor {name}: {e}") from e


def _read_bf16(path: Path, name: str, original: Exception) -> np.ndarray:
    try:
        dtype, shape, begin, end, data_start = _safetensors_entry(path, name)
    except _NoHeaderEntry:
        raise ValueError(f"{path}: cannot read tensor {name}: {original}") from original
    if dtype != "BF16":
        raise ValueError(f"{path}: cannot read tensor {name}: {original}") from original
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = np.frombuffer(f.read(end - begin), dtype=np.uint16)
    # bfloat16 is the top half of a float32.
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


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
