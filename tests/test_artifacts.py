"""Artifacts: save/load round trip, atomic replacement, and clear refusal of corrupt directories."""
import json
import os

import numpy as np
import pytest

from decdec import artifacts, pipeline
from tiny_llama import byte_tokenizer, calib_tokens, tiny_weights


@pytest.fixture(scope="module")
def qm():
    return pipeline.quantize_model(tiny_weights(), calib_tokens(), 3.5, method="awq", n_windows=2,
                                   sensitivity_tokens=64, progress=False, tokenizer=byte_tokenizer(),
                                   alpha_grid=(0.0, 0.5), clip_grid=(1.0, 0.8))


@pytest.fixture()
def saved(qm, tmp_path):
    return artifacts.save(qm, tmp_path / "model")


def test_round_trip(qm, saved):
    back = artifacts.load(saved)
    assert back.bits_per_layer == qm.bits_per_layer and back.method == "awq" and back.group_size == 128
    assert back.config == qm.config
    np.testing.assert_array_equal(back.tok_embeddings, qm.tok_embeddings)
    np.testing.assert_array_equal(back.lm_head, qm.lm_head)
    for a, b in zip(qm.blocks, back.blocks):
        np.testing.assert_array_equal(a.attn_norm, b.attn_norm)
        np.testing.assert_array_equal(a.scales.down_in, b.scales.down_in)
        for name, ql in a.linears.items():
            ql2 = b.linears[name]
            for x, y in ((ql.qweight.qweight, ql2.qweight.qweight), (ql.qweight.scales, ql2.qweight.scales),
                         (ql.qweight.zeros, ql2.qweight.zeros), (ql.cheatsheet.codes, ql2.cheatsheet.codes),
                         (ql.cheatsheet.scales, ql2.cheatsheet.scales), (ql.thresholds, ql2.thresholds)):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
    tokens = np.arange(40) % 256
    for k in (0, 8):
        np.testing.assert_array_equal(pipeline.build_model(qm, k).forward(tokens),
                                      pipeline.build_model(back, k).forward(tokens))
    assert back.tokenizer.decode(back.tokenizer.encode("Emma Woodhouse")) == "Emma Woodhouse"
    assert back.tokenizer.bos_id == 256


def test_manifest_contents(saved):
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format"] == artifacts.FORMAT_NAME and m["format_version"] == artifacts.FORMAT_VERSION
    assert set(m["files"]) == {p.relative_to(saved).as_posix() for p in saved.rglob("*")
                               if p.is_file() and p.name != "manifest.json"}
    assert m["calibration"]["n_windows"] == 2 and len(m["calibration"]["sensitivity_kl"]) == 4


def test_save_is_atomic_and_refuses_to_clobber(qm, saved):
    with pytest.raises(FileExistsError):
        artifacts.save(qm, saved)
    artifacts.save(qm, saved, overwrite=True)
    artifacts.load(saved)
    leftovers = [p.name for p in saved.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_failed_save_leaves_nothing(qm, tmp_path, monkeypatch):
    target = tmp_path / "m"

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(artifacts, "_sha256", boom)
    with pytest.raises(OSError, match="disk full"):
        artifacts.save(qm, target)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_manifest(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(artifacts.ArtifactError, match="not valid JSON"):
        artifacts.load(saved)


def test_missing_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(artifacts.ArtifactError, match="manifest.json is missing"):
        artifacts.load(tmp_path / "x")
    with pytest.raises(artifacts.ArtifactError, match="not a directory"):
        artifacts.load(tmp_path / "nope")


def test_wrong_version(saved):
    m = json.loads((saved / "manifest.json").read_text())
    m["format_version"] = 99
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(artifacts.ArtifactError, match="format_version 99"):
        artifacts.load(saved)


def test_truncated_file(saved):
    p = saved / "blocks" / "block_001.npz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(artifacts.ArtifactError, match="block_001.npz has .* bytes.*truncated"):
        artifacts.load(saved)


def test_flipped_byte(saved):
    p = saved / "embeddings.npy"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(artifacts.ArtifactError, match="embeddings.npy fails its sha256"):
        artifacts.load(saved)


def test_missing_file(saved):
    os.remove(saved / "norm.npy")
    with pytest.raises(artifacts.ArtifactError, match="norm.npy is missing"):
        artifacts.load(saved)


def test_config_mismatch_is_caught_even_without_checksums(saved):
    """A manifest whose config disagrees with the arrays (e.g. edited by hand) is refused."""
    m = json.loads((saved / "manifest.json").read_text())
    m["config"]["ffn_dim"] = 192
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(artifacts.ArtifactError, match="expected"):
        artifacts.load(saved, check=False)
