"""Streaming quantizer: a Hugging Face checkpoint (or a GGUF file) to a DecDEC artifact, one decoder
block at a time.

decdec.pipeline.quantize_models holds the whole model as float32 (an 8B model: ~32 GB). This module
computes the same artifact holding only
  * the residual stream of every calibration window entering the current block
    (n_windows x 512 x dim float32: 134 MB for Llama-3-8B at 16 windows),
  * the weights and calibration statistics of the blocks in flight (`workers` of them being
    quantized plus the one being run forward),
  * one chunk of embedding rows while the embeddings / head are converted.

Why one residual stream is enough: the in-memory pipeline takes both the AWQ statistics and the
thresholds from the *float reference* model (thresholds in each block's folded basis: the reference
layer input divided by the block's AWQ scale), never from the quantized model. Block l's
statistics and thresholds therefore depend only on the float residual stream entering block l, and
the stream advances through the float block. Per block:
  1. read block l's weights (HFCheckpoint.layer / GGUFCheckpoint.layer);
  2. run the float block over every window (decdec.model.block_forward, the function
     LlamaModel.forward runs), collecting the Gram statistics (pipeline.GramCollector) and giving
     the stream entering block l + 1 (checkpointed to disk for resume);
  3. in a worker thread: pipeline.quantize_block (AWQ scale / clip search or RTN, packing,
     cheatsheets), then the thresholds: the block run again over the same windows with
     pipeline.ThresholdCollector (it needs the scales found in 3), then the block's file is written
     (fsync) and the journal records it (block, file, sha256). Quantizing block l overlaps with
     step 2 of block l + 1.
Every number comes out of the same functions the in-memory path calls, over the same arrays in the
same order, so the two artifacts are equal bit for bit (tests/test_stream.py checks every file's
sha256; block archives have fixed timestamps, artifacts.write_block).

Work directory `.NAME.partial/` beside the output: `artifact/` (the files of the artifact to be),
`journal.json` (settings, finished files and blocks with their sha256; rewritten atomically),
`resid_NNN.npy` (the stream entering block NNN, kept while NNN is unfinished) and a lock file.
At the end the manifest is written into artifact/, which is renamed into place (artifacts.commit);
then the work directory is removed.

Resume (resume=True): the journal's settings must match the run's (checkpoint fingerprint, bits,
method, group size, calibration tokens, grids), else ValueError naming what differs. Every
finished file is checked against its recorded size and sha256; a block (or the embeddings) whose
file is missing, changed or whose entry is malformed is *redone*, with a warning naming it. A
journal that is not readable JSON is *refused* (ArtifactError): nothing in the work directory can
then be trusted, and deleting it starts over. The stream entering the first unfinished block is read
from its checkpoint, or, when that is missing or corrupt, recomputed from the embeddings through
the finished blocks' float weights.

3.5 bits (mixed by measured sensitivity) is not streamed: the sensitivity of block l is the KL of the
whole model with block l alone quantized, one whole-model pass per block. stream_quantize refuses
it; a per-block list of 3s and 4s (e.g. chosen from an in-memory run on a smaller proxy) is
accepted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import artifacts
from . import awq as _awq
from .artifacts import ArtifactError
from .fileio import atomic_write_text
from .model import LINEAR_NAMES, DenseLinear, attention_mask, block_forward, rope_inv_freq, rope_tables
from .pipeline import (CALIB_CONTEXT, DEFAULT_CALIB_WINDOWS, GramCollector, ThresholdCollector,
                       _tqdm, assign_thresholds, calibration_record, calibration_windows,
                       check_quantizer_args, quantize_block)

JOURNAL = "journal.json"
JOURNAL_VERSION = 1
_EMB_CHUNK_ELEMS = 1 << 20      # embedding rows read / written per chunk: 1M values (4 MB f32)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: VmHWM of /proc/self/status where there is
    one. Not ru_maxrss first: Linux carries it across fork + exec, so a child started by a big
    process (a test runner) reports its parent's peak; VmHWM belongs to the address space, which
    exec replaces."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import sys
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024      # macOS: bytes; Linux: KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class StreamResult:
    path: Path
    seconds: dict                       # wall seconds per stage (worker stages summed over threads)
    peak_rss_bytes: int
    skipped_blocks: list = field(default_factory=list)   # finished in an earlier run, verified
    redone_blocks: list = field(default_factory=list)    # journaled earlier but failed their check


def _per_block_bits(bits, n_layers: int) -> list[int]:
    if isinstance(bits, (list, tuple)):
        if len(bits) != n_layers or any(isinstance(b, bool) or b not in (3, 4) for b in bits):
            raise ValueError(f"per-block bits must be {n_layers} values in (3, 4), got {list(bits)}")
        return [int(b) for b in bits]
    if bits == 3.5:
        raise ValueError("3.5-bit (mixed by sensitivity) is not supported by the streaming "
                         "quantizer: measuring each block's sensitivity needs a whole-model pass "
                         "per block. Give bits 3, 4 or a per-block list of 3s and 4s, or use the "
                         "in-memory pipeline (decdec.pipeline.quantize_model) for 3.5")
    if isinstance(bits, bool) or bits not in (3, 4):
        raise ValueError(f"bits must be 3, 4 or a per-block list of 3s and 4s, got {bits!r}")
    return [int(bits)] * n_layers


def _calib_tokens(calib_tokens, tok, vocab: int) -> np.ndarray:
    if calib_tokens is None or isinstance(calib_tokens, str):
        if tok is None:
            raise ValueError("calibration needs token ids (calib_tokens=...) or a tokenizer.json "
                             "in the checkpoint to encode the calibration text")
        from . import data
        text = data.text("emma") if calib_tokens is None else calib_tokens
        return np.asarray(tok.encode(text), dtype=np.int64)
    t = np.asarray(calib_tokens)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"calib_tokens must be a 1-D integer array of token ids, got shape "
                         f"{t.shape} dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= vocab):
        raise ValueError(f"calib_tokens must lie in [0, {vocab}), got [{t.min()}, {t.max()}]")
    return t.astype(np.int64)


def _sha_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class _Work:
    """The work directory: artifact-to-be, journal, residual-stream checkpoints, lock."""

    def __init__(self, out_dir: Path, settings: dict, resume: bool):
        self.out_dir = out_dir
        self.root = out_dir.parent / f".{out_dir.name}.partial"
        self.art = self.root / "artifact"
        self.journal_path = self.root / JOURNAL
        self.settings = settings
        if self.root.exists() and not self.art.exists():
            # a finished run renamed its artifact away and died before removing this: stale
            shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists() and not resume:
            raise FileExistsError(f"{self.root} holds an interrupted streaming run: pass "
                                  f"resume=True (CLI: --resume) to continue it, or delete it to "
                                  f"start over")
        fresh = not self.root.exists()
        (self.art / "blocks").mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise OSError(f"{self.root} is in use by another streaming run (its lock is held)") from None
        self.journal = {"journal_version": JOURNAL_VERSION, "settings": settings, "files": {},
                        "blocks": {}, "resid": {}}
        try:
            if not fresh and self.journal_path.exists():
                self._read_journal()
            self._mutex = threading.Lock()
            self.write_journal()
        except BaseException:
            self.close()
            raise

    def _read_journal(self):
        p = self.journal_path
        try:
            j = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ArtifactError(f"{p} is not readable JSON ({e}): cannot resume; delete "
                                f"{self.root} to start over") from None
        if not isinstance(j, dict) or j.get("journal_version") != JOURNAL_VERSION or \
                not isinstance(j.get("settings"), dict):
            raise ArtifactError(f"{p} is not a decdec streaming journal (version "
                                f"{JOURNAL_VERSION}): cannot resume; delete {self.root} to start over")
        if j["settings"] != self.settings:
            diff = sorted(k for k in set(j["settings"]) | set(self.settings)
                          if j["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"{self.root} was started with other settings ({', '.join(diff)} "
                             f"differ): resume with the same checkpoint and options, or delete it "
                             f"to start over")
        for key in ("files", "blocks", "resid"):
            if isinstance(j.get(key), dict):
                self.journal[key] = j[key]

    def write_journal(self):
        atomic_write_text(self.journal_path, json.dumps(self.journal, indent=1) + "\n")

    def close(self):
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._lock_file.close()

    # ------------------------------------------------------------------ checked records
    def _ok(self, path: Path, rec) -> bool:
        return (isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
                and isinstance(rec.get("bytes"), int) and path.is_file()
                and path.stat().st_size == rec["bytes"] and artifacts._sha256(path) == rec["sha256"])

    def file_done(self, rel: str) -> bool:
        rec = self.journal["files"].get(rel)
        if rec is None:
            return False
        if self._ok(self.art / rel, rec):
            return True
        warnings.warn(f"{self.art / rel}: missing or fails its recorded sha256; redoing it",
                      stacklevel=3)
        return False

    def block_done(self, l: int, bits: int) -> bool | None:
        """True: finished and verified; None: never finished; False: journaled but failed its check."""
        rec = self.journal["blocks"].get(str(l))
        if rec is None:
            return None
        rel = artifacts.block_file(l)
        if (isinstance(rec, dict) and rec.get("file") == rel and rec.get("bits") == bits
                and isinstance(rec.get("alphas"), dict) and self._ok(self.art / rel, rec)):
            return True
        warnings.warn(f"{self.art / rel}: block {l} is journaled but its file is missing, changed "
                      f"or its journal entry is malformed; redoing block {l}", stacklevel=3)
        return False

    def record_file(self, rel: str):
        with self._mutex:
            self.journal["files"][rel] = artifacts.file_record(self.art / rel)
            self.write_journal()

    def record_block(self, l: int, bits: int, alphas: dict):
        rel = artifacts.block_file(l)
        with self._mutex:
            self.journal["blocks"][str(l)] = dict(artifacts.file_record(self.art / rel), file=rel,
                                                  bits=bits, alphas=alphas)
            self.write_journal()

    # ------------------------------------------------------------------ residual checkpoints
    def resid_path(self, l: int) -> Path:
        return self.root / f"resid_{l:03d}.npy"

    def save_resid(self, l: int, h: list):
        p = self.resid_path(l)
        tmp = p.with_name(p.name + ".tmp")
        artifacts.write_npy(tmp, np.stack(h))
        os.replace(tmp, p)
        with self._mutex:
            self.journal["resid"][str(l)] = artifacts.file_record(p)
            self.write_journal()

    def load_resid(self, l: int, shape: tuple):
        p = self.resid_path(l)
        rec = self.journal["resid"].get(str(l))
        if not self._ok(p, rec):
            return None
        try:
            a = artifacts._read_npy(p)
        except ArtifactError:
            return None
        if a.shape != shape or a.dtype != np.float32:
            return None
        return [np.ascontiguousarray(a[w]) for w in range(shape[0])]

    def drop_resid(self, l: int):
        with self._mutex:
            self.journal["resid"].pop(str(l), None)
            self.write_journal()
        try:
            os.remove(self.resid_path(l))
        except FileNotFoundError:
            pass


def _write_embeddings(ck, work: _Work, windows, need: set, progress: bool):
    """The files in `need` (embeddings.npy, lm_head.npy, norm.npy), the matrices converted row
    chunk by row chunk; returns the residual stream entering block 0 (the windows' embedding
    rows), gathered from the same chunks."""
    c = ck.config
    V, D = c.vocab_size, c.dim
    step = max(1, _EMB_CHUNK_ELEMS // D)
    need_emb = "embeddings.npy" in need
    h0 = [np.empty((len(w), D), np.float32) for w in windows]
    bar = _tqdm(total=V * (1 + ("lm_head.npy" in need)), unit="row",
                desc="stream: embeddings", disable=not progress)
    writer = artifacts.NpyRowWriter(work.art / "embeddings.npy", (V, D)) if need_emb else None
    try:
        if writer:
            writer.__enter__()
        for r0 in range(0, V, step):
            r1 = min(V, r0 + step)
            rows = ck.embedding_rows(r0, r1)
            if writer:
                writer.write(rows)
            for w, h in zip(windows, h0):
                sel = (w >= r0) & (w < r1)
                if sel.any():
                    h[sel] = rows[w[sel] - r0]
            bar.update(r1 - r0)
    except BaseException as e:
        if writer:
            writer.__exit__(type(e), e, None)
        bar.close()
        raise
    if writer:
        writer.__exit__(None, None, None)
        work.record_file("embeddings.npy")
    if "lm_head.npy" in need:
        with artifacts.NpyRowWriter(work.art / "lm_head.npy", (V, D)) as hw:
            for r0 in range(0, V, step):
                r1 = min(V, r0 + step)
                hw.write(ck.embedding_rows(r0, r1, head=True))
                bar.update(r1 - r0)
        work.record_file("lm_head.npy")
    bar.close()
    if "norm.npy" in need:
        artifacts.write_npy(work.art / "norm.npy", ck.norm())
        work.record_file("norm.npy")
    return h0


def stream_quantize(source, out_dir, bits=3, *, method: str = "awq", group_size: int = 128,
                    calib_tokens=None, n_windows: int = DEFAULT_CALIB_WINDOWS, resume: bool = False,
                    overwrite: bool = False, progress: bool = True, workers: int | None = None,
                    alpha_grid=_awq.DEFAULT_ALPHA_GRID, clip_grid=_awq.DEFAULT_CLIP_GRID,
                    on_block_done=None) -> StreamResult:
    """Quantize a checkpoint block by block into the artifact directory out_dir (artifacts.load
    reads it), equal to what pipeline.quantize_model + artifacts.save write for the same model,
    bits, method and calibration.  source: a Hugging Face safetensors directory (loaders.HFCheckpoint)
    or a llama GGUF file (loaders.GGUFCheckpoint: tensors dequantized one block at a time, the
    tokenizer from its metadata).

    bits: 3, 4 or a per-block list of 3s and 4s (3.5 is refused, see the module docstring).
    calib_tokens: token ids, a calibration text (str), or None for the shipped Emma text (both
    encoded with the checkpoint's tokenizer.json); the first n_windows windows of 512 are used.
    resume: continue an interrupted run of the same settings (see the module docstring).
    workers: blocks quantized at once (default min(2, CPUs)); each holds a block's float weights
    and Gram statistics (Llama-3-8B: ~4 GB), so memory grows with it.
    on_block_done(l): called after block l's file is journaled (a hook for progress or tests).
    Returns a StreamResult (path, seconds per stage, peak RSS, skipped / redone blocks).
    """
    from .loaders import GGUFCheckpoint, HFCheckpoint
    t_start = time.time()
    check_quantizer_args(method, group_size)
    src = Path(source).expanduser()
    if not src.is_dir() and not src.is_file():
        raise FileNotFoundError(f"checkpoint not found (a safetensors directory or a GGUF file): {src}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    ck = HFCheckpoint(src) if src.is_dir() else GGUFCheckpoint(src)
    config = ck.config
    n_layers = config.n_layers
    per_block = _per_block_bits(bits, n_layers)
    workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tok = ck.tokenizer()
    tokens = _calib_tokens(calib_tokens, tok, config.vocab_size)
    windows = calibration_windows(tokens, n_windows)
    settings = {"checkpoint": ck.fingerprint(), "bits_per_layer": per_block, "method": method,
                "group_size": group_size, "n_windows": n_windows, "context": CALIB_CONTEXT,
                "windows_sha256": _sha_array(np.stack(windows)),
                "text_tokens": int(tokens.size),
                "alpha_grid": [float(a) for a in alpha_grid] if method == "awq" else None,
                "clip_grid": [float(a) for a in clip_grid] if method == "awq" else None,
                "format_version": artifacts.FORMAT_VERSION}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = _Work(out_dir, settings, resume)
    seconds = {"embeddings": 0.0, "forward": 0.0, "quantize": 0.0, "thresholds": 0.0,
               "write": 0.0}
    sec_lock = threading.Lock()

    def add_time(stage, t0):
        with sec_lock:
            seconds[stage] += time.time() - t0

    T = CALIB_CONTEXT
    cos, sin = rope_tables(rope_inv_freq(config), max(T, 256))
    cos, sin = cos[:T], sin[:T]
    mask = attention_mask(config, 0, T)

    def run_block(l, layer, h, hook):
        linears = {(l, n): DenseLinear(layer[n]) for n in LINEAR_NAMES}
        return [block_forward(config, l, layer, linears, x, cos, sin, mask, hook) for x in h]

    def job(l, layer, stats_layer, h_in):
        t0 = time.time()
        blk = quantize_block(layer, config, per_block[l], group_size, method, stats_layer,
                             alpha_grid, clip_grid)
        add_time("quantize", t0)
        t0 = time.time()
        tc = ThresholdCollector({0: {l: blk.scales}})
        run_block(l, layer, h_in, tc)
        assign_thresholds(blk, l, tc.thresholds()[0])
        add_time("thresholds", t0)
        t0 = time.time()
        rel = artifacts.block_file(l)
        tmp = work.art / (rel + ".tmp")
        artifacts.write_block(tmp, blk)
        os.replace(tmp, work.art / rel)
        add_time("write", t0)
        return l, blk.scales.alphas

    skipped, redone = [], []
    try:
        status = [work.block_done(l, per_block[l]) for l in range(n_layers)]
        skipped = [l for l, s in enumerate(status) if s]
        redone = [l for l, s in enumerate(status) if s is False]
        todo = [l for l, s in enumerate(status) if not s]
        todo_set = set(todo)
        t0 = time.time()
        top_files = ["embeddings.npy"] + ([] if ck.head_tied else ["lm_head.npy"]) + ["norm.npy"]
        need = {r for r in top_files if not work.file_done(r)}
        h = None
        first = todo[0] if todo else n_layers
        if first < n_layers and first > 0:
            h = work.load_resid(first, (n_windows, T, config.dim))
        if need or (first < n_layers and h is None):
            h0 = _write_embeddings(ck, work, windows, need, progress)
            if h is None and first < n_layers:
                h, start = h0, 0
            else:
                start = first
        else:
            start = first
        add_time("embeddings", t0)

        fwd_bar = _tqdm(total=n_layers, initial=start, unit="block",
                        desc="stream: calibration forward", disable=not progress)
        q_bar = _tqdm(total=n_layers, initial=len(skipped), unit="block",
                      desc=f"stream: quantize {method.upper()} + thresholds", disable=not progress)
        pending = {}

        def collect(done_set):
            for fut in done_set:
                l = pending.pop(fut)
                l_done, alphas = fut.result()
                work.record_block(l_done, per_block[l_done], alphas)
                if l_done > 0:
                    work.drop_resid(l_done)
                q_bar.update(1)
                q_bar.set_postfix(rss=f"{current_rss_bytes() / 2**30:.2f}GiB", refresh=False)
                if on_block_done is not None:
                    on_block_done(l_done)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                for l in range(start, n_layers):
                    t0 = time.time()
                    layer = ck.layer(l)
                    if l not in todo_set:
                        h = run_block(l, layer, h, None)      # finished: only advance the stream
                    else:
                        hook = GramCollector() if method == "awq" else None
                        h_in = h
                        h = run_block(l, layer, h_in, hook)
                        stats_layer = (hook.stats(sum(len(w) for w in windows)).layer(l)
                                       if hook is not None else None)
                    if l + 1 < n_layers and (l + 1) in todo_set:
                        work.save_resid(l + 1, h)
                    add_time("forward", t0)
                    fwd_bar.update(1)
                    if l in todo_set:
                        while len(pending) >= workers:
                            done_set, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                            collect(done_set)
                        pending[pool.submit(job, l, layer, stats_layer, h_in)] = l
                        del h_in, stats_layer, hook
                    del layer
                    if todo and l >= todo[-1]:
                        break                                 # nothing left that needs the stream
                while pending:
                    done_set, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    collect(done_set)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        fwd_bar.close()
        q_bar.close()

        # ------------------------------------------------------------ manifest and commit
        t0 = time.time()
        tok_meta = artifacts.write_tokenizer(tok, work.art)
        records = [(rel, work.journal["files"][rel]) for rel in top_files]
        records += [(artifacts.block_file(l), work.journal["blocks"][str(l)]) for l in range(n_layers)]
        files = {rel: {"sha256": rec["sha256"], "bytes": rec["bytes"]} for rel, rec in records}
        if tok_meta is not None:
            files["tokenizer.json"] = artifacts.file_record(work.art / "tokenizer.json")
        for p in sorted(work.art.rglob("*")):   # e.g. a .tmp of a job a crash cut short
            if p.is_file() and p.relative_to(work.art).as_posix() not in files:
                p.unlink()
        for rel in list(files):      # the manifest lists what is there: check once more
            if not work._ok(work.art / rel, files[rel]):
                raise ArtifactError(f"{work.art / rel} changed during the run; rerun with resume=True")
        calibration = calibration_record(tokens, n_windows, method, alpha_grid, clip_grid)
        calibration["streamed"] = True
        calibration["seconds"] = round(time.time() - t_start, 1)
        alphas = [work.journal["blocks"][str(l)]["alphas"] for l in range(n_layers)]
        artifacts.write_manifest(work.art, config=config, method=method, group_size=group_size,
                                 bits_per_layer=per_block, tied=ck.head_tied, awq_alphas=alphas,
                                 calibration=calibration, tokenizer=tok_meta, files=files)
        artifacts.commit(work.art, out_dir)
        seconds["write"] += time.time() - t0
    finally:
        work.close()
    shutil.rmtree(work.root, ignore_errors=True)
    seconds["total"] = time.time() - t_start
    return StreamResult(out_dir, {k: round(v, 2) for k, v in seconds.items()}, peak_rss_bytes(),
                        skipped, redone)
