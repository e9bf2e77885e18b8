"""Quantized artifacts cached between runs, keyed by checksums of everything they depend on.

cached_quantize_models(...) returns what pipeline.quantize_models would, reading the artifacts of an
earlier run with the same inputs from $DECDEC_CACHE/artifacts/ (default ~/.cache/decdec) instead of
recomputing them. The key is a sha256 over
  * the model (the caller's model_id: the GGUF file's sha256 for SmolLM2, a checkpoint fingerprint
    otherwise),
  * the calibration token ids, the bit widths, method, group size, windows, sensitivity tokens and
    the AWQ grids,
  * the storage format version and the bytes of the modules that compute an artifact (pipeline,
    awq, quantize, cheatsheet, calibrate, model, formats, artifacts): a code change gives a new key,
    never a stale artifact.
Artifacts are written atomically (artifacts.save) and checked when read (artifacts.load verifies
every file's sha256); one that fails its check is recomputed and replaced, with a warning.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from . import artifacts
from . import awq as _awq
from .fetch import default_cache_dir

# the modules whose code decides an artifact's bytes
_CODE = ("pipeline.py", "awq.py", "quantize.py", "cheatsheet.py", "calibrate.py", "model.py",
         "formats.py", "artifacts.py")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source of the modules that compute an artifact (read once per process)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def artifact_key(model_id: str, calib_tokens, bits_list, method: str, group_size: int, n_windows: int,
                 sensitivity_tokens: int, alpha_grid, clip_grid) -> str:
    """The cache key (hex sha256) of a quantize_models call."""
    tokens = np.ascontiguousarray(np.asarray(calib_tokens, dtype=np.int64))
    spec = {"model": str(model_id), "calib_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
            "n_calib_tokens": int(tokens.size), "bits": [list(b) if isinstance(b, (list, tuple)) else float(b)
                                                          for b in bits_list],
            "method": method, "group_size": int(group_size), "n_windows": int(n_windows),
            "sensitivity_tokens": int(sensitivity_tokens),
            "alpha_grid": [float(a) for a in alpha_grid], "clip_grid": [float(c) for c in clip_grid],
            "format_version": artifacts.FORMAT_VERSION,
            "code": code_digest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_entry(model_id: str, calib_tokens, bits_list, method: str = "awq", group_size: int = 128,
                n_windows: int = 16, sensitivity_tokens: int = 256, alpha_grid=_awq.DEFAULT_ALPHA_GRID,
                clip_grid=_awq.DEFAULT_CLIP_GRID, cache_dir=None) -> Path:
    """The directory that holds (or will hold) the artifacts of a quantize_models call."""
    key = artifact_key(model_id, calib_tokens, bits_list, method, group_size, n_windows,
                       sensitivity_tokens, alpha_grid, clip_grid)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "artifacts"
    return root / key[:24]


def is_cached(entry: Path, bits_list) -> bool:
    """Whether every bit width's artifact is present under entry (not yet checked: load checks)."""
    return all((_bits_dir(entry, b) / artifacts.MANIFEST).is_file() for b in bits_list)


def _bits_dir(root: Path, b) -> Path:
    name = "-".join(str(x) for x in b) if isinstance(b, (list, tuple)) else f"{float(b):g}"
    return root / f"bits-{name}"


def cached_quantize_models(weights, calib_tokens, bits_list=(3, 4), *, model_id: str, method: str = "awq",
                           group_size: int = 128, n_windows: int = 16, sensitivity_tokens: int = 256,
                           tokenizer=None, progress: bool = True, cache_dir=None,
                           alpha_grid=_awq.DEFAULT_ALPHA_GRID, clip_grid=_awq.DEFAULT_CLIP_GRID):
    """pipeline.quantize_models through the artifact cache. Returns ({bits: QuantizedModel}, hit)
    where hit is True when every artifact came from the cache."""
    from . import pipeline
    root = cache_entry(model_id, calib_tokens, bits_list, method, group_size, n_windows, sensitivity_tokens,
                       alpha_grid, clip_grid, cache_dir)
    dirs = {b: _bits_dir(root, b) for b in bits_list}
    if is_cached(root, bits_list):
        try:
            return {b: artifacts.load(d) for b, d in dirs.items()}, True
        except artifacts.ArtifactError as e:
            warnings.warn(f"cached artifact under {root} failed its check ({e}); recomputing it",
                          RuntimeWarning, stacklevel=2)
    qms = pipeline.quantize_models(weights, calib_tokens, bits_list, method=method, group_size=group_size,
                                   n_windows=n_windows, sensitivity_tokens=sensitivity_tokens,
                                   tokenizer=tokenizer, progress=progress, alpha_grid=alpha_grid,
                                   clip_grid=clip_grid)
    for b in bits_list:
        artifacts.save(qms[b], dirs[b], overwrite=True)
    return {b: qms[b] for b in bits_list}, False
