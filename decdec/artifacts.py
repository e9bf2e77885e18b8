"""Save and load a quantized model (a directory) with a manifest, checksums and atomic writes.

Layout of an artifact directory:
    manifest.json            format name and version, config, quantizer, bits per block, calibration,
                             tokenizer settings, and {relative path: {sha256, bytes}} of every file
    embeddings.npy           float32 [V, D] token embeddings (also the head when tied)
    lm_head.npy              float32 [V, D], only when the head is not tied
    norm.npy                 float32 [D] final RMSNorm
    blocks/block_NNN.npz     per decoder block: folded norms, AWQ scales, biases, and per linear
                             <name>.qweight/.scales/.zeros (base weight, decdec.h), <name>.rcodes/
                             .rscales (cheatsheet) and <name>.thresholds
    tokenizer.json           the tokenizer (PyPI tokenizers' format), when the model carried one
The directory is written under a temporary name beside the target and renamed into place, so a
reader never sees a half-written artifact. load() verifies sizes and sha256 of every file before
reading it and checks every array against the config; any mismatch raises ArtifactError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

FORMAT_NAME = "decdec-quantized-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt, or does not match what it claims to hold."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(qm, directory, *, overwrite: bool = False) -> Path:
    """Write QuantizedModel qm to `directory` atomically. Returns the directory path."""
    from . import __version__
    from .awq import INPUT_KINDS
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = []
        def save_npy(rel, arr):
            p = tmp / rel
            with open(p, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files.append(rel)

        save_npy("embeddings.npy", qm.tok_embeddings)
        tied = qm.lm_head is qm.tok_embeddings
        if not tied:
            save_npy("lm_head.npy", qm.lm_head)
        save_npy("norm.npy", qm.norm)
        (tmp / "blocks").mkdir()
        for l, b in enumerate(qm.blocks):
            arrays = {"attn_norm": b.attn_norm, "ffn_norm": b.ffn_norm}
            for kind in INPUT_KINDS:
                arrays[f"scale.{kind}"] = b.scales.of_input(kind)
            for k, v in b.biases.items():
                arrays[f"bias.{k}"] = v
            for name, ql in b.linears.items():
                arrays[f"{name}.qweight"] = ql.qweight.qweight
                arrays[f"{name}.scales"] = ql.qweight.scales
                arrays[f"{name}.zeros"] = ql.qweight.zeros
                arrays[f"{name}.rcodes"] = ql.cheatsheet.codes
                arrays[f"{name}.rscales"] = ql.cheatsheet.scales
                arrays[f"{name}.thresholds"] = ql.thresholds
            rel = f"blocks/block_{l:03d}.npz"
            with open(tmp / rel, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            files.append(rel)
        tok_meta = None
        if qm.tokenizer is not None:
            t = qm.tokenizer
            _fsync_write(tmp / "tokenizer.json", t.backend.to_str().encode("utf-8"))
            files.append("tokenizer.json")
            tok_meta = {"bos_id": t.bos_id, "eos_id": t.eos_id, "add_bos": bool(t.add_bos),
                        "eos_ids": sorted(int(i) for i in t.stop_ids), "chat_template": t.chat_template}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "decdec_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": dataclasses.asdict(qm.config),
            "method": qm.method,
            "group_size": qm.group_size,
            "bits_per_layer": qm.bits_per_layer,
            "tied_embeddings": tied,
            "awq_alphas": [b.scales.alphas for b in qm.blocks],
            "calibration": qm.calibration,
            "tokenizer": tok_meta,
            "files": {rel: {"sha256": _sha256(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                      for rel in files},
        }
        _fsync_write(tmp / MANIFEST, (json.dumps(manifest, indent=1, default=_json_default) + "\n").encode())
        # Swap into place: the old directory (if any) is moved aside first, removed last.
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(directory) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory (expected a decdec artifact)")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a decdec artifact directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                            f"supported (this decdec reads version {FORMAT_VERSION})")
    for key in ("config", "method", "group_size", "bits_per_layer", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}; the artifact is corrupt")
    return manifest


def verify(directory) -> dict:
    """Check every file listed in the manifest (present, size, sha256). Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, info in manifest["files"].items():
        p = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ArtifactError(f"manifest names a file outside the artifact: {rel!r}")
        if not p.is_file():
            raise ArtifactError(f"{p} is missing (listed in the manifest)")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{p} has {size} bytes, the manifest says {info.get('bytes')} "
                                f"(truncated or replaced)")
        if _sha256(p) != info.get("sha256"):
            raise ArtifactError(f"{p} fails its sha256 check: the file is corrupt")
    return manifest


