"""Artifacts: save/load round trip, atomic replacement, and clear refusal of corrupt directories."""
import json
import os

import numpy as np
import pytest

from decdec import artifacts, pipeline
from tiny_llama import assert_same_quantized, byte_tokenizer, calib_tokens, tiny_weights


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
    assert_same_quantized(qm, back)
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


# ---------------------------------------------------------------- lying and corrupt artifacts
# A "lying" artifact has its manifest checksums recomputed after the damage, so that the damage
# reaches the array checks (as with check=False, or a hand-edited directory). Each test failed
# before: BadZipFile, MemoryError/NumPy messages, TypeError/RecursionError, or silent acceptance.

def _relist(d):
    from decdec.artifacts import _sha256
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {p.relative_to(d).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                  for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(d, **edits):
    m = json.loads((d / "manifest.json").read_text())
    m.update(edits)
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_npz(path, fn):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("check", [True, False])
def test_truncated_npz_with_a_lying_manifest(saved, check):
    p = saved / "blocks" / "block_000.npz"
    p.write_bytes(p.read_bytes()[:1000])
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"block_000.npz is not a readable .npz"):
        artifacts.load(saved, check=check)


def test_npy_header_lying_about_its_shape(saved):
    p = saved / "norm.npy"
    raw = p.read_bytes()
    end = raw.index(b"\n") + 1
    head = raw[:end].decode("latin1").replace("(96,)", "(1099511627776,)")
    head = head[:-1].ljust(end - 1) + "\n"        # keep the header length
    p.write_bytes(head.encode("latin1")[:end] + raw[end:])
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"norm.npy: its header says float32"
                                                      r"\[1099511627776\].*truncated or corrupt"):
        artifacts.load(saved)


def test_object_arrays_are_refused(saved):
    np.save(saved / "norm.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"norm.npy holds dtype object"):
        artifacts.load(saved)


@pytest.mark.parametrize("key", ["wq.thresholds", "w_down.scales", "attn_norm", "scale.o_in"])
def test_non_finite_arrays_are_refused(saved, key):
    def poison(a):
        x = a[key].copy()
        x.reshape(-1)[0] = np.nan
        a[key] = x
    _edit_npz(saved / "blocks" / "block_001.npz", poison)
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=rf"block_001.npz: {key} holds NaN or Inf"):
        artifacts.load(saved)


def test_non_finite_embeddings_are_refused(saved):
    e = np.load(saved / "embeddings.npy")
    e[3, 3] = np.inf
    np.save(saved / "embeddings.npy", e)
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"embeddings.npy holds NaN or Inf"):
        artifacts.load(saved)


def test_increasing_thresholds_are_refused_at_load(saved):
    def flip(a):
        a["w_up.thresholds"] = a["w_up.thresholds"][::-1].copy()
    _edit_npz(saved / "blocks" / "block_000.npz", flip)
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"w_up.thresholds must be >= 0 and "
                                                      r"non-increasing"):
        artifacts.load(saved)


def test_unexpected_bias_arrays_are_refused(saved):
    def add(a):
        a["bias.bq"] = np.zeros(3, np.float32)
    _edit_npz(saved / "blocks" / "block_000.npz", add)
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match=r"unexpected arrays \['bias.bq'\]"):
        artifacts.load(saved)


@pytest.mark.parametrize("edit, match", [
    ({"group_size": None}, "'group_size' must be an int"),
    ({"group_size": "128"}, "'group_size' must be an int"),
    ({"bits_per_layer": "3434"}, "'bits_per_layer' must be a list"),
    ({"files": ["embeddings.npy"]}, "'files' must map paths"),
    ({"files": {"embeddings.npy": 5}}, "'files' must map paths"),
    ({"awq_alphas": 5}, "'awq_alphas' must be a list"),
    ({"tokenizer": {"bos_id": "x"}}, "bos_id/eos_id must be token ids"),
    ({"tokenizer": {"eos_ids": 5.5}}, "eos_ids must be a list"),
    ({"method": "gptq"}, "'method' must be 'rtn' or 'awq'"),
    ({"tied_embeddings": "yes"}, "'tied_embeddings' must be a bool"),
])
def test_manifest_field_types(saved, edit, match):
    _edit_manifest(saved, **edit)
    with pytest.raises(artifacts.ArtifactError, match=match):
        artifacts.load(saved, check=False)


@pytest.mark.parametrize("key, value", [("rope_theta", float("inf")), ("bos_id", 10**6),
                                        ("tie_embeddings", "no"), ("dim", 2**40)])
def test_manifest_config_values(saved, key, value):
    m = json.loads((saved / "manifest.json").read_text())
    m["config"][key] = value
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(artifacts.ArtifactError, match=rf"bad config \({key}"):
        artifacts.load(saved, check=False)


def test_deeply_nested_manifest(saved):
    (saved / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(artifacts.ArtifactError, match="not valid JSON"):
        artifacts.load(saved)


def test_symlink_out_of_the_artifact_is_refused(saved, tmp_path):
    outside = tmp_path / "outside.npy"
    np.save(outside, np.ones(96, np.float32))
    os.remove(saved / "norm.npy")
    os.symlink(outside, saved / "norm.npy")
    _relist(saved)
    with pytest.raises(artifacts.ArtifactError, match="outside the artifact"):
        artifacts.load(saved, check=False)
