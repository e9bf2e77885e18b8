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


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that the names created in it survive a crash (POSIX only)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_npy(path: Path, arr: np.ndarray) -> None:
    """np.save of arr to path, fsynced."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class NpyRowWriter:
    """Writes a C-ordered .npy file of a known shape row chunk by row chunk, so that a large matrix
    (the embeddings of an 8B model) never has to be held whole. The bytes are those np.save writes
    for the whole array. Use as a context manager; write(chunk) in row order; fsynced on close."""

    def __init__(self, path: Path, shape: tuple, dtype=np.float32):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0

    def __enter__(self):
        self.f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.f, header)
        return self

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:] or self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"{self.path.name}: chunk {chunk.shape} does not continue an array of "
                             f"shape {self.shape} at row {self.rows}")
        self.f.write(chunk.tobytes())
        self.rows += len(chunk)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self.rows != self.shape[0]:
                    raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        return False


# Every member of a block archive gets this timestamp (np.savez stamps the current time), so that
# the same arrays give the same bytes and sha256: a resumed or repeated run is byte-identical.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def block_arrays(b) -> dict:
    """The arrays of one QuantizedBlock, keyed as blocks/block_NNN.npz stores them."""
    from .awq import INPUT_KINDS
    arrays = {"attn_norm": b.attn_norm, "ffn_norm": b.ffn_norm}
    for kind in INPUT_KINDS:
        arrays[f"scale.{kind}"] = b.scales.of_input(kind)
    for k, v in b.biases.items():
        arrays[f"bias.{k}"] = v
    for name, ql in b.linears.items():
        if ql.thresholds is None:
            raise ValueError(f"block linear {name} has no thresholds (calibrate before saving)")
        arrays[f"{name}.qweight"] = ql.qweight.qweight
        arrays[f"{name}.scales"] = ql.qweight.scales
        arrays[f"{name}.zeros"] = ql.qweight.zeros
        arrays[f"{name}.rcodes"] = ql.cheatsheet.codes
        arrays[f"{name}.rscales"] = ql.cheatsheet.scales
        arrays[f"{name}.thresholds"] = ql.thresholds
    return arrays


def write_block(path: Path, block) -> None:
    """One decoder block as an uncompressed .npz (what np.savez writes, with fixed member
    timestamps), fsynced."""
    import zipfile
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in block_arrays(block).items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def block_file(l: int) -> str:
    return f"blocks/block_{l:03d}.npz"


def write_tokenizer(tok, directory: Path):
    """tokenizer.json into directory; returns the manifest's tokenizer settings (None if no tok)."""
    if tok is None:
        return None
    _fsync_write(directory / "tokenizer.json", tok.backend.to_str().encode("utf-8"))
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": bool(tok.add_bos),
            "eos_ids": sorted(int(i) for i in tok.stop_ids), "chat_template": tok.chat_template}


def file_record(path: Path) -> dict:
    """{sha256, bytes} of a file, as the manifest lists it."""
    return {"sha256": _sha256(path), "bytes": Path(path).stat().st_size}


def write_manifest(directory: Path, *, config, method: str, group_size: int, bits_per_layer,
                   tied: bool, awq_alphas, calibration: dict, tokenizer, files: dict) -> None:
    """manifest.json (fsynced) from its parts; files: {relative path: file_record}."""
    from . import __version__
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "decdec_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": dataclasses.asdict(config),
        "method": method,
        "group_size": group_size,
        "bits_per_layer": list(bits_per_layer),
        "tied_embeddings": tied,
        "awq_alphas": list(awq_alphas),
        "calibration": calibration,
        "tokenizer": tokenizer,
        "files": files,
    }
    _fsync_write(directory / MANIFEST,
                 (json.dumps(manifest, indent=1, default=_json_default) + "\n").encode())


