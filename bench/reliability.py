#!/usr/bin/env python3
"""Reliability harness: fuzz decdec's input boundaries, detect crashes and hangs, soak for leaks.

    python bench/reliability.py                      # every target available here, 10,000 cases each
    python bench/reliability.py --quick              # ~300 cases per target (CI)
    python bench/reliability.py --target gguf --n 2000 --seed 7 --json out.json
    python bench/reliability.py --repro gguf:1234    # re-run one case in-process, with its traceback
    python bench/reliability.py --target soak        # create/drop cycles, RSS (+ device memory) slope

Targets (cases are generated from (seed, target, case index), so any case is reproducible):
  gguf                  GGUF files (decdec.loaders.load_gguf): truncated at random offsets, lying
                        tensor sizes/offsets/counts/types, huge dimensions, bad magic/version/alignment,
                        bad metadata types and values, broken tokenizer metadata, NaN/Inf data
  safetensors           Hugging Face directories (load_hf): bad config.json, lying safetensors headers
                        (length, offsets, dtype, shape), truncated or missing shards, bad index, NaN/Inf
  artifacts             decdec artifact directories (artifacts.load, then build_model + forward):
                        missing/truncated/corrupt files, lying manifests (checksums recomputed so the
                        lie reaches the array checks), wrong format version, NaN in arrays, bad npy/npz
  declinear             DecLinear constructor arguments (dtypes, shapes, ndim, non-contiguous, misaligned
                        and byte-swapped views, huge dimensions, NaN/Inf, bad k_chunk/n_tb/selection),
                        then forward/select/setters/re-init with bad x/out (CPU)
  cuda_array_interface  malformed __cuda_array_interface__ dicts and raw pointers given to a CUDA
                        DecLinear (GPU only; skipped cleanly elsewhere)
  dlpack                malformed DLPack capsules (GPU only)
  soak                  (not part of the default run) create/drop cycles of CPU DecLinears and of a tiny
                        loaded model; CUDA layers/models on a GPU; RSS, VmPin/VmLck, device memory

Each target runs in a child worker process that reports every case as it starts and ends; the parent
records a crash (worker died: segfault, abort, sanitizer report) or a hang (no progress within
--timeout seconds) with the case index, then restarts the worker after that case. Outcomes:
  accepted          the input was taken and the result checked (e.g. forward matches a reference)
  rejected          it raised one of the target's documented exception types, naming the problem
  bad-exception     any other exception, or a documented type whose message is a leaked internal
                    (NumPy/struct/json message without the file or argument named)
  bad-accept        it was taken but should not have been (silently wrong output, NaN model, ...)
  crash, hang       as above
Exit status 0 only if every target has 0 bad-exception, bad-accept, crash and hang.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import zipfile
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

DEFAULT_N = 10_000
QUICK_N = 300
TARGET_IDS = {"gguf": 1, "safetensors": 2, "artifacts": 3, "declinear": 4,
              "cuda_array_interface": 5, "dlpack": 6}
FUZZ_TARGETS = list(TARGET_IDS)

# Messages that mean an internal error leaked out unexplained, even inside an allowed type.
LEAKED = [r"When changing to a larger dtype", r"cannot reshape array", r"buffer is smaller than",
          r"unpack(_from)? requires a buffer", r"index -?\d+ is out of bounds", r"^invalid literal for int\(\)", r"has no len\(\)",
          r"object is not subscriptable", r"object has no attribute", r"list index out of range",
          r"division by zero", r"mmap length", r"cannot mmap an empty file",
          r"^Expecting (value|property name)",
          r"signed integer is (greater|less) than", r"Python int too large to convert",
          r"argument must be a string or a (real )?number", r"not supported between instances",
          r"^\s*$"]
LEAKED_RE = re.compile("|".join(LEAKED))


class BadAccept(Exception):
    """Raised by a case whose input was accepted although it should not have been."""


def _rss_kib() -> dict:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmPin", "VmLck", "VmHWM"):
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


# =============================================================================== targets
class Target:
    name = ""
    gpu = False
    allowed: tuple = (ValueError,)

    def available(self) -> str | None:
        """None if the target can run here, else why not."""
        return None

    def setup(self, work: Path) -> None:
        self.work = work

    def case(self, rng: np.random.Generator):
        """(label, fn): fn() runs the case; returns normally if accepted (raise BadAccept if the
        acceptance was wrong)."""
        raise NotImplementedError

    def message_ok(self, exc: BaseException) -> bool:
        return bool(str(exc).strip()) and not LEAKED_RE.search(str(exc))

    def after_case(self) -> str | None:
        """A message if the process is no longer usable (e.g. a poisoned CUDA context)."""
        return None

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, BadAccept):
            return "bad-accept"
        if isinstance(exc, self.allowed) and self.message_ok(exc):
            return "rejected"
        return "bad-exception"


def _choice(rng, seq):
    return seq[int(rng.integers(len(seq)))]


# ------------------------------------------------------------------------------- GGUF
GGUF_U8, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STR, \
    GGUF_ARR, GGUF_U64, GGUF_I64, GGUF_F64 = range(13)
_SCALAR_FMT = {GGUF_U8: "B", GGUF_I8: "b", GGUF_U16: "H", GGUF_I16: "h", GGUF_U32: "I",
               GGUF_I32: "i", GGUF_F32: "f", GGUF_BOOL: "?", GGUF_U64: "Q", GGUF_I64: "q",
               GGUF_F64: "d"}
G_DIM, G_HEADS, G_KV, G_FFN, G_LAYERS = 32, 4, 2, 64, 1
G_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
G_VOCAB = len(G_TOKENS)


def _enc_str(s, length_override=None) -> bytes:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8")
    return struct.pack("<Q", len(raw) if length_override is None else length_override) + raw


def _enc_value(vtype, value, etype=None, count_override=None) -> bytes:
    if vtype == GGUF_STR:
        return _enc_str(value if isinstance(value, (str, bytes)) else str(value))
    if vtype == GGUF_ARR:
        items = value if isinstance(value, (list, tuple)) else [value]
        body = b"".join(_enc_value(etype, v, GGUF_U8) for v in items)
        n = len(items) if count_override is None else count_override
        return struct.pack("<IQ", etype & 0xFFFFFFFF, n & (2**64 - 1)) + body
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is None:                     # an unknown type code: some bytes
        return b"\x00\x01\x02\x03"
    try:
        if fmt in "fd":
            return struct.pack("<" + fmt, float(value))
        if fmt == "?":
            return struct.pack("<?", bool(value))
        return struct.pack("<" + fmt, int(value))
    except (struct.error, TypeError, ValueError, OverflowError):
        return struct.pack("<" + fmt, 0) if fmt not in "fd" else struct.pack("<" + fmt, 1.5)


def gguf_base_spec(rng) -> dict:
    """A valid tiny llama GGUF as a spec the mutators edit and encode_gguf serialises."""
    import gguf
    from gguf import GGMLQuantizationType as T
    kv = [["general.architecture", GGUF_STR, "llama"],
          ["llama.block_count", GGUF_U32, G_LAYERS],
          ["llama.context_length", GGUF_U32, 256],
          ["llama.embedding_length", GGUF_U32, G_DIM],
          ["llama.feed_forward_length", GGUF_U32, G_FFN],
          ["llama.attention.head_count", GGUF_U32, G_HEADS],
          ["llama.attention.head_count_kv", GGUF_U32, G_KV],
          ["llama.rope.freq_base", GGUF_F32, 10000.0],
          ["llama.attention.layer_norm_rms_epsilon", GGUF_F32, 1e-5],
          ["llama.rope.dimension_count", GGUF_U32, G_DIM // G_HEADS],
          ["tokenizer.ggml.model", GGUF_STR, "gpt2"],
          ["tokenizer.ggml.pre", GGUF_STR, "smollm"],
          ["tokenizer.ggml.tokens", GGUF_ARR, list(G_TOKENS), GGUF_STR],
          ["tokenizer.ggml.token_type", GGUF_ARR, [3, 3, 3, 1, 1, 1], GGUF_I32],
          ["tokenizer.ggml.merges", GGUF_ARR, ["a b"], GGUF_STR],
          ["tokenizer.ggml.bos_token_id", GGUF_U32, 1],
          ["tokenizer.ggml.eos_token_id", GGUF_U32, 2]]
    if rng.random() < 0.3:
        kv.append(["general.alignment", GGUF_U32, int(_choice(rng, [8, 32, 64]))])
    hd = G_DIM // G_HEADS
    shapes = {"token_embd.weight": (G_VOCAB, G_DIM), "output_norm.weight": (G_DIM,)}
    if rng.random() < 0.5:
        shapes["output.weight"] = (G_VOCAB, G_DIM)
    for i in range(G_LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (G_DIM,), f"blk.{i}.ffn_norm.weight": (G_DIM,),
                       f"blk.{i}.attn_q.weight": (G_HEADS * hd, G_DIM),
                       f"blk.{i}.attn_k.weight": (G_KV * hd, G_DIM),
                       f"blk.{i}.attn_v.weight": (G_KV * hd, G_DIM),
                       f"blk.{i}.attn_output.weight": (G_DIM, G_HEADS * hd),
                       f"blk.{i}.ffn_gate.weight": (G_FFN, G_DIM),
                       f"blk.{i}.ffn_up.weight": (G_FFN, G_DIM),
                       f"blk.{i}.ffn_down.weight": (G_DIM, G_FFN)})
    tensors = []
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        gtype = T.F32
        if len(shape) == 2:
            gtype = _choice(rng, [T.F32, T.F16, T.Q8_0, T.Q4_0, T.BF16])
        if gtype == T.F32:
            data = a.tobytes()
        elif gtype == T.F16:
            data = a.astype(np.float16).tobytes()
        else:
            data = gguf.quants.quantize(a, gtype).tobytes()
        tensors.append({"name": name, "dims": list(reversed(shape)), "type": int(gtype),
                        "data": data})
    return {"magic": b"GGUF", "version": 3, "kv": kv, "tensors": tensors}


def encode_gguf(spec) -> bytes:
    align = 32
    for e in spec["kv"]:
        if e[0] == "general.alignment" and e[1] == GGUF_U32 and isinstance(e[2], int) and e[2] > 0 \
                and not e[2] & (e[2] - 1):
            align = min(e[2], 4096)     # a huge claimed alignment is a lie the layout ignores
    out = bytearray(spec["magic"])
    out += struct.pack("<I", spec["version"] & 0xFFFFFFFF)
    out += struct.pack("<QQ", spec.get("n_tensors", len(spec["tensors"])) & (2**64 - 1),
                       spec.get("n_kv", len(spec["kv"])) & (2**64 - 1))
    for e in spec["kv"]:
        key, vtype, value = e[0], e[1], e[2]
        etype = e[3] if len(e) > 3 else GGUF_U8
        opts = e[4] if len(e) > 4 else {}
        out += _enc_str(key, opts.get("key_len"))
        out += struct.pack("<I", vtype & 0xFFFFFFFF)
        out += _enc_value(vtype, value, etype, opts.get("count"))
    offset = 0
    for t in spec["tensors"]:
        if "offset" not in t:
            t["offset"] = offset
            offset += len(t["data"]) + (-len(t["data"])) % align
        # a lying offset (set by a mutator) places nothing and grows nothing
    for t in spec["tensors"]:
        out += _enc_str(t["name"], t.get("name_len"))
        out += struct.pack("<I", t.get("n_dims", len(t["dims"])) & 0xFFFFFFFF)
        for d in t["dims"]:
            out += struct.pack("<Q", d & (2**64 - 1))
        out += struct.pack("<I", t["type"] & 0xFFFFFFFF)
        out += struct.pack("<Q", t["offset"] & (2**64 - 1))
    out += b"\x00" * ((-len(out)) % align)
    data_start = len(out)
    blob = bytearray(offset)
    for t in spec["tensors"]:
        if t.get("data_placed", True) and t["offset"] + len(t["data"]) <= len(blob):
            blob[t["offset"]:t["offset"] + len(t["data"])] = t["data"]
    out += blob
    assert len(out) >= data_start
    return bytes(out)


_HUGE = [0, 1, 2, 3, 31, 33, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63,
         2**64 - 1]


class GGUFTarget(Target):
    name = "gguf"
    allowed = (ValueError, FileNotFoundError)

    def available(self):
        try:
            import gguf  # noqa: F401
        except ImportError:
            return "PyPI gguf missing"
        return None

    def setup(self, work):
        super().setup(work)
        from decdec import loaders
        self.loaders = loaders

    def message_ok(self, exc):
        return super().message_ok(exc) and "case.gguf" in str(exc)

    def mutate_spec(self, rng, spec) -> list[str]:
        from gguf import GGMLQuantizationType as T
        kinds = ["version", "n_tensors", "n_kv", "dims", "n_dims", "ttype", "offset", "kv_type",
                 "kv_value", "arr_count", "str_len", "remove_kv", "remove_tensor", "dup_kv",
                 "dup_tensor", "nan", "hparams", "alignment", "utf8", "tokenizer", "magic", "none"]
        labels = []
        for _ in range(1 + int(rng.geometric(0.6)) - 1):
            kind = _choice(rng, kinds)
            labels.append(kind)
            kv, ts = spec["kv"], spec["tensors"]
            t = ts[int(rng.integers(len(ts)))] if ts else None
            e = kv[int(rng.integers(len(kv)))] if kv else None
            if kind == "version":
                spec["version"] = int(_choice(rng, [0, 1, 2, 4, 5, 2**31, 0xFFFFFFFF, 0x00030000]))
            elif kind == "magic":
                spec["magic"] = _choice(rng, [b"GGUG", b"gguf", b"\0\0\0\0", b"FUGG", b"GGML"])
            elif kind == "n_tensors":
                n = len(ts)
                spec["n_tensors"] = int(_choice(rng, [n + 1, max(n - 1, 0), 0, n + 1000, *_HUGE[6:]]))
            elif kind == "n_kv":
                n = len(kv)
                spec["n_kv"] = int(_choice(rng, [n + 1, max(n - 1, 0), 0, n + 1000, *_HUGE[6:]]))
            elif kind == "dims" and t:
                j = int(rng.integers(len(t["dims"])))
                d = t["dims"][j]
                t["dims"][j] = int(_choice(rng, [d * 2, d + 1, max(d - 1, 0), d * 32, *_HUGE]))
            elif kind == "n_dims" and t:
                if rng.random() < 0.5:
                    t["n_dims"] = int(_choice(rng, [0, 3, 4, 5, 2**31, 2**32 - 1]))
                else:
                    t["dims"] = t["dims"] + [1] * int(rng.integers(1, 4)) if rng.random() < 0.5 \
                        else t["dims"][:1]
            elif kind == "ttype" and t:
                t["type"] = int(_choice(rng, [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q6_K, T.BF16,
                                              4, 5, 40, 99, 2**31, 2**32 - 1]))
            elif kind == "offset" and t:
                base = t.get("offset", 0)
                t["offset"] = int(_choice(rng, [1, 16, 31, 32, 64, 4096, 10**6, 2**40, 2**63,
                                                2**64 - 32, base + 32]))
                t["data_placed"] = False
            elif kind == "kv_type" and e:
                e[1] = int(_choice(rng, list(range(13)) + [13, 99, 2**32 - 1]))
                if e[1] == GGUF_ARR and len(e) < 4:
                    e.append(int(_choice(rng, [GGUF_U32, GGUF_STR, GGUF_ARR, 77])))
            elif kind == "kv_value" and e:
                if e[1] == GGUF_STR:
                    e[2] = _choice(rng, ["", "x" * 300, "mistral", "llama\0", "none", "yarn"])
                elif e[1] in (GGUF_F32, GGUF_F64):
                    e[2] = float(_choice(rng, [np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30]))
                elif e[1] == GGUF_ARR:
                    e[2] = _choice(rng, [[], [1, 2], ["a"] * 3, list(range(100))])
                else:
                    e[2] = int(_choice(rng, [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, -1, 7, 4096]))
            elif kind == "arr_count":
                arrs = [x for x in kv if x[1] == GGUF_ARR]
                if arrs:
                    a = _choice(rng, arrs)
                    n = len(a[2]) if isinstance(a[2], list) else 1
                    while len(a) < 4:
                        a.append(GGUF_U8)
                    if len(a) < 5:
                        a.append({})
                    a[4]["count"] = int(_choice(rng, [n + 1, n - 1, 0, 2**20, 2**40, 2**63, 2**64 - 1]))
            elif kind == "str_len":
                if e and rng.random() < 0.5:
                    while len(e) < 4:
                        e.append(GGUF_U8)
                    if len(e) < 5:
                        e.append({})
                    e[4]["key_len"] = int(_choice(rng, [0, 1, 1000, 2**32, 2**63, 2**64 - 1]))
                elif t:
                    t["name_len"] = int(_choice(rng, [0, 1, 1000, 2**32, 2**63, 2**64 - 1]))
            elif kind == "remove_kv" and e:
                kv.remove(e)
            elif kind == "remove_tensor" and t:
                ts.remove(t)
            elif kind == "dup_kv" and e:
                kv.append(list(e))
            elif kind == "dup_tensor" and t:
                ts.append(dict(t, offset=None) if False else {k: v for k, v in t.items()
                                                              if k != "offset"})
            elif kind == "nan" and t and t["type"] in (int(T.F32), int(T.F16)):
                dt = np.float32 if t["type"] == int(T.F32) else np.float16
                a = np.frombuffer(t["data"], dt).copy()
                a[int(rng.integers(a.size))] = _choice(rng, [np.nan, np.inf, -np.inf])
                t["data"] = a.tobytes()
            elif kind == "hparams":
                keys = [x for x in kv if x[1] == GGUF_U32 and isinstance(x[0], str) and x[0].startswith("llama.")]
                if keys:
                    x = _choice(rng, keys)
                    x[2] = int(_choice(rng, [0, 1, 3, 2**20, 2**31 - 1, 2**32 - 1]))
            elif kind == "alignment":
                for x in list(kv):
                    if x[0] == "general.alignment":
                        kv.remove(x)
                kv.append(["general.alignment", int(_choice(rng, [GGUF_U32, GGUF_U64, GGUF_STR])),
                           int(_choice(rng, [0, 1, 3, 24, 64, 2**31, 2**32 - 1]))])
            elif kind == "utf8":
                bad = b"\xff\xfe" + os.urandom(3)
                if t and rng.random() < 0.5:
                    t["name"] = bad
                elif e:
                    e[0] = bad
            elif kind == "tokenizer":
                sub = _choice(rng, ["types", "merges", "pre", "model", "tokens_int", "types_len",
                                    "bos", "dupe"])
                for x in kv:
                    if sub == "types" and x[0] == "tokenizer.ggml.token_type":
                        x[3] = GGUF_STR
                        x[2] = ["x"] * 6
                    elif sub == "types_len" and x[0] == "tokenizer.ggml.token_type":
                        x[2] = [1, 1]
                    elif sub == "merges" and x[0] == "tokenizer.ggml.merges":
                        x[2] = _choice(rng, [["ab"], ["a b c"], ["q r"], [""]])
                    elif sub == "pre" and x[0] == "tokenizer.ggml.pre":
                        x[2] = "deepseek-coder"
                    elif sub == "model" and x[0] == "tokenizer.ggml.model":
                        x[2] = _choice(rng, ["llama", "bert", ""])
                    elif sub == "tokens_int" and x[0] == "tokenizer.ggml.tokens":
                        x[3] = GGUF_I32
                        x[2] = list(range(6))
                    elif sub == "bos" and x[0] == "tokenizer.ggml.bos_token_id":
                        x[2] = int(_choice(rng, [6, 99, 2**32 - 1]))
                    elif sub == "dupe" and x[0] == "tokenizer.ggml.tokens":
                        x[2] = ["a"] * 6
        return labels

    def case(self, rng):
        spec = gguf_base_spec(rng)
        labels = self.mutate_spec(rng, spec) if rng.random() < 0.75 else []
        data = encode_gguf(spec)
        r = rng.random()
        if r < 0.25:
            cut = int(rng.integers(len(data))) if rng.random() < 0.5 else \
                int(len(data) - rng.integers(1, max(2, len(data) // 10)))
            data = data[:cut]
            labels.append(f"truncate@{cut}/{len(data)}")
        elif r < 0.35:
            b = bytearray(data)
            hi = len(b) if rng.random() < 0.3 else min(len(b), 1200)
            for _ in range(int(rng.integers(1, 9))):
                b[int(rng.integers(hi))] ^= 1 << int(rng.integers(8))
            data = bytes(b)
            labels.append("flip")
        elif r < 0.38:
            data += os.urandom(int(rng.integers(1, 200)))
            labels.append("trailing")
        elif r < 0.39:
            data = b""
            labels.append("empty")
        path = self.work / "case.gguf"
        path.write_bytes(data)
        label = "+".join(labels) or "valid"

        def run():
            w, tok = self.loaders.load_gguf(path)
            if not all(np.isfinite(a).all() for a in (w.tok_embeddings, w.lm_head, w.norm)):
                raise BadAccept("loaded non-finite weights")
        return label, run


# ------------------------------------------------------------------------------- safetensors
S_DIM, S_HEADS, S_KV, S_FFN, S_LAYERS = 32, 4, 2, 64, 1


def _tiny_tokenizer_json() -> str:
    from decdec.tokenizer import Tokenizer
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
              "tokenizer.ggml.tokens": list(G_TOKENS), "tokenizer.ggml.token_type": [3, 3, 3, 1, 1, 1],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2}
    return Tokenizer.from_gguf_fields(fields).backend.to_str()


def _st_encode(tensors: dict, header_extra=None, header_override=None, len_override=None) -> bytes:
    """safetensors bytes: tensors = {name: (dtype_str, shape, raw bytes)}; header edits allowed."""
    header, blob, off = {}, bytearray(), 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blob += raw
        off += len(raw)
    if header_extra:
        for name, edit in header_extra.items():
            if name in header and isinstance(edit, dict):
                header[name].update(edit)
            else:
                header[name] = edit
    hjson = header_override if header_override is not None else \
        json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((-len(hjson)) % 8)
    n = len(hjson) if len_override is None else len_override
    return struct.pack("<Q", n & (2**64 - 1)) + hjson + bytes(blob)


class SafetensorsTarget(Target):
    name = "safetensors"
    allowed = (ValueError, FileNotFoundError)

    def available(self):
        try:
            import safetensors  # noqa: F401
        except ImportError:
            return "PyPI safetensors missing"
        return None

    def setup(self, work):
        super().setup(work)
        from decdec import loaders
        self.loaders = loaders
        self.tok_json = _tiny_tokenizer_json()

    def message_ok(self, exc):
        return super().message_ok(exc) and "hf" in str(exc)

    def base(self, rng):
        hd = S_DIM // S_HEADS
        cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": S_DIM,
               "num_attention_heads": S_HEADS, "num_key_value_heads": S_KV, "head_dim": hd,
               "intermediate_size": S_FFN, "num_hidden_layers": S_LAYERS, "vocab_size": G_VOCAB,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
               "tie_word_embeddings": bool(rng.random() < 0.5), "bos_token_id": 1,
               "eos_token_id": 2, "hidden_act": "silu"}
        shapes = {"model.embed_tokens.weight": (G_VOCAB, S_DIM), "model.norm.weight": (S_DIM,)}
        if not cfg["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (G_VOCAB, S_DIM)
        for i in range(S_LAYERS):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (S_DIM,),
                           p + "post_attention_layernorm.weight": (S_DIM,),
                           p + "self_attn.q_proj.weight": (S_HEADS * hd, S_DIM),
                           p + "self_attn.k_proj.weight": (S_KV * hd, S_DIM),
                           p + "self_attn.v_proj.weight": (S_KV * hd, S_DIM),
                           p + "self_attn.o_proj.weight": (S_DIM, S_HEADS * hd),
                           p + "mlp.gate_proj.weight": (S_FFN, S_DIM),
                           p + "mlp.up_proj.weight": (S_FFN, S_DIM),
                           p + "mlp.down_proj.weight": (S_DIM, S_FFN)})
        tensors = {}
        for name, shape in shapes.items():
            a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            dt = _choice(rng, ["F32", "F16", "BF16"])
            raw = a.tobytes() if dt == "F32" else a.astype(np.float16).tobytes() if dt == "F16" \
                else (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()
            tensors[name] = (dt, shape, raw)
        return cfg, tensors

    @staticmethod
    def post_op(d, shard_names, shard_of, tensors, op, a, b):
        if op == "truncate":
            p = d / shard_names[a]
            raw = p.read_bytes()
            p.write_bytes(raw[:int(len(raw) * b)])
        elif op == "flip":
            p = d / shard_names[a]
            raw = bytearray(p.read_bytes())
            if raw:
                raw[b % len(raw)] ^= 0x5A
            p.write_bytes(bytes(raw))
        elif op == "rm":
            (d / shard_names[a]).unlink(missing_ok=True)
        elif op == "dup":
            other = d / shard_names[1 - shard_of[a]]
            mine = {n: v for n, v in tensors.items() if shard_of.get(n, 0) == 1 - shard_of[a]}
            mine[a] = tensors[a]
            other.write_bytes(_st_encode(mine))

    def case(self, rng):
        d = self.work / "hf"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        cfg, tensors = self.base(rng)
        labels = []
        cfg_text = None
        names = list(tensors)
        n_shards = 1 if rng.random() < 0.6 else 2
        shard_of = {n: (i % n_shards) for i, n in enumerate(names)}
        shard_edits = [{} for _ in range(n_shards)]   # header_extra/override/len per shard
        index_text = None
        write_tok = rng.random() < 0.7
        tok_text, tcfg_text = self.tok_json, None
        post = []
        for _ in range(int(rng.geometric(0.55)) if rng.random() < 0.85 else 0):
            kind = _choice(rng, ["cfg_json", "cfg_type", "cfg_remove", "cfg_value", "cfg_arch",
                                 "cfg_rope", "cfg_deep", "hdr_len", "hdr_json", "hdr_dtype",
                                 "hdr_shape", "hdr_offsets", "hdr_entry", "truncate", "flip",
                                 "nan", "missing_tensor", "extra_tensor", "missing_shard",
                                 "index_json", "index_map", "index_escape", "dup_tensor",
                                 "tok_json", "tcfg_json", "tcfg_type", "wrong_dtype",
                                 "wrong_shape"])
            labels.append(kind)
            name = _choice(rng, names)
            s = shard_of.get(name, 0)
            if kind == "cfg_json":
                cfg_text = _choice(rng, ["", "{", "[1, 2]", "null", "42", '"x"', "{\"a\": }",
                                         "\xff\xfe", json.dumps(cfg)[: int(rng.integers(1, 60))]])
            elif kind == "cfg_deep":
                cfg_text = "[" * 100000 + "]" * 100000
            elif kind == "cfg_type":
                k = _choice(rng, list(cfg))
                cfg[k] = _choice(rng, ["32", 32.5, [32], None, True, {"a": 1}, -1, 0, 2**40])
            elif kind == "cfg_remove":
                cfg.pop(_choice(rng, list(cfg)), None)
            elif kind == "cfg_value":
                k = _choice(rng, ["hidden_size", "num_attention_heads", "num_key_value_heads",
                                  "head_dim", "intermediate_size", "num_hidden_layers",
                                  "vocab_size", "max_position_embeddings"])
                cfg[k] = int(_choice(rng, [0, 1, 3, 5, 64, 2**20, 2**31 - 1, 2**31, -4]))
            elif kind == "cfg_arch":
                cfg["architectures"] = _choice(rng, [[], ["GPT2LMHeadModel"], "LlamaForCausalLM",
                                                     [None], [1], ["Qwen2ForCausalLM"],
                                                     ["MistralForCausalLM"]])
            elif kind == "cfg_rope":
                cfg[_choice(rng, ["rope_scaling", "rope_parameters"])] = _choice(rng, [
                    "llama3", [1], {"rope_type": "yarn"}, {"rope_type": "llama3"},
                    {"type": "linear", "factor": 2}, {"rope_type": "default"},
                    {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1,
                     "high_freq_factor": 4, "original_max_position_embeddings": 8192}])
            elif kind == "hdr_len":
                shard_edits[s]["len"] = int(_choice(rng, [0, 1, 7, 8, 100, 10**6, 2**32, 2**63,
                                                          2**64 - 1]))
            elif kind == "hdr_json":
                shard_edits[s]["override"] = _choice(rng, [b"", b"{", b"[]", b"null", b"\xff\xff",
                                                           b'{"a": 1}', b'{"__metadata__": 5}'])
            elif kind in ("hdr_dtype", "hdr_shape", "hdr_offsets", "hdr_entry"):
                ex = shard_edits[s].setdefault("extra", {})
                if kind == "hdr_dtype":
                    ex[name] = {"dtype": _choice(rng, ["F64", "I32", "U8", "BOOL", "F8_E4M3", "X",
                                                       "", 5, None])}
                elif kind == "hdr_shape":
                    ex[name] = {"shape": _choice(rng, [[], [-1], [2**40], [2**62, 2**62], [3, 3],
                                                       "32", [None], [1.5]])}
                elif kind == "hdr_offsets":
                    ex[name] = {"data_offsets": _choice(rng, [[0, 2**40], [10, 5], [-1, 10],
                                                              [0], "0", [0, 1], [2**64 - 1, 2**64]])}
                else:
                    ex[name] = _choice(rng, [5, [], None, {"dtype": "F32"}])
            elif kind == "truncate":
                post.append(("truncate", s, float(rng.random())))
            elif kind == "flip":
                post.append(("flip", s, int(rng.integers(1 << 30))))
            elif kind == "nan":
                dt, shape, raw = tensors[name]
                if dt in ("F32", "F16"):
                    a = np.frombuffer(raw, np.float32 if dt == "F32" else np.float16).copy()
                    a[int(rng.integers(a.size))] = _choice(rng, [np.nan, np.inf, -np.inf])
                    tensors[name] = (dt, shape, a.tobytes())
                else:
                    a = np.frombuffer(raw, np.uint16).copy()
                    a[0] = 0x7FC0      # bf16 NaN
                    tensors[name] = (dt, shape, a.tobytes())
            elif kind == "wrong_dtype":
                dt, shape, raw = tensors[name]
                n = int(np.prod(shape))
                newdt = _choice(rng, ["I32", "F64", "U8", "I8"])
                size = {"I32": 4, "F64": 8, "U8": 1, "I8": 1}[newdt]
                tensors[name] = (newdt, shape, bytes(n * size))
            elif kind == "wrong_shape":
                dt, shape, raw = tensors[name]
                if len(shape) == 2:
                    tensors[name] = (dt, (shape[1], shape[0]), raw)
                else:
                    tensors[name] = (dt, (1, shape[0]), raw)
            elif kind == "missing_tensor":
                tensors.pop(name, None)
                names = list(tensors) or names
            elif kind == "extra_tensor":
                tensors["model.extra.weight"] = ("F32", (2,), b"\0" * 8)
                shard_of["model.extra.weight"] = 0
            elif kind == "dup_tensor" and n_shards == 2:
                post.append(("dup", name, None))
            elif kind == "missing_shard":
                post.append(("rm", int(rng.integers(n_shards)), None))
            elif kind == "index_json":
                index_text = _choice(rng, ["", "{", "[]", "{\"weight_map\": 5}", "null"])
            elif kind == "index_map":
                index_text = json.dumps({"weight_map": _choice(rng, [
                    {"a": 5}, [1], {"model.norm.weight": None}, {}])})
            elif kind == "index_escape":
                index_text = json.dumps({"weight_map": {n: _choice(rng, [
                    "../escape.safetensors", "/etc/hostname", "sub/x.safetensors", ".."])
                    for n in names}})
            elif kind == "tok_json":
                write_tok = True
                tok_text = _choice(rng, ["", "{", "{}", "[]", self.tok_json[:200], "\xff"])
            elif kind == "tcfg_json":
                write_tok = True
                tcfg_text = _choice(rng, ["{", "[]", "5", "\xff\xfe"])
            elif kind == "tcfg_type":
                write_tok = True
                tcfg_text = json.dumps({"bos_token": _choice(rng, [5, [1], {"content": 3}, None]),
                                        "eos_token": _choice(rng, ["<|im_end|>", 7, None]),
                                        "add_bos_token": _choice(rng, [True, "yes", None]),
                                        "chat_template": _choice(rng, [None, 5, "x"])})
        (d / "config.json").write_text(cfg_text if cfg_text is not None else json.dumps(cfg),
                                       encoding="utf-8", errors="surrogateescape")
        shard_names = ["model.safetensors"] if n_shards == 1 else \
            [f"model-0000{i + 1}-of-0000{n_shards}.safetensors" for i in range(n_shards)]
        for i, fname in enumerate(shard_names):
            mine = {n: v for n, v in tensors.items() if shard_of.get(n, 0) == i}
            e = shard_edits[i]
            (d / fname).write_bytes(_st_encode(mine, e.get("extra"), e.get("override"), e.get("len")))
        if n_shards > 1 or index_text is not None:
            if index_text is None:
                index_text = json.dumps({"weight_map": {n: shard_names[shard_of.get(n, 0)]
                                                        for n in tensors}})
            (d / "model.safetensors.index.json").write_text(index_text, encoding="utf-8",
                                                             errors="surrogateescape")
        for op, a, b in post:
            try:
                self.post_op(d, shard_names, shard_of, tensors, op, a, b)
            except (OSError, KeyError, IndexError):
                labels.append("(skipped)")
        if write_tok:
            (d / "tokenizer.json").write_text(tok_text, encoding="utf-8", errors="surrogateescape")
            if tcfg_text is not None:
                (d / "tokenizer_config.json").write_text(tcfg_text, encoding="utf-8",
                                                         errors="surrogateescape")

        def run():
            w, tok = self.loaders.load_hf(d)
            if not all(np.isfinite(a).all() for a in (w.tok_embeddings, w.lm_head, w.norm)):
                raise BadAccept("loaded non-finite weights")
        return "+".join(labels) or "valid", run


# ------------------------------------------------------------------------------- artifacts
class ArtifactsTarget(Target):
    name = "artifacts"

    def setup(self, work):
        super().setup(work)
        from decdec import artifacts, pipeline
        self.artifacts, self.pipeline = artifacts, pipeline
        self.allowed = (artifacts.ArtifactError,)
        base = work / "artifact_base"
        if not (base / "manifest.json").is_file():
            from tiny_llama import byte_tokenizer, calib_tokens, tiny_weights
            w = tiny_weights(n_layers=2)
            qm = pipeline.quantize_model(w, calib_tokens(), 3, method="rtn", n_windows=1,
                                         progress=False, tokenizer=byte_tokenizer())
            tmp = work / "artifact_tmp"
            artifacts.save(qm, tmp, overwrite=True)
            os.replace(tmp, base)
        self.base = base
        self.tokens = np.array([256, 72, 105], dtype=np.int64)

    def fix_manifest(self, d: Path):
        m = json.loads((d / "manifest.json").read_text())
        files = {}
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.name != "manifest.json":
                rel = p.relative_to(d).as_posix()
                files[rel] = {"sha256": self.artifacts._sha256(p), "bytes": p.stat().st_size}
        m["files"] = files
        (d / "manifest.json").write_text(json.dumps(m))

    def mutate(self, rng, kind, d, m, p, labels):
        """Apply one mutation of the artifact directory d (manifest dict m, chosen file p)."""
        if kind == "m_type":
            k = _choice(rng, list(m))
            m[k] = _choice(rng, [None, 5, "x", [1], {"a": 1}, True, -1.5])
        elif kind == "m_remove":
            m.pop(_choice(rng, list(m)), None)
        elif kind == "m_version":
            m["format_version"] = _choice(rng, [0, 2, "1", 1.0, None, True])
            if rng.random() < 0.3:
                m["format"] = _choice(rng, ["decdec", None, 5])
        elif kind == "m_config":
            k = _choice(rng, list(m["config"]) + ["unknown_key"])
            m["config"][k] = _choice(rng, [0, -1, 95, 97, 2**31, 2**40, "96", 1.5, None, True,
                                           [1], {"factor": 8}, float("inf"), 1e-300])
        elif kind == "m_files":
            rel = _choice(rng, list(m["files"]))
            sub = _choice(rng, ["bytes", "sha", "drop", "escape", "abs", "type", "extra"])
            if sub == "bytes":
                m["files"][rel]["bytes"] = _choice(rng, [0, -1, "5", None, 2**63, 1.5])
            elif sub == "sha":
                m["files"][rel]["sha256"] = _choice(rng, ["0" * 64, 5, None, ""])
            elif sub == "drop":
                del m["files"][rel]
            elif sub == "escape":
                m["files"]["../" + rel] = m["files"].pop(rel)
            elif sub == "abs":
                m["files"]["/etc/hostname"] = {"sha256": "0" * 64, "bytes": 5}
            elif sub == "type":
                m["files"][rel] = _choice(rng, [None, 5, "x", []])
            else:
                m["files"]["blocks/block_099.npz"] = {"sha256": "0" * 64, "bytes": 10}
        elif kind == "m_bits":
            m["bits_per_layer"] = _choice(rng, [[3], [3, 3, 3], [3, 5], [3.0, 4], "33", None,
                                                [True, 3], [4, 4]])
        elif kind == "m_group":
            m["group_size"] = _choice(rng, [0, 7, 32, 64, 256, "128", 128.0, None, True])
        elif kind == "m_tok":
            if isinstance(m.get("tokenizer"), dict):
                k = _choice(rng, ["bos_id", "eos_id", "eos_ids", "add_bos", "chat_template"])
                m["tokenizer"][k] = _choice(rng, [None, -1, 10**6, "x", [1, "a"], 5.5, True])
            else:
                m["tokenizer"] = _choice(rng, [5, [], "x"])
        elif kind == "m_alphas":
            m["awq_alphas"] = _choice(rng, [5, [1, 2], [{}], "x", [{}, {}, {}]])
        elif kind == "m_misc":
            k = _choice(rng, ["tied_embeddings", "method", "calibration"])
            m[k] = _choice(rng, [None, "gptq", 5, [1], False, True, {}])
        elif kind == "f_delete":
            p.unlink()
        elif kind == "f_truncate":
            raw = p.read_bytes()
            p.write_bytes(raw[:int(rng.integers(len(raw)))])
        elif kind == "f_flip":
            raw = bytearray(p.read_bytes())
            for _ in range(int(rng.integers(1, 5))):
                raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
            p.write_bytes(bytes(raw))
        elif kind.startswith("f_npy") and p.suffix == ".npy":
            a = np.load(p)
            if kind == "f_npy_dtype":
                a = a.astype(_choice(rng, [np.float64, np.float16, np.int32, ">f4", np.uint8]))
            elif kind == "f_npy_shape":
                a = a.reshape(-1)[: max(a.size - 1, 0)] if rng.random() < 0.5 else a.reshape(1, -1)
            elif kind == "f_npy_nan":
                a = a.copy()
                a.reshape(-1)[int(rng.integers(a.size))] = _choice(rng, [np.nan, np.inf])
            if kind == "f_npy_header":
                raw = bytearray(p.read_bytes())
                hdr_end = raw.index(b"\n") + 1
                head = raw[:hdr_end].decode("latin1")
                new_shape = _choice(rng, ["(1099511627776,)", "(-1,)", "(300, 97)", "()",
                                          "(2**40, 2)", "('a',)"])
                head2 = re.sub(r"'shape': \([^)]*\)", f"'shape': {new_shape}", head)
                raw[:hdr_end] = head2.encode("latin1")
                if rng.random() < 0.5:
                    raw[:hdr_end] = raw[:hdr_end].replace(b"<f4", _choice(rng, [b"|O", b"<c8",
                                                                               b"V4", b"zz"]))
                p.write_bytes(bytes(raw))
            else:
                np.save(p, a)
        elif kind.startswith("f_npz") and p.suffix == ".npz":
            with np.load(p) as z:
                arrays = {k: z[k] for k in z.files}
            k = _choice(rng, list(arrays))
            if kind == "f_npz_key":
                if rng.random() < 0.5:
                    del arrays[k]
                else:
                    arrays[_choice(rng, ["bias.bq", "extra", "wq.qweight2"])] = np.zeros(3, np.float32)
            elif kind == "f_npz_array":
                a = arrays[k]
                arrays[k] = _choice(rng, [a.astype(np.float64), a.T.copy(), a[:-1] if a.size else a,
                                          a.reshape(-1), a.astype(">" + a.dtype.str[1:])
                                          if a.dtype.itemsize > 1 else a.astype(np.int16)])
            elif kind == "f_npz_nan":
                fk = [x for x in arrays if arrays[x].dtype.kind == "f"]
                if fk:
                    kk = _choice(rng, fk)
                    a = arrays[kk].copy()
                    a.reshape(-1)[int(rng.integers(a.size))] = _choice(rng, [np.nan, np.inf, -np.inf])
                    arrays[kk] = a
            elif kind == "f_npz_thresh":
                tk = [x for x in arrays if x.endswith(".thresholds")]
                kk = _choice(rng, tk)
                a = arrays[kk].copy()
                if rng.random() < 0.5:
                    a[-1] = -1.0
                else:
                    a = a[::-1].copy()
                arrays[kk] = a
            if kind == "f_npz_garbage":
                p.write_bytes(b"PK\x03\x04" + os.urandom(int(rng.integers(10, 500))))
            else:
                saver = np.savez_compressed if rng.random() < 0.2 else np.savez
                with open(p, "wb") as f:
                    saver(f, **arrays)
        elif kind == "f_symlink":
            target = Path("/etc/hostname")
            p.unlink()
            p.symlink_to(target)
        elif kind == "f_empty":
            p.write_bytes(b"")
        elif kind == "f_pickle":
            if p.suffix == ".npy":
                np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            elif p.suffix == ".npz":
                with open(p, "wb") as f:
                    np.savez(f, x=np.array([object()], dtype=object))
        elif kind == "f_tok" and (d / "tokenizer.json").exists():
            (d / "tokenizer.json").write_text(_choice(rng, ["", "{", "{}", "[1]"]))

    def case(self, rng):
        d = self.work / "art"
        if d.exists() or d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.base, d)
        m = json.loads((d / "manifest.json").read_text())
        labels = []
        fix = rng.random() < 0.6          # recompute checksums so the lie reaches the array checks
        check = rng.random() < 0.5
        raw_manifest = None
        files = [p for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"]
        for _ in range(int(rng.geometric(0.55)) if rng.random() < 0.9 else 0):
            kind = _choice(rng, ["m_json", "m_type", "m_remove", "m_version", "m_config",
                                 "m_files", "m_bits", "m_group", "m_tok", "m_alphas", "m_misc",
                                 "f_delete", "f_truncate", "f_flip", "f_npy_dtype", "f_npy_shape",
                                 "f_npy_nan", "f_npy_header", "f_npz_key", "f_npz_array",
                                 "f_npz_nan", "f_npz_thresh", "f_npz_garbage", "f_symlink",
                                 "f_empty", "f_pickle", "f_tok"])
            labels.append(kind)
            p = _choice(rng, files)
            try:
                self.mutate(rng, kind, d, m, p, labels)
            except Exception:  # noqa: BLE001 -- a mutation that cannot apply is skipped

                labels.append("(skipped)")
                continue
            if kind == "m_json":
                raw_manifest = _choice(rng, [b"", b"{", b"[]", b"null", b"\xff\xfe{}",
                                             b"[" * 50000 + b"]" * 50000])
            elif kind in ("m_files",):
                fix = False
        if fix and raw_manifest is None:
            (d / "manifest.json").write_text(json.dumps(m))
            try:
                self.fix_manifest(d)
            except (json.JSONDecodeError, TypeError, AttributeError, OSError):
                pass
            labels.append("fixed-manifest")
        elif raw_manifest is not None:
            (d / "manifest.json").write_bytes(raw_manifest)
        else:
            (d / "manifest.json").write_text(json.dumps(m))
        labels.append("check" if check else "nocheck")

        def run():
            qm = self.artifacts.load(d, check=check)
            try:
                model = self.pipeline.build_model(qm, k_chunk=8)
                logits = model.forward(self.tokens)
            except Exception as e:  # noqa: BLE001 -- anything after a successful load is a miss
                raise BadAccept(f"load() accepted it but build/forward failed: "
                                f"{type(e).__name__}: {e}") from e
            if not np.isfinite(logits).all():
                raise BadAccept("load() accepted it but the model computes NaN/Inf logits")
        return "+".join(labels), run


# ------------------------------------------------------------------------------- DecLinear
DL_WORDS = ("qweight", "scales", "zeros", "residual_codes", "residual_scales", "thresholds",
            "in_features", "out_features", "bits", "group_size", "k_chunk", "n_tb", "selection",
            "device", "x", "out", "accumulate", "n_tokens", "stream", "DecLinear", "read-only",
            "cannot be deleted", "not writable", "keyword", "argument", "immutable", "initialised",
            "initialized")
_WORD_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in DL_WORDS) + r")\b")


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of a whose data starts one byte past an aligned address (flags.aligned False for
    itemsize > 1)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    return m


def _strided(a: np.ndarray) -> np.ndarray:
    """A non-contiguous view holding the same values as a."""
    if a.ndim == 0:
        return a
    big = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _byteswapped(a: np.ndarray) -> np.ndarray:
    if a.dtype.itemsize == 1:
        return a
    return a.astype(a.dtype.newbyteorder(">"))


class DecLinearTarget(Target):
    name = "declinear"
    allowed = (TypeError, ValueError, RuntimeError, AttributeError, OverflowError,
               NotImplementedError)

    def setup(self, work):
        super().setup(work)
        from decdec import _C, formats
        self.C, self.F = _C, formats
        self.DL = _C.DecLinear
        self.v2 = hasattr(self.DL, "with_settings")
        self.cache = {}

    def message_ok(self, exc):
        msg = str(exc)
        if not super().message_ok(exc):
            return False
        if isinstance(exc, (OverflowError, AttributeError)) and not _WORD_RE.search(msg):
            return False
        return bool(_WORD_RE.search(msg))

    def arrays(self, rng, d_in, d_out, bits, gs):
        F = self.F
        n_groups = F.num_groups(d_in, gs)
        qweight = rng.integers(0, 256, (d_out, F.qweight_row_bytes(d_in, bits)), dtype=np.uint8)
        scales = (rng.random((d_out, n_groups)) * 0.02 + 0.001).astype(np.float16)
        zeros = (rng.random((d_out, n_groups)) * (2 ** bits - 1)).astype(np.float16)
        rcodes = rng.integers(0, 256, (d_in, d_out // 2), dtype=np.uint8)
        rscales = (rng.random(d_out) * 0.01).astype(np.float16)
        thresholds = np.sort(rng.random(d_in).astype(np.float32) * 3)[::-1].copy()
        return {"qweight": qweight, "scales": scales, "zeros": zeros, "residual_codes": rcodes,
                "residual_scales": rscales, "thresholds": thresholds}

    def shape(self, rng):
        d_in = int(_choice(rng, [64, 128, 200, 256, 1100]))
        d_out = int(_choice(rng, [32, 64, 96]))
        if rng.random() < 0.01:
            d_in = int(_choice(rng, [1 << 16, 70000]))
            d_out = 32
        return d_in, d_out, int(_choice(rng, [3, 4])), int(_choice(rng, [64, 128]))

    def bad_array(self, rng, a):
        """(mutated array or non-array, kind, value_preserving)."""
        kind = _choice(rng, ["dtype", "shape", "ndim", "strided", "fortran", "misaligned",
                             "byteswap", "readonly", "nonarray", "empty", "nan", "subclass"])
        if kind == "dtype":
            dt = _choice(rng, [np.float32, np.float64, np.float16, np.int8, np.uint16, np.int32,
                               np.bool_, np.complex64, object])
            return a.astype(dt), f"dtype:{np.dtype(dt)}", np.dtype(dt) == a.dtype
        if kind == "shape":
            if a.ndim == 2:
                s = _choice(rng, [(a.shape[0] + 1, a.shape[1]), (a.shape[0], a.shape[1] - 1),
                                  (a.shape[1], a.shape[0]), (0, a.shape[1])])
            else:
                s = _choice(rng, [(a.shape[0] + 1,), (a.shape[0] - 1,), (0,)])
            return np.zeros(s, a.dtype), "shape", False
        if kind == "ndim":
            return _choice(rng, [a.reshape(-1), a.reshape((1,) + a.shape), np.array(a.flat[0]),
                                 a.reshape(a.shape + (1,))]), "ndim", False
        if kind == "strided":
            return _strided(a), "strided", True
        if kind == "fortran":
            return np.asfortranarray(a), "fortran", True
        if kind == "misaligned":
            return _misaligned(a), "misaligned", True
        if kind == "byteswap":
            return _byteswapped(a), "byteswap", True
        if kind == "readonly":
            b = a.copy()
            b.setflags(write=False)
            return b, "readonly", True
        if kind == "nonarray":
            return _choice(rng, [a.tolist(), None, 5, "x", a.tobytes(), memoryview(a.tobytes())]), \
                "nonarray", False
        if kind == "empty":
            return np.empty((0,) * a.ndim, a.dtype), "empty", False
        if kind == "nan":
            b = a.copy()
            if b.dtype.kind == "f" and b.size:
                b.reshape(-1)[int(rng.integers(b.size))] = _choice(rng, [np.nan, np.inf, -np.inf])
                return b, "nan", False
            return b, "nan(n/a)", True
        b = a.copy().view(np.ndarray)
        if a.ndim == 2:
            return np.asmatrix(a), "matrix", True
        return np.ma.masked_array(b), "masked", True

    def build(self, arrays, kw):
        return self.DL(arrays["qweight"], arrays["scales"], arrays["zeros"],
                       arrays["residual_codes"], arrays["residual_scales"], arrays["thresholds"],
                       **kw)

    def x_variant(self, rng, d_in, n_tok):
        """(x, kind, reference x or None if x must be refused); harness slips fall back to ok."""
        try:
            return self._x_variant(rng, d_in, n_tok)
        except Exception:  # noqa: BLE001
            x = np.zeros((n_tok, d_in), np.float32)
            return x, "ok(fallback)", x

    def _x_variant(self, rng, d_in, n_tok):
        x = (rng.standard_t(3, (n_tok, d_in)) * 0.5).astype(np.float32)
        if rng.random() < 0.3:
            x = x[0]
        kind = _choice(rng, ["ok", "ok", "f16", "f64", "int", "bool", "complex", "object", "list",
                             "none", "scalar", "0d", "3d", "width", "zero_tok", "strided",
                             "fortran", "misaligned", "byteswap", "nan", "huge", "readonly"])
        ref = None
        if kind == "ok":
            return x, kind, x
        if kind == "f16":
            return x.astype(np.float16), kind, x.astype(np.float16).astype(np.float32)
        if kind == "f64":
            return x.astype(np.float64), kind, None
        if kind == "int":
            return x.astype(np.int32), kind, None
        if kind == "bool":
            return x > 0, kind, None
        if kind == "complex":
            return x.astype(np.complex64), kind, None
        if kind == "object":
            return x.astype(object), kind, None
        if kind == "list":
            return x.tolist(), kind, None
        if kind == "none":
            return None, kind, None
        if kind == "scalar":
            return 1.0, kind, None
        if kind == "0d":
            return np.float32(1.0), kind, None
        if kind == "3d":
            return x.reshape((1,) + x.shape) if x.ndim == 2 else x.reshape(1, 1, -1), kind, None
        if kind == "width":
            return np.zeros(x.shape[:-1] + (d_in + _choice(rng, [1, -1, 128]),), np.float32), kind, None
        if kind == "zero_tok":
            z = np.zeros((0, d_in), np.float32)
            return z, kind, z
        if kind == "strided":
            return _strided(x), kind, x
        if kind == "fortran":
            return np.asfortranarray(x), kind, x
        if kind == "misaligned":
            return _misaligned(x), kind, x
        if kind == "byteswap":
            return _byteswapped(x), kind, x
        if kind == "nan":
            y = x.copy()
            y.reshape(-1)[int(rng.integers(y.size))] = _choice(rng, [np.nan, np.inf, -np.inf])
            return y, kind, y
        if kind == "huge":
            y = x * np.float32(1e37)
            return y, kind, y
        y = x.copy()
        y.setflags(write=False)
        return y, kind, x
        return ref

    def check_forward(self, L, got, ref_x, out_dtype, acc_base=None):
        if ref_x is None:
            raise BadAccept("forward accepted an x that should be refused")
        want = L.forward(np.ascontiguousarray(ref_x, dtype=np.float32)).astype(np.float64)
        if acc_base is not None:
            want = want + acc_base.astype(np.float64)
        got = np.asarray(got)
        if got.shape != want.shape:
            raise BadAccept(f"forward returned shape {got.shape}, expected {want.shape}")
        g = got.astype(np.float64)
        finite = np.isfinite(want) & np.isfinite(g)
        if not np.array_equal(np.isfinite(want), np.isfinite(g)) and np.isfinite(ref_x).all() \
                and np.abs(want[np.isfinite(want)]).max(initial=0) < 6e4:
            raise BadAccept("forward output has NaN/Inf where the reference has none")
        if finite.any():
            scale = np.abs(want[finite]).max(initial=0) + 1e-6
            # fp16 results (out= fp16, or out=None with an fp16 x: forward returns x's dtype) are
            # rounded once to fp16: a relative 2^-11 of |y| each, hence the wider bound
            half = out_dtype == np.float16 or got.dtype == np.float16
            tol = (2e-3 if half else 1e-4) * scale
            if np.abs(g[finite] - want[finite]).max() > tol:
                raise BadAccept(f"forward output differs from the reference by "
                                f"{np.abs(g[finite] - want[finite]).max():.3g} (tol {tol:.3g})")

    def ops(self, rng, L, d_in, d_out, labels):
        """1-4 operations on a built layer; raises on the first failure."""
        for _ in range(int(rng.integers(1, 5))):
            op = _choice(rng, ["forward", "forward", "forward_out", "forward_out", "select",
                               "set", "set", "del", "getters", "reinit", "with_settings", "acc"])
            labels.append(op)
            n_tok = int(_choice(rng, [1, 1, 2, 3, 7]))
            if op == "forward":
                x, kind, ref = self.x_variant(rng, d_in, n_tok)
                labels.append("x:" + kind)
                y = L.forward(x)
                dt = getattr(x, "dtype", np.float32)
                self.check_forward(L, y, ref, np.float16 if dt == np.float16 else np.float32)
            elif op in ("forward_out", "acc"):
                x, kind, ref = self.x_variant(rng, d_in, n_tok)
                labels.append("x:" + kind)
                shape = (getattr(x, "shape", (1,))[:-1] or ()) + (d_out,) if hasattr(x, "shape") \
                    and getattr(x, "ndim", 0) else (d_out,)
                okind = _choice(rng, ["ok", "ok", "f16", "f64", "int", "shape", "readonly",
                                      "strided", "misaligned", "byteswap", "alias", "list",
                                      "fortran", "none"])
                labels.append("out:" + okind)
                out = np.full(shape, 0.25, np.float32)
                if okind == "f16":
                    out = out.astype(np.float16)
                elif okind == "f64":
                    out = out.astype(np.float64)
                elif okind == "int":
                    out = out.astype(np.int32)
                elif okind == "shape":
                    out = np.zeros(shape[:-1] + (d_out + 32,), np.float32)
                elif okind == "readonly":
                    out.setflags(write=False)
                elif okind == "strided":
                    out = _strided(out)
                elif okind == "misaligned":
                    out = _misaligned(out)
                elif okind == "byteswap":
                    out = _byteswapped(out)
                elif okind == "fortran":
                    out = np.asfortranarray(out.reshape(shape))
                elif okind == "list":
                    out = out.tolist()
                elif okind == "none":
                    out = None
                elif okind == "alias" and isinstance(x, np.ndarray) and x.ndim and \
                        x.dtype in (np.float32, np.float16) and x.flags.writeable and \
                        x.shape[-1] * x.itemsize >= d_out * x.itemsize and x.size:
                    # out shares memory with x: the first d_out columns of each row
                    out = x.reshape(-1, x.shape[-1])[:, :d_out] if x.ndim == 2 else x[:d_out]
                    if not out.flags.c_contiguous:
                        out = x.reshape(-1)[: int(np.prod(shape))].reshape(shape)
                    ref = None if ref is None else np.array(ref, copy=True)
                    ref_kind_alias = True
                acc = op == "acc" or rng.random() < 0.2
                base = np.array(out, dtype=np.float64, copy=True) if isinstance(out, np.ndarray) \
                    else None
                if acc and out is None:
                    labels.append("acc-no-out")
                    L.forward(x, accumulate=True)
                    raise BadAccept("accumulate=True without out= was accepted (design: ValueError)")
                y = L.forward(x, out=out, accumulate=acc)
                if isinstance(out, np.ndarray) and y is not out:
                    raise BadAccept("forward(out=...) returned a different object than out")
                self.check_forward(L, out if isinstance(out, np.ndarray) else y, ref,
                                   out.dtype if isinstance(out, np.ndarray) else np.float32,
                                   base if acc else None)
            elif op == "select":
                x, kind, ref = self.x_variant(rng, d_in, 1)
                labels.append("x:" + kind)
                idx = L.select(x)
                idx = np.asarray(idx)
                if idx.size and (idx.min() < 0 or idx.max() >= d_in or (np.diff(idx) <= 0).any()):
                    raise BadAccept(f"select returned out-of-range or unsorted indices")
            elif op == "set":
                attr = _choice(rng, ["k_chunk", "k_chunk", "n_tb", "selection", "in_features",
                                     "bits", "thresholds"])
                val = _choice(rng, [-1, 0, 1, 8, 1024, 1025, 2**31, 2**63, 2**100, 3.0, "8", None,
                                    True, np.int64(8), "exact", "bucket", "EXACT", "", b"exact",
                                    16, 1023, 1024 * 1024])
                labels.append(f"{attr}={val!r:.20}")
                before = getattr(L, attr)
                setattr(L, attr, val)
                now = getattr(L, attr)
                if attr == "k_chunk" and not (0 <= now <= 1024):
                    raise BadAccept(f"k_chunk = {now} accepted")
                if attr in ("in_features", "bits", "thresholds"):
                    raise BadAccept(f"read-only {attr} was set ({before!r:.20} -> {now!r:.20})")
            elif op == "del":
                attr = _choice(rng, ["k_chunk", "n_tb", "selection", "in_features"])
                labels.append("del:" + attr)
                delattr(L, attr)
                raise BadAccept(f"del L.{attr} was accepted")
            elif op == "getters":
                for a in ("in_features", "out_features", "bits", "group_size", "k_chunk", "n_tb",
                          "selection", "backend", "residual_nbytes", "weight_nbytes",
                          "fetch_nbytes", "residual_pinned"):
                    getattr(L, a)
                th = L.thresholds
                if th.shape != (d_in,):
                    raise BadAccept("thresholds getter has the wrong shape")
                rc = L.residual_codes
                if rc.shape != (d_in, d_out // 2):
                    raise BadAccept("residual_codes getter has the wrong shape")
                rc2 = rc
                try:
                    rc2[0, 0] = 1
                    raise BadAccept("residual_codes view is writeable")
                except ValueError as e:
                    if "read-only" not in str(e):
                        raise
                repr(L)
            elif op == "reinit":
                kw = dict(in_features=d_in, out_features=d_out, bits=L.bits,
                          group_size=L.group_size)
                arrays = self.arrays(rng, d_in, d_out, L.bits, L.group_size)
                if rng.random() < 0.5:     # a failing re-init
                    arrays["thresholds"] = arrays["thresholds"][::-1].copy()
                labels.append("reinit")
                rc_before = L.residual_codes.copy() if rng.random() < 0.5 else None
                view = L.residual_codes
                try:
                    L.__init__(arrays["qweight"], arrays["scales"], arrays["zeros"],
                               arrays["residual_codes"], arrays["residual_scales"],
                               arrays["thresholds"], **kw)
                    reinit_ok = True
                except Exception:
                    reinit_ok = False
                    # the layer must remain usable (or cleanly unusable) after a failed re-init
                    L.thresholds
                    L.forward(np.zeros(d_in, np.float32))
                    raise
                if reinit_ok:
                    if rc_before is not None and not np.array_equal(view, rc_before):
                        raise BadAccept("re-init silently changed an earlier residual_codes view")
                    raise BadAccept("__init__ on a built layer was accepted (design: immutable)")
            elif op == "with_settings":
                if not hasattr(L, "with_settings"):
                    labels.append("n/a")
                    continue
                kw = {}
                for k in ("k_chunk", "n_tb", "selection"):
                    if rng.random() < 0.5:
                        kw[k] = _choice(rng, [-1, 0, 8, 1024, 1025, 2**63, "exact", "bucket", "x",
                                              None, 1.5, 16])
                labels.append(f"with_settings{kw!r:.40}")
                L2 = L.with_settings(**kw)
                L2.forward(np.zeros(d_in, np.float32))

    def case(self, rng):
        d_in, d_out, bits, gs = self.shape(rng)
        arrays = self.arrays(rng, d_in, d_out, bits, gs)
        kw = dict(in_features=d_in, out_features=d_out, bits=bits, group_size=gs)
        if rng.random() < 0.5:
            kw["k_chunk"] = int(_choice(rng, [0, 8, 64, 1024]))
        if rng.random() < 0.3:
            kw["selection"] = _choice(rng, ["bucket", "exact"])
        labels = [f"{d_out}x{d_in}/{bits}b/g{gs}"]
        mode = rng.random()
        value_preserving = True
        mutated = False
        if mode < 0.45:
            for _ in range(int(rng.geometric(0.6))):
                name = _choice(rng, list(arrays))
                if not isinstance(arrays[name], np.ndarray):
                    continue
                try:
                    arr, kind, vp = self.bad_array(rng, arrays[name])
                except Exception:  # noqa: BLE001 -- a mutation that cannot apply is skipped
                    continue
                arrays[name] = arr
                labels.append(f"{name}:{kind}")
                value_preserving &= vp
                mutated = True
        elif mode < 0.7:
            for _ in range(int(rng.geometric(0.6))):
                k = _choice(rng, ["in_features", "out_features", "bits", "group_size", "k_chunk",
                                  "selection", "device", "n_tb", "bogus", "drop"])
                if k == "drop":
                    kw.pop(_choice(rng, list(kw)), None)
                    labels.append("drop-kw")
                else:
                    v = _choice(rng, [0, -1, 1, 2, 3, 5, 7, 8, 16, 31, 33, 63, 65, 96, 127, 129,
                                      1024, 1025, 2**31 - 1, 2**31 - 128, 2**31, 2**32, 2**63,
                                      2**64, -2**63, 1.0, 64.0, "64", None, True, np.int64(64),
                                      "cpu", "cuda", "gpu", "", "bucket", "exact", "BUCKET", b"cpu"])
                    kw[k] = v
                    labels.append(f"{k}={v!r:.16}")
                value_preserving = False
                mutated = True
        elif mode < 0.75:
            labels.append("positional-count")
            args = list(arrays.values())[: int(rng.integers(0, 6))]

            def run():
                self.DL(*args, **kw)
                raise BadAccept("DecLinear accepted too few positional arguments")
            return labels, run
        elif mode < 0.8:
            labels.append("uninitialised")

            def run():
                L = self.DL.__new__(self.DL)
                op = _choice(rng, ["forward", "select", "thresholds", "residual_codes", "k_chunk",
                                   "set_k", "repr", "nbytes", "with_settings"])
                labels.append(op)
                if op == "forward":
                    L.forward(np.zeros(64, np.float32))
                elif op == "select":
                    L.select(np.zeros(64, np.float32))
                elif op == "thresholds":
                    L.thresholds
                elif op == "residual_codes":
                    np.asarray(L.residual_codes).sum()
                elif op == "k_chunk":
                    L.k_chunk
                    return          # a plain int getter on an empty object is harmless
                elif op == "set_k":
                    L.k_chunk = 8
                    return
                elif op == "repr":
                    repr(L)
                    return
                elif op == "nbytes":
                    L.fetch_nbytes
                    return
                elif op == "with_settings" and hasattr(L, "with_settings"):
                    L.with_settings(k_chunk=8).forward(np.zeros(64, np.float32))
                else:
                    return
                raise BadAccept(f"{op} on an uninitialised DecLinear did not raise")
            return labels, run

        def run():
            L = self.build(arrays, kw)
            if mutated and not value_preserving:
                # accepted although an argument was changed: fine only if it is still valid
                pass
            if mutated and value_preserving:
                # same values in another layout: must compute what the canonical layer computes
                canon = {k: np.ascontiguousarray(np.asarray(v), dtype=np.asarray(v).dtype.newbyteorder("="))
                         for k, v in arrays.items()}
                ref = self.build(canon, kw)
                x = np.random.default_rng(1).standard_normal((2, kw["in_features"])).astype(np.float32)
                if not np.allclose(L.forward(x), ref.forward(x), rtol=1e-5, atol=1e-5):
                    raise BadAccept("accepted a " + "/".join(labels[1:]) +
                                    " argument but computes a different output")
            self.ops(rng, L, kw.get("in_features", d_in), kw.get("out_features", d_out), labels)
        return labels, run


# ------------------------------------------------------------------------------- CUDA targets
def _cuda_ready() -> str | None:
    try:
        from decdec import _C
    except ImportError as e:
        return f"decdec._C not importable: {e}"
    if not getattr(_C, "built_with_cuda", lambda: False)():
        return "this build has no CUDA backend"
    if not _C.cuda_available():
        return "no usable CUDA device"
    if not hasattr(_C, "DeviceArray"):
        return "no decdec._C.DeviceArray"
    return None


class _CudaBase(Target):
    gpu = True
    allowed = (TypeError, ValueError, RuntimeError, OverflowError, AttributeError)

    def available(self):
        return _cuda_ready()

    def setup(self, work):
        super().setup(work)
        from decdec import _C, formats
        self.C = _C
        rng = np.random.default_rng(0)
        self.d_in, self.d_out = 256, 64
        dl = DecLinearTarget()
        dl.F = formats
        arrays = dl.arrays(rng, self.d_in, self.d_out, 4, 128)
        self.L = _C.DecLinear(*arrays.values(), in_features=self.d_in, out_features=self.d_out,
                              bits=4, group_size=128, k_chunk=64, device="cuda")
        self.x_host = rng.standard_normal(self.d_in).astype(np.float16)
        self.x = _C.DeviceArray(self.x_host)
        self.ref = self.L.forward(self.x).numpy()
        self.keep = []

    def message_ok(self, exc):
        return super().message_ok(exc) and bool(_WORD_RE.search(str(exc)) or
                                                re.search(r"cuda|device|pointer|dlpack|capsule|"
                                                          r"__cuda_array_interface__|DLPack", str(exc),
                                                          re.I))

    def after_case(self):
        self.keep.clear()
        try:
            y = self.L.forward(self.x).numpy()
        except Exception as e:  # noqa: BLE001
            return f"the CUDA context is unusable after the case: {type(e).__name__}: {e}"
        if not np.allclose(y, self.ref, rtol=2e-3, atol=2e-3):
            return "a later good call computes a different result (state corrupted)"
        return None

    def use(self, rng, obj, labels):
        where = _choice(rng, ["x", "x", "out", "select"])
        labels.append("as:" + where)
        if where == "x":
            y = self.L.forward(obj)
            if self.bad:
                raise BadAccept("a malformed device array was accepted as x")
            return y
        if where == "out":
            self.L.forward(self.x, out=obj)
            if self.bad:
                raise BadAccept("a malformed device array was accepted as out")
            return None
        if not hasattr(self.L, "select"):
            return None
        self.L.select(obj)
        if self.bad:
            raise BadAccept("a malformed device array was accepted by select")


class _FakeCAI:
    def __init__(self, d, exc=None):
        self._d, self._exc = d, exc

    @property
    def __cuda_array_interface__(self):
        if self._exc is not None:
            raise self._exc
        return self._d


class CAITarget(_CudaBase):
    name = "cuda_array_interface"

    def case(self, rng):
        out_like = rng.random() < 0.3
        good = self.C.DeviceArray(np.zeros(self.d_out if out_like else self.d_in, np.float16))
        self.keep.append(good)
        d = dict(good.__cuda_array_interface__)
        labels = []
        self.bad = True
        host = np.zeros(self.d_in, np.float16)
        self.keep.append(host)
        kind = _choice(rng, ["ok", "missing", "shape_type", "shape_vals", "overflow", "strides",
                             "data", "host_ptr", "garbage_ptr", "typestr", "version", "stream",
                             "mask", "notdict", "raises", "raw_int", "raw_tokens"])
        labels.append(kind)
        if kind == "ok":
            self.bad = False
        elif kind == "missing":
            d.pop(_choice(rng, ["shape", "typestr", "data", "version"]), None)
        elif kind == "shape_type":
            d["shape"] = _choice(rng, [list(d["shape"]), ("256",), (256.0,), None, 256, (None,),
                                       (), (1, 2, 3), (True,)])
        elif kind == "shape_vals":
            d["shape"] = _choice(rng, [(-1,), (0,), (self.d_in + 1,), (2, self.d_in),
                                       (1, self.d_in), (self.d_in, 1)])
            self.bad = d["shape"] not in ((1, self.d_in),) or out_like
        elif kind == "overflow":
            d["shape"] = _choice(rng, [(2**62, 2**62), (2**63 - 1,), (2**64,), (2**40, self.d_in)])
        elif kind == "strides":
            d["strides"] = _choice(rng, [(), (2, 2), (4,), ("2",), (None,), (0,), (-2,), 5, [2],
                                         (2**63,)])
        elif kind == "data":
            d["data"] = _choice(rng, [(), None, [good.ptr, False], (str(good.ptr), False),
                                      (good.ptr,), (good.ptr, False, 1), (None, False),
                                      (2**64, False), (-1, False), (good.ptr + 1, False)])
            self.bad = d["data"] != (good.ptr,)
        elif kind == "host_ptr":
            d["data"] = (host.ctypes.data, False)
        elif kind == "garbage_ptr":
            d["data"] = (int(_choice(rng, [8, 4096, 0xdeadbeef000, 2**47])), False)
        elif kind == "typestr":
            d["typestr"] = _choice(rng, ["<f4", "<f8", "|u1", "<i2", ">f2", "abc", "", None, 5,
                                         b"<f2", "<f2\0x"])
        elif kind == "version":
            d["version"] = _choice(rng, [0, 99, "3", None])
            self.bad = False    # consumers may ignore the version
        elif kind == "stream":
            # int stream handles are trusted like raw pointers' sizes of old: CUDA cannot validate one
            # (a made-up handle faults inside the runtime, as in every CUDA library); the README says so
            d["stream"] = _choice(rng, [0, -1, 2**63, "x", 1.5, None])
            self.bad = d["stream"] is not None  # None: "no synchronisation needed", valid
        elif kind == "mask":
            d["mask"] = good
        obj = _FakeCAI(d)
        if kind == "notdict":
            obj = _FakeCAI(_choice(rng, [None, 5, [("shape", (256,))], "x"]))
        elif kind == "raises":
            obj = _FakeCAI(None, _choice(rng, [RuntimeError("boom"), KeyError("k"),
                                               MemoryError(), ValueError("v")]))
        labels_s = "+".join(labels)

        def run():
            if kind == "raw_int":
                ptr = int(_choice(rng, [0, 8, host.ctypes.data, 2**64 - 1, -1, good.ptr]))
                labels.append(f"ptr={ptr:#x}")
                self.bad = ptr != good.ptr
                self.use(rng, ptr, labels)
                return
            if kind == "raw_tokens":
                n = int(_choice(rng, [0, -1, 2, 2**31, 2**62, 10**6]))
                labels.append(f"n_tokens={n}")
                self.L.forward(good.ptr, n_tokens=n)
                raise BadAccept(f"raw pointer with n_tokens={n} accepted")
            self.use(rng, obj, labels)
        return labels_s, run


class DLPackTarget(_CudaBase):
    name = "dlpack"

    def setup(self, work):
        super().setup(work)

        class DLDevice(ctypes.Structure):
            _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

        class DLDataType(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

        class DLTensor(ctypes.Structure):
            _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                        ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]

        class DLManaged(ctypes.Structure):
            _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                        ("deleter", ctypes.c_void_p)]
        self.DLManaged = DLManaged
        self.capsule_new = ctypes.pythonapi.PyCapsule_New
        self.capsule_new.restype = ctypes.py_object
        self.capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.alive = []     # structs outlive every capsule (the binding may hold one a while)

    def make(self, rng, good, labels):
        m = self.DLManaged()
        n = good.shape[0]
        shape = (ctypes.c_int64 * 4)(n, 1, 1, 1)
        strides = (ctypes.c_int64 * 4)(1, 1, 1, 1)
        t = m.dl_tensor
        t.data, t.device.device_type, t.device.device_id, t.ndim = good.ptr, 2, 0, 1
        t.dtype.code, t.dtype.bits, t.dtype.lanes = 2, 16, 1
        t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = None
        t.byte_offset = 0
        name = b"dltensor"
        self.bad = True
        host = np.zeros(n, np.float16)
        self.alive += [m, shape, strides, host]
        kind = _choice(rng, ["ok", "ok", "host_ptr", "null", "device_type", "device_id", "ndim",
                             "dtype", "shape", "overflow", "null_shape", "strides", "offset",
                             "name", "notcapsule", "raises", "device_mismatch"])
        labels.append(kind)
        if kind == "ok":
            self.bad = False
        elif kind == "host_ptr":
            t.data = host.ctypes.data
        elif kind == "null":
            t.data = None
        elif kind == "device_type":
            t.device.device_type = int(_choice(rng, [1, 3, 13, 99, -1]))
        elif kind == "device_id":
            t.device.device_id = int(_choice(rng, [1, 7, -1, 2**31 - 1]))
        elif kind == "ndim":
            t.ndim = int(_choice(rng, [0, 3, 4, -1, 2**31 - 1]))
        elif kind == "dtype":
            t.dtype.code, t.dtype.bits, t.dtype.lanes = (int(v) for v in _choice(rng, [
                (2, 32, 1), (0, 16, 1), (1, 16, 1), (2, 16, 2), (2, 16, 0), (4, 16, 1), (2, 8, 1)]))
        elif kind == "shape":
            shape[0] = int(_choice(rng, [-1, 0, n + 1, n * 2]))
        elif kind == "overflow":
            t.ndim = 2
            shape[0], shape[1] = int(_choice(rng, [2**62, 2**40, 2**63 - 1])), 2**40
        elif kind == "null_shape":
            t.shape = None
        elif kind == "strides":
            t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
            strides[0] = int(_choice(rng, [0, 2, -1, 2**62, 1]))
            self.bad = strides[0] != 1
        elif kind == "offset":
            t.byte_offset = int(_choice(rng, [1, 2, 2**40, 2**64 - 1]))
        elif kind == "name":
            name = _choice(rng, [b"used_dltensor", b"dltensor_versioned", b"x"])
        cap = self.capsule_new(ctypes.addressof(m), name, None)
        self.alive.append(cap)
        dev = (2, 0)
        if kind == "device_mismatch":
            dev = _choice(rng, [(1, 0), (2, 5), ("cuda", 0), None])

        class Obj:
            def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
                if kind == "raises":
                    raise RuntimeError("producer failed")
                if kind == "notcapsule":
                    return _choice(rng, [None, 5, b"x", object()])
                return cap

            def __dlpack_device__(self):
                if dev is None:
                    raise RuntimeError("no device")
                return dev
        return Obj()

    def case(self, rng):
        out_like = rng.random() < 0.3
        good = self.C.DeviceArray(np.zeros(self.d_out if out_like else self.d_in, np.float16))
        self.keep.append(good)
        labels = []
        obj = self.make(rng, good, labels)
        if out_like and not self.bad:
            labels.append("as-out")

            def run():
                self.L.forward(self.x, out=obj)
            return "+".join(labels), run

        def run():
            if out_like:
                self.bad = True      # an x of out_features width is a bad x
            self.use(rng, obj, labels)
        return "+".join(labels), run


TARGET_CLASSES = {"gguf": GGUFTarget, "safetensors": SafetensorsTarget,
                  "artifacts": ArtifactsTarget, "declinear": DecLinearTarget,
                  "cuda_array_interface": CAITarget, "dlpack": DLPackTarget}


# =============================================================================== worker
def case_rng(seed: int, target: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TARGET_IDS[target], index])


def _label(label) -> str:
    """Cases may return their label list: operations append to it while the case runs."""
    return "+".join(label) if isinstance(label, list) else str(label)


def worker_main(target: str, seed: int, start: int, n: int, work: Path) -> int:
    faulthandler.enable()
    t = TARGET_CLASSES[target]()
    t.setup(work)
    out = sys.stdout
    print("READY", flush=True)
    for i in range(start, n):
        rng = case_rng(seed, target, i)
        try:
            label, fn = t.case(rng)
        except Exception as e:  # noqa: BLE001 -- a generator bug must not look like a pass
            print("R", json.dumps([i, "harness-error", f"{type(e).__name__}: {e}",
                                   traceback.format_exc()[-400:]]), file=out, flush=True)
            continue
        print("S", json.dumps([i, _label(label)]), file=out, flush=True)
        try:
            fn()
            outcome, detail = "accepted", ""
        except BadAccept as e:
            outcome, detail = "bad-accept", str(e)[:300]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            outcome = t.classify(e)
            detail = f"{type(e).__name__}: {str(e)[:300]}"
        print("R", json.dumps([i, outcome, detail, _label(label)]), file=out, flush=True)
        dead = t.after_case()
        if dead:
            print("D", json.dumps([i, dead]), file=out, flush=True)
            return 3
    print("DONE", flush=True)
    return 0


def _crash_summary(tail: str) -> str:
    """The telling lines of a dead worker's stderr: the sanitizer's verdict, the Python frame."""
    keep = [l.strip() for l in tail.splitlines()
            if re.search(r"runtime error:|ERROR: AddressSanitizer|SUMMARY:|Fatal Python error|"
                         r"^\s*#[0-3] .* in dd_|^\s*#[0-3] .*py_|^  File ", l)]
    return " | ".join(keep[:6]) or (tail.strip().splitlines() or [""])[-1]


def run_target(target: str, n: int, seed: int, timeout: float, work: Path,
               python=None, env=None, progress=True, max_restarts=None) -> dict:
    """Run n cases of target in child workers; returns the result record."""
    res = {"target": target, "cases": 0, "accepted": 0, "rejected": 0, "bad-exception": 0,
           "bad-accept": 0, "crashes": 0, "hangs": 0, "harness-errors": 0, "seconds": 0.0,
           "examples": [], "restarts": 0}
    skip = TARGET_CLASSES[target]().available()
    if skip:
        res["skipped"] = skip
        return res
    work.mkdir(parents=True, exist_ok=True)
    kinds = Counter()
    t0 = time.time()
    i = 0
    stderr_path = work / f"{target}.stderr"
    max_restarts = max_restarts if max_restarts is not None else max(50, n // 4)

    def example(kind, idx, label, detail):
        key = (kind, re.sub(r"\d+", "N", detail)[:90])
        kinds[key] += 1
        if kinds[key] <= 2 and len(res["examples"]) < 60:
            res["examples"].append({"kind": kind, "case": idx, "label": label, "detail": detail,
                                    "repro": f"python bench/reliability.py --seed {seed} "
                                             f"--repro {target}:{idx}"})

    while i < n:
        cmd = [python or sys.executable, str(Path(__file__).resolve()), "--_worker", target,
               "--seed", str(seed), "--start", str(i), "--n", str(n), "--work", str(work)]
        with open(stderr_path, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, env=env,
                                    start_new_session=True)
        current, label = None, ""
        deadline = time.time() + max(timeout, 300)     # setup (imports, base files) may be slow
        buf = b""
        finished = False
        while True:
            wait = deadline - time.time()
            ready = select.select([proc.stdout], [], [], max(0.05, min(wait, 1.0)))[0]
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:          # EOF: the worker exited
                    rc = proc.wait()
                    if current is not None:
                        tail = stderr_path.read_bytes()[-8000:].decode("utf-8", "replace")
                        res["crashes"] += 1
                        res["cases"] += 1
                        sig = -rc if rc < 0 else None
                        detail = f"worker died (exit {rc}{', ' + signal.Signals(sig).name if sig else ''})" \
                                 f": {_crash_summary(tail)}"
                        example("crash", current, label, detail + "\n" + tail)
                        i = current + 1
                    elif not finished:
                        tail = stderr_path.read_bytes()[-8000:].decode("utf-8", "replace")
                        if i == 0 or res["restarts"] > max_restarts:
                            res["error"] = f"worker failed outside a case (exit {rc}): {tail}"
                            res["seconds"] = round(time.time() - t0, 1)
                            return res
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.decode("utf-8", "replace")
                    if line == "READY":
                        deadline = time.time() + timeout
                    elif line == "DONE":
                        finished = True
                        i = n
                    elif line.startswith("S "):
                        current, label = json.loads(line[2:])
                        deadline = time.time() + timeout
                    elif line.startswith("R "):
                        rec = json.loads(line[2:])
                        idx, outcome, detail = rec[0], rec[1], rec[2]
                        res["cases"] += 1
                        if outcome == "harness-error":
                            res["harness-errors"] += 1
                            example(outcome, idx, "", detail + rec[3])
                        else:
                            res[outcome] += 1
                            if outcome in ("bad-exception", "bad-accept"):
                                example(outcome, idx, rec[3], detail)
                        current = None
                        i = idx + 1
                        deadline = time.time() + timeout
                        if progress and res["cases"] % 500 == 0:
                            print(f"  {target}: {res['cases']}/{n} ({time.time() - t0:.0f} s)",
                                  file=sys.stderr, flush=True)
                    elif line.startswith("D "):
                        idx, why = json.loads(line[2:])
                        res["crashes"] += 1
                        example("crash", idx, label, why)
                        current = None
                        i = idx + 1
            elif time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if current is not None:
                    res["hangs"] += 1
                    res["cases"] += 1
                    example("hang", current, label, f"no progress for {timeout:g} s")
                    i = current + 1
                else:   # the generator of case i stalled: count it, go on after it
                    res["harness-errors"] += 1
                    example("harness-error", i, "", f"generating case {i} took > {timeout:g} s")
                    i += 1
                break
        proc.stdout.close()
        if i < n:
            res["restarts"] += 1
            if res["restarts"] > max_restarts:
                res["error"] = f"gave up after {res['restarts']} worker restarts"
                break
    res["seconds"] = round(time.time() - t0, 1)
    return res


# =============================================================================== soak
def soak_main(cycles: int, model_cycles: int, work: Path) -> dict:
    """Create/drop cycles; RSS sampled along the way. Runs in its own process (see main)."""
    from decdec import _C, artifacts, pipeline
    from decdec.layer import make_declinear  # noqa: F401
    results = {}
    rng = np.random.default_rng(0)
    dl = DecLinearTarget()
    dl.setup(work)
    d_in, d_out = 1100, 96
    arrays = dl.arrays(rng, d_in, d_out, 3, 128)
    kw = dict(in_features=d_in, out_features=d_out, bits=3, group_size=128, k_chunk=64)
    x = rng.standard_normal((2, d_in)).astype(np.float32)

    def measure(name, n, make, extra=None, warmup=0):
        # warmup: cycles run before sampling starts.  A loaded model's first few hundred cycles
        # grow the heap once (~1 MB: allocator arenas and CPython's interned-string table growing
        # under pathlib), then stay flat: measured with 200 warm-up cycles, +40 KiB over 4,000.
        for _ in range(warmup):
            obj = make()
            del obj
        samples = []
        every = max(1, n // 50)
        for c in range(n):
            obj = make()
            del obj
            if c % every == 0 or c == n - 1:
                s = _rss_kib()
                if extra:
                    s.update(extra())
                samples.append((c, s))
        warm = samples[len(samples) // 10:]
        cs = np.array([c for c, _ in warm], float)
        out = {"cycles": n, "start": samples[0][1], "after_warmup": warm[0][1], "end": samples[-1][1]}
        for key in samples[-1][1]:
            ys = np.array([s.get(key, 0) for _, s in warm], float)
            if len(cs) > 2 and np.ptp(cs) > 0:
                out[f"{key}_slope_kib_per_1000"] = round(float(np.polyfit(cs, ys, 1)[0]) * 1000, 3)
        out["rss_growth_kib"] = samples[-1][1].get("VmRSS", 0) - warm[0][1].get("VmRSS", 0)
        out["flat"] = out["rss_growth_kib"] < 2048 and abs(out.get("VmRSS_slope_kib_per_1000", 0)) < 100
        results[name] = out
        print(f"  soak {name}: {n} cycles, RSS {out['start'].get('VmRSS')} -> "
              f"{out['end'].get('VmRSS')} KiB, slope {out.get('VmRSS_slope_kib_per_1000')} KiB/1000",
              file=sys.stderr, flush=True)

    def cpu_layer():
        L = _C.DecLinear(*arrays.values(), **kw)
        L.forward(x)
        L.select(x[0])
        L.residual_codes
        return L
    measure("cpu_declinear", cycles, cpu_layer)

    base = work / "artifact_base"
    art = ArtifactsTarget()
    art.setup(work)
    tokens = np.array([256, 72, 105], np.int64)

    def model():
        qm = artifacts.load(base, check=False)
        m = pipeline.build_model(qm, k_chunk=8)
        m.forward(tokens)
        return m
    measure("cpu_loaded_model", model_cycles, model, warmup=min(600, model_cycles))

    if _cuda_ready() is None:
        def dev_mem():
            info = getattr(_C, "cuda_mem_info", None) or getattr(_C, "cuda_mem_get_info", None)
            if info is not None:
                free, total = info()
                return {"device_used_kib": (total - free) // 1024}
            try:
                r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                    "--format=csv,noheader,nounits"], capture_output=True,
                                   text=True, timeout=10)
                for line in r.stdout.splitlines():
                    pid, used = (s.strip() for s in line.split(","))
                    if int(pid) == os.getpid():
                        return {"device_used_kib": int(used) * 1024}
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            return {}
        xd = _C.DeviceArray(x[0].astype(np.float16))

        def cuda_layer():
            L = _C.DecLinear(*arrays.values(), **kw, device="cuda")
            L.forward(xd)
            return L
        measure("cuda_declinear", cycles, cuda_layer, dev_mem)

        def cuda_model():
            qm = artifacts.load(base, check=False)
            return pipeline.build_model(qm, k_chunk=8, device="cuda")
        measure("cuda_loaded_model", model_cycles, cuda_model, dev_mem)
    else:
        results["cuda"] = {"skipped": _cuda_ready()}
    return results


# =============================================================================== main
def print_table(results: list[dict], file=sys.stdout):
    cols = ["target", "cases", "accepted", "rejected", "bad-exception", "bad-accept", "crashes",
            "hangs", "seconds"]
    head = ["target", "cases", "accepted", "rejected-cleanly", "bad-exception", "bad-accept",
            "crashes", "hangs", "seconds"]
    print("| " + " | ".join(head) + " |", file=file)
    print("|" + "|".join("---" for _ in head) + "|", file=file)
    for r in results:
        if r.get("skipped"):
            print(f"| {r['target']} | skipped: {r['skipped']} |" + " |" * (len(head) - 2), file=file)
            continue
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |"
              + (f" ERROR: {r['error'][:200]}" if r.get("error") else ""), file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", action="append", help="target (repeatable); default: every fuzz "
                    "target, GPU ones skipped where there is no GPU; 'soak' for the soak")
    ap.add_argument("--n", type=int, help=f"cases per target (default {DEFAULT_N})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_N} cases per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' = stdout)")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--repro", metavar="TARGET:INDEX", help="run one case here, with traceback")
    ap.add_argument("--cycles", type=int, default=10_000, help="soak: DecLinear cycles")
    ap.add_argument("--model-cycles", type=int, default=2000, help="soak: loaded-model cycles")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_soak", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        return worker_main(args._worker, args.seed, args.start, args.n, Path(args.work))
    own_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="decdec-rel-"))
    try:
        if args._soak:
            print(json.dumps(soak_main(args.cycles, args.model_cycles, work)))
            return 0
        if args.repro:
            target, idx = args.repro.split(":")
            t = TARGET_CLASSES[target]()
            why = t.available()
            if why:
                print(f"{target} unavailable: {why}")
                return 2
            work.mkdir(parents=True, exist_ok=True)
            t.setup(work)
            label, fn = t.case(case_rng(args.seed, target, int(idx)))
            print(f"case {target}:{idx} seed {args.seed}: {_label(label)}", flush=True)
            try:
                fn()
                print("accepted:", _label(label))
            except BaseException as e:  # noqa: BLE001
                traceback.print_exc()
                print("outcome:", t.classify(e), "|", _label(label))
            return 0
        targets = args.target or FUZZ_TARGETS
        n = args.n or (QUICK_N if args.quick else DEFAULT_N)
        results = []
        if "soak" in targets:
            t0 = time.time()
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_soak",
                                "--cycles", str(args.cycles), "--model-cycles",
                                str(args.model_cycles), "--work", str(work)],
                               stdout=subprocess.PIPE, text=True)
            soak = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
                {"error": f"soak process exit {r.returncode}"}
            soak["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(soak, indent=1))
            results.append({"target": "soak", **soak})
            targets = [t for t in targets if t != "soak"]
        fuzz = []
        for target in targets:
            if target not in TARGET_CLASSES:
                ap.error(f"unknown target {target!r}; known: {', '.join(TARGET_CLASSES)}, soak")
            print(f"{target}: {n} cases, seed {args.seed}", file=sys.stderr, flush=True)
            r = run_target(target, n, args.seed, args.timeout, work / target)
            fuzz.append(r)
            for ex in r["examples"][:12]:
                print(f"  [{ex['kind']}] case {ex['case']} ({ex['label'][:80]}): "
                      f"{ex['detail'].splitlines()[0][:200] if ex['detail'] else ''}",
                      file=sys.stderr)
        if fuzz:
            print_table(fuzz)
        results += fuzz
        if args.json:
            text = json.dumps({"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                               "results": results}, indent=1, default=str)
            if args.json == "-":
                print(text)
            else:
                Path(args.json).write_text(text + "\n")
        bad = sum(r.get(k, 0) for r in fuzz for k in ("bad-exception", "bad-accept", "crashes",
                                                        "hangs", "harness-errors"))
        bad += sum(1 for r in fuzz if r.get("error"))
        soak_bad = any(isinstance(v, dict) and v.get("flat") is False for r in results
                       if r["target"] == "soak" for v in r.values())
        return 1 if bad or soak_bad else 0
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
