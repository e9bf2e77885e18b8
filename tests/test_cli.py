"""CLI: argument parsing, eval / generate on a saved artifact, clear errors, bench dispatch."""
import sys
import types

import numpy as np
import pytest

from decdec import artifacts, cli, pipeline
from decdec.evaluate import EvalConfig, PerplexityProtocol, evaluate
from tiny_llama import byte_tokenizer, calib_tokens, tiny_weights


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    qm = pipeline.quantize_model(tiny_weights(), calib_tokens(), 3, method="rtn", n_windows=2,
                                 progress=False, tokenizer=byte_tokenizer())
    return artifacts.save(qm, tmp_path_factory.mktemp("cli") / "tiny3")


def test_eval_prints_the_library_numbers(artifact, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 3)
    rc = cli.main(["eval", str(text), "--artifact", str(artifact), "--k-chunk", "8",
                   "--tokens", "200", "--context", "64"])
    assert rc == 0
    out = capsys.readouterr().out
    qm = artifacts.load(artifact)
    tokens = qm.tokenizer.encode(text.read_text())
    want = evaluate(pipeline.build_model(qm, 0),
                    [EvalConfig("x", pipeline.build_model(qm, 8, "bucket"), 8, "bucket")], tokens,
                    PerplexityProtocol(64, 63, 200), progress=False)[0]
    assert f"perplexity {want['perplexity']:9.3f}" in out
    assert "200 tokens" in out
    base = evaluate(pipeline.build_model(qm, 0), [EvalConfig("x", pipeline.build_model(qm, 0), 0)], tokens,
                    PerplexityProtocol(64, 63, 200), progress=False)[0]
    lines = out.splitlines()
    assert any("k_chunk 0 " in ln and f"perplexity {base['perplexity']:9.3f}" in ln for ln in lines)


def test_generate_from_artifact(artifact, capsys):
    """Greedy generation prints exactly the tokens an independent greedy loop picks: full forward
    passes over the whole sequence (no KV cache), argmax, stop at EOS, at the CLI's defaults
    (k_chunk 8, bucket selection)."""
    rc = cli.main(["generate", "Hello", "--artifact", str(artifact), "--max-new-tokens", "6",
                   "--greedy", "--raw"])
    assert rc == 0
    captured = capsys.readouterr()
    qm = artifacts.load(artifact)
    tok = qm.tokenizer
    model = pipeline.build_model(qm, 8, "bucket")
    ids, new = [int(i) for i in tok.encode("Hello")], []
    for _ in range(6):
        nxt = int(np.argmax(model.forward(np.asarray(ids + new))[-1]))
        if nxt in tok.stop_ids:
            break
        new.append(nxt)
    assert captured.out == tok.decode(new, skip_special_tokens=True) + "\n"
    stopped = "max_new_tokens" if len(new) == 6 else "eos"
    assert f"[{len(new)} tokens, prefill " in captured.err and f"stopped by {stopped}]" in captured.err


def test_missing_artifact_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["eval", "persuasion", "--artifact", str(tmp_path / "none")])
    assert rc == 2
    assert "not a directory" in capsys.readouterr().err


def test_missing_text_file(artifact):
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["eval", "/no/such/file.txt", "--artifact", str(artifact)])


def test_bad_bits_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--bits", "2", "--out", "x"])
    assert "bits must be 3, 3.5 or 4" in capsys.readouterr().err


def test_bench_dispatches_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("decdec.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "decdec.bench", fake)
    import decdec
    monkeypatch.setattr(decdec, "bench", fake, raising=False)
    assert cli.main(["bench", "--layers", "x"]) == 0
    assert seen["argv"] == ["--layers", "x"]


def test_parser_commands_and_their_handlers():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == {"fetch", "quantize", "eval", "generate", "demo", "bench", "tune"}
    cases = {("fetch",): cli.cmd_fetch, ("quantize", "--out", "x"): cli.cmd_quantize,
             ("eval", "t.txt", "--artifact", "a"): cli.cmd_eval, ("generate", "hi"): cli.cmd_generate,
             ("demo",): cli.cmd_demo}
    for argv, func in cases.items():
        assert p.parse_args(list(argv)).func is func, argv
    a = p.parse_args(["quantize", "--bits", "3.5", "--out", "x", "--method", "rtn"])
    assert (a.bits, a.method, a.group_size, a.out) == (3.5, "rtn", 128, "x")
    a = p.parse_args(["eval", "t.txt", "--artifact", "a"])
    assert (a.k_chunk, a.selection, a.tokens, a.context, a.stride) == (8, "bucket", 2044, 512, None)


def test_shipped_texts():
    from decdec import data
    assert data.text("emma").startswith("EMMA") and len(data.text("emma")) == 883_028
    with pytest.raises(ValueError, match="unknown text"):
        data.path("ulysses")


def test_eval_refuses_binary_and_non_utf8_text_and_warns_on_short_text(artifact, tmp_path, capsys):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit, match="looks binary"):
        cli.main(["eval", str(binary), "--artifact", str(artifact)])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Elinor Dashwood \u00e9tait l\u00e0".encode("latin-1"))
    with pytest.raises(SystemExit, match="is not UTF-8 text .*iconv"):
        cli.main(["eval", str(latin), "--artifact", str(artifact)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit, match="holds no text"):
        cli.main(["eval", str(empty), "--artifact", str(artifact)])
    short = tmp_path / "short.txt"
    short.write_text("Two words.")
    assert cli.main(["eval", str(short), "--artifact", str(artifact), "--tokens", "200", "--context", "64"]) == 0
    err = capsys.readouterr().err
    n = len(artifacts.load(artifact).tokenizer.encode("Two words."))
    assert f"the text has {n} tokens, fewer than the 200 asked" in err
    assert "fewer than two windows of 63" in err