def commit(tmp: Path, directory: Path) -> None:
    """Rename the finished temporary directory tmp into place as directory (atomically; an old
    directory there is moved aside first and removed last)."""
    _fsync_dir(tmp)
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save(qm, directory, *, overwrite: bool = False) -> Path:
    """Write QuantizedModel qm to `directory` atomically. Returns the directory path."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = []
        write_npy(tmp / "embeddings.npy", qm.tok_embeddings)
        files.append("embeddings.npy")
        tied = qm.lm_head is qm.tok_embeddings
        if not tied:
            write_npy(tmp / "lm_head.npy", qm.lm_head)
            files.append("lm_head.npy")
        write_npy(tmp / "norm.npy", qm.norm)
        files.append("norm.npy")
        (tmp / "blocks").mkdir()
        for l, b in enumerate(qm.blocks):
            write_block(tmp / block_file(l), b)
            files.append(block_file(l))
        tok_meta = write_tokenizer(qm.tokenizer, tmp)
        if tok_meta is not None:
            files.append("tokenizer.json")
        write_manifest(tmp, config=qm.config, method=qm.method, group_size=qm.group_size,
                       bits_per_layer=qm.bits_per_layer, tied=tied,
                       awq_alphas=[b.scales.alphas for b in qm.blocks],
                       calibration=qm.calibration, tokenizer=tok_meta,
                       files={rel: file_record(tmp / rel) for rel in files})
        commit(tmp, directory)
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


_MAX_INFLATE = 1024          # a deflated .npz member may expand at most this much


def _parse_npy(data: bytes, where: str) -> np.ndarray:
    """An array from the bytes of one .npy file, its header checked against the bytes present
    (np.load trusts the header: a lying shape becomes a huge allocation or NumPy's own error)."""
    import io
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # noqa: BLE001 -- NumPy raises ValueError, SyntaxError, TypeError...
        raise ArtifactError(f"{where} is not a valid .npy array ({e})") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise ArtifactError(f"{where} holds dtype {dtype}, not a plain numeric array")
    count = 1
    for d in shape:
        count *= d
    offset = fp.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise ArtifactError(f"{where}: its header says {dtype}{list(shape)} ({count * dtype.itemsize}"
                            f" bytes) but {len(data) - offset} bytes follow (truncated or corrupt)")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    return np.ascontiguousarray(a.astype(dtype.newbyteorder("="), copy=False))


def _read_npy(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e})") from None
    return _parse_npy(data, str(path))


def _read_npz(path: Path) -> dict:
    import zipfile
    import zlib
    arrays = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                limit = size if info.compress_type == zipfile.ZIP_STORED else size * _MAX_INFLATE
                if info.file_size > limit:
                    raise ArtifactError(f"{path}: member {info.filename!r} claims {info.file_size} "
                                        f"bytes, more than the archive can hold")
                if not info.filename.endswith(".npy"):
                    raise ArtifactError(f"{path}: unexpected member {info.filename!r}")
                key = info.filename[:-4]
                if key in arrays:
                    raise ArtifactError(f"{path}: array {key!r} is stored twice")
                arrays[key] = _parse_npy(zf.read(info), f"{path}[{key}]")
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
        raise ArtifactError(f"{path} is not a readable .npz archive ({e})") from None
    return arrays


def _check_finite(a: np.ndarray, where: str) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ArtifactError(f"{where} holds NaN or Inf values (corrupt artifact)")


def _require(ok: bool, path, what: str) -> None:
    if not ok:
        raise ArtifactError(f"{path}: manifest {what}; the artifact is corrupt")


def read_manifest(directory) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory (expected a decdec artifact)")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a decdec artifact directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
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
    files = manifest["files"]
    _require(isinstance(files, dict) and all(
        isinstance(rel, str) and isinstance(info, dict) and isinstance(info.get("sha256"), str)
        and isinstance(info.get("bytes"), int) and not isinstance(info.get("bytes"), bool)
        for rel, info in files.items()), path, "'files' must map paths to {sha256, bytes}")
    _require(isinstance(manifest["config"], dict), path, "'config' must be an object")
    _require(manifest["method"] in ("rtn", "awq"), path, "'method' must be 'rtn' or 'awq'")
    gs = manifest["group_size"]
    _require(isinstance(gs, int) and not isinstance(gs, bool), path, "'group_size' must be an int")
    bpl = manifest["bits_per_layer"]
    _require(isinstance(bpl, list) and all(b in (3, 4) and not isinstance(b, bool) for b in bpl),
             path, "'bits_per_layer' must be a list of 3s and 4s")
    _require(isinstance(manifest.get("tied_embeddings", True), bool), path,
             "'tied_embeddings' must be a bool")
    alphas = manifest.get("awq_alphas")
    _require(alphas is None or (isinstance(alphas, list) and all(isinstance(a, dict) for a in alphas)),
             path, "'awq_alphas' must be a list of objects")
    _require(manifest.get("calibration") is None or isinstance(manifest["calibration"], dict),
             path, "'calibration' must be an object")
    tok = manifest.get("tokenizer")
    if tok is not None:
        def id_or_none(v):
            return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        _require(isinstance(tok, dict), path, "'tokenizer' must be an object or null")
        _require(id_or_none(tok.get("bos_id")) and id_or_none(tok.get("eos_id")), path,
                 "tokenizer bos_id/eos_id must be token ids or null")
        eos_ids = tok.get("eos_ids") or []
        _require(isinstance(eos_ids, list) and all(id_or_none(i) and i is not None for i in eos_ids),
                 path, "tokenizer eos_ids must be a list of token ids")
        _require(isinstance(tok.get("add_bos", False), bool), path, "tokenizer add_bos must be a bool")
        _require(tok.get("chat_template") is None or isinstance(tok["chat_template"], str), path,
                 "tokenizer chat_template must be a string or null")
    return manifest


