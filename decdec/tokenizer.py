"""Byte-level BPE tokenizers built with PyPI `tokenizers`, from GGUF metadata or tokenizer.json.

A GGUF file stores the vocabulary, merges and token types but not the pre-tokenizer itself: only its
name (`tokenizer.ggml.pre`). We rebuild the pre-tokenizer llama.cpp uses for that name. For SmolLM2
("smollm") every digit is split off on its own before the GPT-2 regex runs; transformers' GGUF
conversion omits that step, so the two disagree on text with multi-digit numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

# llama.cpp's token types (llama_token_type / gguf.TokenType).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6

# The regexes llama.cpp applies for a given `tokenizer.ggml.pre` (src/llama-vocab.cpp).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str):
    """The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name; ValueError for unknown names."""
    if pre == "smollm":
        # llama.cpp: "\\p{N}" then the GPT-2 regex. Digits(individual) reproduces the first split.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("gpt2", "default", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        regex = _LLAMA3_REGEX
    elif pre in ("qwen2",):
        regex = _QWEN2_REGEX
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (known: smollm, gpt2, llama-bpe, "
                         f"qwen2); load the model's tokenizer.json (Tokenizer.from_dir) instead")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    """Text <-> token ids. encode() returns an int64 NumPy array; decode() takes any ints."""

    def __init__(self, backend: _HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None,
                 eos_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        # Generation stops on any of these (instruct models often end turns with a second token).
        stops = {i for i in (eos_id, *eos_ids) if i is not None}
        self.stop_ids = frozenset(stops)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """Build from GGUF tokenizer metadata (a dict of plain Python values keyed by GGUF name)."""
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE "
                             f"('gpt2') is supported; SentencePiece ('llama') is not")
        tokens = fields.get("tokenizer.ggml.tokens")
        merges = fields.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        token_types = fields.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"GGUF tokenizer has {len(tokens)} tokens but "
                             f"{len(token_types)} token types")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF tokenizer vocabulary has duplicate tokens")
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed GGUF merge {m!r}")
            pairs.append((left, right))
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                          ignore_merges=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt2"))
        backend.decoder = decoders.ByteLevel()
        # Control and user-defined tokens are matched whole before BPE (as llama.cpp does), so
        # "<|im_start|>" in a chat prompt becomes one id instead of 7 pieces.
        specials = [AddedToken(tokens[i], special=(t == TOKEN_TYPE_CONTROL), normalized=False)
                    for i, t in enumerate(token_types)
                    if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
        if specials:
            backend.add_special_tokens([s for s in specials if s.special])
            backend.add_tokens([s for s in specials if not s.special])
        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eot = fields.get("tokenizer.ggml.eot_token_id")
        return cls(backend, bos_id=bos, eos_id=eos,
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"),
                   eos_ids=[eot] if eot is not None else [])

    @classmethod
    def from_dir(cls, directory: str | Path, *, bos_id: int | None = None,
                 eos_id: int | list | None = None) -> "Tokenizer":
        """Build from a Hugging Face model directory (tokenizer.json [+ tokenizer_config.json]).

        bos_id / eos_id from config.json take precedence over tokenizer_config.json's tokens.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: decdec needs a (fast) tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- `tokenizers` raises plain Exception
            raise ValueError(f"{path} cannot be read as a tokenizers tokenizer.json: {e}") from e
        cfg_path = directory / "tokenizer_config.json"
        tcfg = {}
        if cfg_path.is_file():
            try:
                tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
            if not isinstance(tcfg, dict):
                raise ValueError(f"{cfg_path} must hold a JSON object")
        vocab_n = backend.get_vocab_size(with_added_tokens=True)
        for value in ([bos_id] + (list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id])):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < vocab_n):
                raise ValueError(f"{path}: bos/eos token id {value!r:.40} is not a token id in "
                                 f"[0, {vocab_n})")

        def token_id(entry):
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        extra_eos = []
        if isinstance(eos_id, (list, tuple)):
            extra_eos = list(eos_id[1:])
            eos_id = eos_id[0] if eos_id else None
        if bos_id is None:
            bos_id = token_id(tcfg.get("bos_token"))
        if eos_id is None:
            eos_id = token_id(tcfg.get("eos_token"))
        else:
            tok_eos = token_id(tcfg.get("eos_token"))
            if tok_eos is not None:
                extra_eos.append(tok_eos)
        # tokenizer.json's own post-processor (e.g. Llama-3's TemplateProcessing) may add BOS;
        # encode() leaves special tokens to us, so record whether the model expects one.
        add_bos = bool(tcfg.get("add_bos_token", False))
        if not add_bos and bos_id is not None:
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == bos_id
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                   chat_template=tcfg.get("chat_template") if isinstance(
                       tcfg.get("chat_template"), str) else None,
                   eos_ids=extra_eos)

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> np.ndarray:
        """Token ids of text (control tokens written in the text are recognised as such).

        add_bos defaults to the model's own setting (False for SmolLM2).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise ValueError("add_bos requested but the tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(int(idx))

    def format_chat(self, user_message: str, system: str | None = None) -> str:
        """One user turn in ChatML (the format of SmolLM2 and Qwen2), ready for the assistant.

        Only ChatML is built in (no Jinja dependency); other templates raise ValueError.
        """
        if self.token_to_id("<|im_start|>") is None or self.token_to_id("<|im_end|>") is None:
            raise ValueError("this tokenizer has no ChatML tokens; pass the prompt as plain text")
        if system is None and self.chat_template:
            # SmolLM2's template inserts a default system turn when none is given.
            m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", self.chat_template, re.S)
            system = m.group(1) if m else None
        text = ""
        if system:
            text += f"<|im_start|>system\n{system}<|im_end|>\n"
        text += f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"
        return text
