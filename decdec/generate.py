"""Text generation on the CPU: prefill the prompt once, then decode one token at a time.

Decoding one token at a time is also what DecDEC targets: each decode step's linear layers see a
single activation row, which a DecLinear compensates with that row's own channel selection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .model import LlamaModel
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int                  # one-token forward passes after the prefill
    stopped_by: str                    # 'eos' | 'max_new_tokens'

    @property
    def prefill_tokens_per_second(self) -> float:
        if self.prefill_seconds <= 0:
            return float("inf")
        return self.prompt_tokens / self.prefill_seconds

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: one-token forward passes (with sampling) per second of decoding.

        The first new token comes out of the prefill pass, so it is not counted here.
        """
        if self.decode_steps <= 0 or self.decode_seconds <= 0:
            return float("nan")
        return self.decode_steps / self.decode_seconds

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "decode_steps": self.decode_steps,
                "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "tokens_per_second": self.tokens_per_second, "stopped_by": self.stopped_by}


def sample_next(logits: np.ndarray, temperature: float, top_p: float,
                rng: np.random.Generator) -> int:
    """Greedy when temperature == 0, else nucleus (top-p) sampling from softmax(logits / T)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep = int(np.searchsorted(np.cumsum(sorted_probs), top_p) + 1)
    keep = min(max(keep, 1), order.size)
    kept = sorted_probs[:keep] / sorted_probs[:keep].sum()
    return int(order[rng.choice(keep, p=kept)])


def generate(model: LlamaModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_p: float = 0.9, seed: int | None = 0,
             chat: bool = False, system: str | None = None,
             on_token: Callable[[str], None] | None = None):
    """Continue prompt; return (generated text, GenerationStats).

    temperature 0 is greedy; otherwise top-p sampling with numpy's Generator(seed), so a fixed seed
    reproduces the text. chat=True wraps the prompt in the model's ChatML turn format.
    on_token receives each new piece of text as it is decoded (for streaming output).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    text = tokenizer.format_chat(prompt, system) if chat else prompt
    ids = tokenizer.encode(text)
    if ids.size == 0:
        if tokenizer.bos_id is None:
            raise ValueError("empty prompt and no BOS token to start from")
        ids = np.asarray([tokenizer.bos_id], dtype=np.int64)
    budget = model.config.max_seq_len
    if ids.size >= budget:
        raise ValueError(f"prompt has {ids.size} tokens; the model's context is {budget}")
    max_new_tokens = min(max_new_tokens, budget - ids.size)
    rng = np.random.default_rng(seed)

    cache = model.new_cache(ids.size + max_new_tokens)
    t0 = time.perf_counter()
    logits = model.forward(ids, cache=cache)[-1]
    t1 = time.perf_counter()
    new_ids: list[int] = []
    emitted = ""
    stopped_by = "max_new_tokens"
    decode_steps = 0
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, rng)
        if token in tokenizer.stop_ids:
            stopped_by = "eos"
            break
        new_ids.append(token)
        if on_token is not None:
            # Decode the whole tail each time: a multi-byte character may span several tokens.
            full = tokenizer.decode(new_ids, skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                on_token(full[len(emitted):])
                emitted = full
        if step + 1 < max_new_tokens:
            logits = model.forward(np.asarray([token]), cache=cache)[-1]
            decode_steps += 1
    t2 = time.perf_counter()
    out = tokenizer.decode(new_ids, skip_special_tokens=True)
    if on_token is not None and len(out) > len(emitted):
        on_token(out[len(emitted):])
    stats = GenerationStats(prompt_tokens=int(ids.size), new_tokens=len(new_ids),
                            prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                            decode_steps=decode_steps,
                            stopped_by=stopped_by)
    return out, stats