def verify(directory) -> dict:
    """Check every file listed in the manifest (present, size, sha256). Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, info in manifest["files"].items():
        p = directory / rel
        _inside(directory, rel)
        if not p.is_file():
            raise ArtifactError(f"{p} is missing (listed in the manifest)")
        size = p.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{p} has {size} bytes, the manifest says {info.get('bytes')} "
                                f"(truncated or replaced)")
        if _sha256(p) != info.get("sha256"):
            raise ArtifactError(f"{p} fails its sha256 check: the file is corrupt")
    return manifest


def _check_config(c) -> None:
    """What LlamaConfig.validate leaves open and a hand-edited manifest could still get wrong."""
    import math
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                 "max_seq_len"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 31:
            raise ValueError(f"{name} must be a positive int below 2**31, got {v!r:.40}")
    for name in ("norm_eps", "rope_theta"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r:.40}")
    for name in ("tie_embeddings", "attn_bias"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(c, name)!r:.40}")
    for name in ("bos_id", "eos_id"):
        v = getattr(c, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < c.vocab_size):
            raise ValueError(f"{name} must be a token id in [0, {c.vocab_size}) or null, got {v!r:.40}")
    if c.sliding_window is not None and (isinstance(c.sliding_window, bool) or
                                         not isinstance(c.sliding_window, int) or c.sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or null, got {c.sliding_window!r:.40}")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if not isinstance(rs, dict) or not all(
                isinstance(rs.get(k), (int, float)) and not isinstance(rs.get(k), bool)
                and math.isfinite(rs[k]) and rs[k] > 0 for k in keys):
            raise ValueError(f"rope_scaling must be null or an object with positive {', '.join(keys)}")


def _inside(directory: Path, rel: str) -> Path:
    """directory / rel, refusing names that leave the artifact (.., absolute, symlinks out)."""
    p = directory / rel
    if not rel or "\0" in rel or ".." in Path(rel).parts or Path(rel).is_absolute() or \
            directory.resolve() not in p.resolve().parents:
        raise ArtifactError(f"manifest names a file outside the artifact: {rel!r:.100}")
    return p


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
        _check_config(config)
        config.validate()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: bad config ({e})") from None
    listed = set(manifest["files"])

    def need(rel):
        if rel not in listed:
            raise ArtifactError(f"the manifest does not list {rel}; the artifact is incomplete")
        p = _inside(directory, rel)
        if not p.is_file():
            raise ArtifactError(f"{p} is missing (listed in the manifest)")
        return p

    def load_npy(rel, shape, dtype):
        a = _read_npy(need(rel))
        if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            raise ArtifactError(f"{directory / rel} is {a.dtype}{list(a.shape)}, expected "
                                f"{np.dtype(dtype)}{list(shape)}")
        _check_finite(a, str(directory / rel))
        return a

    V, D = config.vocab_size, config.dim
    emb = load_npy("embeddings.npy", (V, D), np.float32)
    lm_head = emb if manifest.get("tied_embeddings", True) else load_npy("lm_head.npy", (V, D), np.float32)
    norm = load_npy("norm.npy", (D,), np.float32)
    bits_per_layer = manifest["bits_per_layer"]
    if len(bits_per_layer) != config.n_layers or any(b not in (3, 4) for b in bits_per_layer):
        raise ArtifactError(f"bits_per_layer must be {config.n_layers} values in (3, 4)")
    group_size = manifest["group_size"]
    if len(alphas_or_none := (manifest.get("awq_alphas") or [])) not in (0, config.n_layers):
        raise ArtifactError(f"awq_alphas has {len(alphas_or_none)} entries for {config.n_layers} blocks")
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "w_gate": (config.ffn_dim, D),
              "w_up": (config.ffn_dim, D), "w_down": (D, config.ffn_dim)}
    scale_len = {"attn_in": D, "o_in": q, "ffn_in": D, "down_in": config.ffn_dim}
    alphas = manifest.get("awq_alphas") or [{}] * config.n_layers
    blocks = []
    for l, bits in enumerate(bits_per_layer):
        rel = f"blocks/block_{l:03d}.npz"
        arrays = _read_npz(need(rel))

        def get(key, shape, dtype):
            if key not in arrays:
                raise ArtifactError(f"{directory / rel} lacks array {key!r}")
            a = arrays[key]
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ArtifactError(f"{directory / rel}: {key} is {a.dtype}{list(a.shape)}, expected "
                                    f"{np.dtype(dtype)}{list(shape)}")
            _check_finite(a, f"{directory / rel}: {key}")
            return a

        def thresholds(key, d_in):
            t = get(key, (d_in,), np.float32)
            if (t < 0).any() or (np.diff(t) > 0).any():
                raise ArtifactError(f"{directory / rel}: {key} must be >= 0 and non-increasing")
            return t

        scale_arrays = [get(f"scale.{k}", (scale_len[k],), np.float32) for k in INPUT_KINDS]
        if any((s <= 0).any() for s in scale_arrays):
            raise ArtifactError(f"{directory / rel}: AWQ scales must be positive")
        scales = LayerScales(*scale_arrays, alphas[l] if l < len(alphas) else {})
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
            th = thresholds(f"{name}.thresholds", d_in)
            linears[name] = QuantizedLinear(qw, cs, th)
        from .model import BIAS_NAMES
        bias_shapes = {BIAS_NAMES[n]: (shapes[n][0],) for n in BIAS_NAMES} if config.attn_bias else {}
        extra = sorted(k for k in arrays if k.startswith("bias.") and k[5:] not in bias_shapes)
        if extra:
            raise ArtifactError(f"{directory / rel}: unexpected arrays {extra} (config.attn_bias is "
                                f"{config.attn_bias})")
        biases = {b: get(f"bias.{b}", shape, np.float32) for b, shape in bias_shapes.items()}
        blocks.append(QuantizedBlock(bits, get("attn_norm", (D,), np.float32),
                                     get("ffn_norm", (D,), np.float32), scales, linears, biases))
    tokenizer = None
    tmeta = manifest.get("tokenizer")
    if tmeta is not None:
        from tokenizers import Tokenizer as _HFTokenizer
        from .tokenizer import Tokenizer
        try:
            backend = _HFTokenizer.from_file(str(need("tokenizer.json")))
        except ArtifactError:
            raise
        except Exception as e:  # tokenizers raises its own Exception type
            raise ArtifactError(f"{directory / 'tokenizer.json'} cannot be read ({e})") from None
        n_tok = backend.get_vocab_size(with_added_tokens=True)
        ids = [tmeta.get("bos_id"), tmeta.get("eos_id"), *(tmeta.get("eos_ids") or [])]
        if n_tok > V or any(i is not None and i >= n_tok for i in ids):
            raise ArtifactError(f"{directory / 'tokenizer.json'}: {n_tok} tokens do not fit the "
                                f"model's vocab_size {V} or its bos/eos ids {ids}")
        tokenizer = Tokenizer(backend, bos_id=tmeta.get("bos_id"), eos_id=tmeta.get("eos_id"),
                              add_bos=bool(tmeta.get("add_bos")), chat_template=tmeta.get("chat_template"),
                              eos_ids=tmeta.get("eos_ids") or ())
    return QuantizedModel(config, emb, norm, lm_head, blocks, manifest["method"], group_size,
                          manifest.get("calibration") or {}, tokenizer)
