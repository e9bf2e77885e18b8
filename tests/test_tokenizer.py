"""The SmolLM2 tokenizer built from GGUF metadata: round trips, special tokens, and agreement with
transformers' own GGUF tokenizer conversion.

transformers' conversion (GGUFGPTConverter) gives a plain ByteLevel pre-tokenizer: it drops
SmolLM2's digit split (tokenizer.ggml.pre = "smollm"; llama.cpp and SmolLM2's tokenizer.json split
every digit off before the GPT-2 regex). SmolLM2's vocabulary has no multi-digit tokens and no
merges involving digits, so the two agree on most text with numbers; they differ where a run of
spaces precedes a digit: the digit split leaves the spaces as one pre-token ("ĠĠ", one merged
token), while the GPT-2 regex alone attaches the last space to the number ("Ġ" + "Ġ" + digits).
"""

import numpy as np
import pytest

from decdec.tokenizer import Tokenizer

SAMPLES = [
    "Hello world, it's me.",
    "In 1813, Jane Austen published Pride and Prejudice; it sold 1,500 copies at 18s.",
    "Prices: $3.99, 12.5%, 2024-11-25T17:00, pi = 3.14159265358979, x^2 + 1 = 0.",
    "Unicode: café, naïve, Ünïcödé, 日本語のテキスト, emoji 🙂🚀, tabs\tand\nnewlines\n\n",
    "   leading spaces and trailing spaces   ",
    "def f(x):\n    return x * 42  # comment\n",
]
# Text where the digit split matters (a run of spaces before a number).
DIGIT_SPLIT_SAMPLES = ["Page  42 of 100", "x  12 and\n\n2024", "col1    col2\n   7   8"]


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.mark.parametrize("text", SAMPLES + DIGIT_SPLIT_SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert tok.decode(ids) == text


def test_special_tokens_and_ids(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2) and 2 in tok.stop_ids
    assert not tok.add_bos                      # SmolLM2: tokenizer.ggml.add_bos_token = false
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").tolist()[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").tolist()[-1] == 2
    assert tok.encode("<|endoftext|>").tolist() == [0]
    assert tok.encode("hi", add_bos=True).tolist()[0] == 1
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    # Digits are single tokens.
    pieces = [tok.id_to_token(i) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


def test_chat_format(tok):
    text = tok.format_chat("What is 2+2?")
    # SmolLM2's template supplies a default system turn.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    custom = tok.format_chat("hi", system="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                      gguf_file=smollm2_path.name)


@pytest.mark.parametrize("text", SAMPLES + ["<|im_start|>user\nhi 123<|im_end|>\n"])
def test_matches_transformers_where_its_conversion_is_valid(tok, hf_gguf_tokenizer, text):
    expect = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text).tolist() == expect


@pytest.mark.parametrize("text", DIGIT_SPLIT_SAMPLES)
def test_digit_split_differs_from_transformers_gguf_conversion(tok, hf_gguf_tokenizer, text):
    """transformers' conversion lacks the digit split; restoring it (Digits then ByteLevel, the
    pre-tokenizer in SmolLM2's tokenizer.json) makes it agree with ours on the same text."""
    from tokenizers import pre_tokenizers

    ours = tok.encode(text).tolist()
    theirs = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours != theirs
    backend = hf_gguf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    try:
        assert backend.encode(text, add_special_tokens=False).ids == ours
    finally:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def test_from_dir_tokenizer_json(tok, tmp_path):
    """An HF directory's tokenizer.json (+ tokenizer_config.json) gives the same tokenizer."""
    import json

    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": tok.chat_template}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.add_bos) == (1, 2, False)
    for text in SAMPLES + DIGIT_SPLIT_SAMPLES:
        assert loaded.encode(text).tolist() == tok.encode(text).tolist()
    # config.json's ids (a list of EOS ids, as Llama-3 writes) take precedence.
    loaded = Tokenizer.from_dir(tmp_path, bos_id=0, eos_id=[0, 2])
    assert loaded.bos_id == 0 and loaded.eos_id == 0 and loaded.stop_ids == {0, 2}
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unsupported_gguf_tokenizers_are_refused():
    base = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2",
                                    "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="malformed GGUF merge"):
        Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2",
                                    "tokenizer.ggml.merges": ["ab"]})
    small = Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2"})
    assert small.encode("ab").tolist() == [2]
