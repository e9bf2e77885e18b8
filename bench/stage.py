"""Stage a directory bigger than one device call may carry (64 MiB) over consecutive calls.

  python bench/stage.py split DIR --out .stage [--part-mb 56]     (here)
      .stage/<name>.partNN files + .stage/<name>.manifest.json (sha256 of every part and of the
      whole tar).  Carry one part per call (with the manifest), e.g. carry=[".stage/x.part00",
      ".stage/x.manifest.json"].
  python bench/stage.py put .stage --stash /root/stash          (device, every call)
      copies the carried parts into the stash after checking their sha256.
  python bench/stage.py join NAME --stash /root/stash --dest D  (device, once all parts are in)
      checks every part and the whole, then unpacks into D (atomically: D.tmp then rename).
The stash survives between calls only while the machine stays warm.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _embeddings_from_gguf(gguf_path):
    """(raw quantized bytes, ggml type) of token_embd.weight: an artifact's embeddings.npy is its
    dequantization (decdec.loaders.load_gguf), 4x smaller to carry than the float32 array."""
    import gguf
    r = gguf.GGUFReader(str(gguf_path))
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    return np.ascontiguousarray(t.data), int(t.tensor_type)


def split(args):
    src = Path(args.dir)
    name = args.name or src.name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        if args.gguf_embeddings:
            # everything but embeddings.npy, which join() rebuilds from the GGUF's raw tensor and
            # checks against the artifact manifest's sha256 (bit-identical or refused)
            t.add(src, arcname=name, filter=lambda ti: None if ti.name == f"{name}/embeddings.npy" else ti)
            raw, qtype = _embeddings_from_gguf(args.gguf_embeddings)
            b = io.BytesIO()
            np.savez(b, raw=raw, qtype=np.int64(qtype))
            ti = tarfile.TarInfo(f"{name}/.embeddings.gguf.npz")
            ti.size = len(b.getvalue())
            t.addfile(ti, io.BytesIO(b.getvalue()))
        else:
            t.add(src, arcname=name)
    # xz level 1: the 4-bit residual codes and packed weights shrink ~10%, enough to save a part
    data = lzma.compress(buf.getvalue(), preset=1)
    size = int(args.part_mb * 2**20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), size):
        p = out / f"{name}.part{i // size:02d}"
        p.write_bytes(data[i:i + size])
        parts.append({"file": p.name, "sha256": _sha(data[i:i + size]), "bytes": len(data[i:i + size])})
    man = {"name": name, "sha256": _sha(data), "bytes": len(data), "parts": parts}
    (out / f"{name}.manifest.json").write_text(json.dumps(man, indent=1))
    print(f"{name}: {len(data) / 2**20:.1f} MiB in {len(parts)} parts under {out}")


def put(args):
    stash = Path(args.stash)
    stash.mkdir(parents=True, exist_ok=True)
    for man_path in Path(args.dir).glob("*.manifest.json"):
        man = json.loads(man_path.read_text())
        shutil.copy(man_path, stash / man_path.name)
        for part in man["parts"]:
            p = Path(args.dir) / part["file"]
            if p.exists():
                b = p.read_bytes()
                if _sha(b) != part["sha256"]:
                    sys.exit(f"stage put: {p} does not match its manifest (sha256)")
                (stash / part["file"]).write_bytes(b)
                print(f"stashed {part['file']}")
        have = [(stash / q["file"]).exists() for q in man["parts"]]
        print(f"{man['name']}: {sum(have)} of {len(have)} parts in {stash}")


def join(args):
    stash = Path(args.stash)
    man = json.loads((stash / f"{args.name}.manifest.json").read_text())
    chunks = []
    for part in man["parts"]:
        p = stash / part["file"]
        if not p.exists():
            sys.exit(f"stage join: {p} missing (the machine went cold? carry it again)")
        b = p.read_bytes()
        if _sha(b) != part["sha256"]:
            sys.exit(f"stage join: {p} is corrupt (sha256)")
        chunks.append(b)
    data = b"".join(chunks)
    if _sha(data) != man["sha256"]:
        sys.exit("stage join: the joined tar does not match the manifest")
    dest = Path(args.dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data)), mode="r") as t:
        t.extractall(tmp, filter="data")
    for emb in tmp.glob("*/.embeddings.gguf.npz"):
        import gguf
        z = np.load(emb)
        arr = np.asarray(gguf.quants.dequantize(z["raw"], gguf.GGMLQuantizationType(int(z["qtype"]))),
                         dtype=np.float32)
        out = emb.parent / "embeddings.npy"
        with open(out, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        emb.unlink()
        want = json.loads((emb.parent / "manifest.json").read_text())["files"]["embeddings.npy"]["sha256"]
        if hashlib.sha256(out.read_bytes()).hexdigest() != want:
            sys.exit("stage join: embeddings rebuilt from the GGUF differ from the artifact's")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"joined {args.name} into {dest}/{man['name']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split"); s.add_argument("dir"); s.add_argument("--out", default=".stage")
    s.add_argument("--name", default=None); s.add_argument("--part-mb", type=float, default=56)
    s.add_argument("--gguf-embeddings", default=None,
                   help="carry embeddings.npy as the GGUF's raw token_embd tensor (rebuilt on join)")
    s = sub.add_parser("put"); s.add_argument("dir", nargs="?", default=".stage")
    s.add_argument("--stash", default="/root/stash")
    s = sub.add_parser("join"); s.add_argument("name"); s.add_argument("--stash", default="/root/stash")
    s.add_argument("--dest", required=True)
    args = p.parse_args(argv)
    {"split": split, "put": put, "join": join}[args.cmd](args)


if __name__ == "__main__":
    main()