def load(directory, *, check: bool = True):
    """Read a QuantizedModel written by save(). check=False skips the sha256 pass (sizes and
    shapes are still checked)."""
    from .awq import INPUT_KINDS, LayerScales
    from .cheatsheet import Cheatsheet
    from .model import LINEAR_NAMES, LlamaConfig
    from .pipeline import QuantizedBlock, QuantizedLinear, QuantizedModel
    from .quantize import QuantizedWeight
    from . import formats
    directory = Path(directory)
    manifest = verify(directory) if check else read_manifest(directory)
    try:
        config = LlamaConfig(**manifest["config"])
        config.validate()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: bad config ({e})") from None
    listed = set(manifest["files"])

    def need(rel):
        if rel not in listed:
            raise ArtifactError(f"the manifest does not list {rel}; the artifact is incomplete")
        return directory / rel

    def load_npy(rel, shape, dtype):
        try:
            a = np.load(need(rel), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ArtifactError(f"{directory / rel} cannot be read ({e})") from None
        if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            raise ArtifactError(f"{directory / rel} is {a.dtype}{list(a.shape)}, expected "
                                f"{np.dtype(dtype)}{list(shape)}")
        return a

    V, D = config.vocab_size, config.dim
    emb = load_npy("embeddings.npy", (V, D), np.float32)
    lm_head = emb if manifest.get("tied_embeddings", True) else load_npy("lm_head.npy", (V, D), np.float32)
    norm = load_npy("norm.npy", (D,), np.float32)
    bits_per_layer = manifest["bits_per_layer"]
    if len(bits_per_layer) != config.n_layers or any(b not in (3, 4) for b in bits_per_layer):
        raise ArtifactError(f"bits_per_layer must be {config.n_layers} values in (3, 4)")
    group_size = int(manifest["group_size"])
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "w_gate": (config.ffn_dim, D),
              "w_up": (config.ffn_dim, D), "w_down": (D, config.ffn_dim)}
    scale_len = {"attn_in": D, "o_in": q, "ffn_in": D, "down_in": config.ffn_dim}
    alphas = manifest.get("awq_alphas") or [{}] * config.n_layers
    blocks = []
    for l, bits in enumerate(bits_per_layer):
        rel = f"blocks/block_{l:03d}.npz"
        try:
            with np.load(need(rel), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, KeyError) as e:
            raise ArtifactError(f"{directory / rel} cannot be read ({e})") from None

        def get(key, shape, dtype):
            if key not in arrays:
                raise ArtifactError(f"{directory / rel} lacks array {key!r}")
            a = arrays[key]
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ArtifactError(f"{directory / rel}: {key} is {a.dtype}{list(a.shape)}, expected "
                                    f"{np.dtype(dtype)}{list(shape)}")
            return a

        scales = LayerScales(*(get(f"scale.{k}", (scale_len[k],), np.float32) for k in INPUT_KINDS),
                             alphas[l] if l < len(alphas) else {})
        linears = {}
        for name in LINEAR_NAMES:
            d_out, d_in = shapes[name]
            try:
                formats.check_layer_shape(d_out, d_in, bits, group_size)
            except ValueError as e:
                raise ArtifactError(f"{rel}: {name}: {e}") from None
            n_groups = formats.num_groups(d_in, group_size)
            qw = QuantizedWeight(
                get(f"{name}.qweight", (d_out, formats.qweight_row_bytes(d_in, bits)), np.uint8),
                get(f"{name}.scales", (d_out, n_groups), np.float16),
                get(f"{name}.zeros", (d_out, n_groups), np.float16), bits, group_size, d_in, d_out)
            cs = Cheatsheet(get(f"{name}.rcodes", (d_in, d_out // 2), np.uint8),
                            get(f"{name}.rscales", (d_out,), np.float16))
            th = get(f"{name}.thresholds", (d_in,), np.float32)
            linears[name] = QuantizedLinear(qw, cs, th)
        biases = {k[5:]: v for k, v in arrays.items() if k.startswith("bias.")}
        blocks.append(QuantizedBlock(bits, get("attn_norm", (D,), np.float32),
                                     get("ffn_norm", (D,), np.float32), scales, linears, biases))
    tokenizer = None
    tmeta = manifest.get("tokenizer")
    if tmeta is not None:
        from tokenizers import Tokenizer as _HFTokenizer
        from .tokenizer import Tokenizer
        try:
            backend = _HFTokenizer.from_file(str(need("tokenizer.json")))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ArtifactError(f"{directory / 'tokenizer.json'} cannot be read ({e})") from None
        tokenizer = Tokenizer(backend, bos_id=tmeta.get("bos_id"), eos_id=tmeta.get("eos_id"),
                              add_bos=bool(tmeta.get("add_bos")), chat_template=tmeta.get("chat_template"),
                              eos_ids=tmeta.get("eos_ids") or ())
    return QuantizedModel(config, emb, norm, lm_head, blocks, manifest["method"], group_size,
                          manifest.get("calibration") or {}, tokenizer)
