"""Shared fixtures. The real model is fetched once per session (cached under $DECDEC_CACHE or
~/.cache/decdec) and loaded once; tests that need it skip cleanly when it cannot be downloaded."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF; skips if it cannot be fetched."""
    from decdec.fetch import FetchError, fetch_smollm2

    try:
        return fetch_smollm2()
    except (FetchError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF unavailable (offline?): {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(LlamaWeights, Tokenizer) of SmolLM2, dequantized once per session (~4 s, ~0.6 GB).

    Treat the arrays as read-only: they are shared by every test in the session.
    """
    from decdec.loaders import load_gguf

    return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    """A LlamaModel over SmolLM2's reference (dequantized) weights with DenseLinear layers."""
    from decdec.model import LlamaModel

    return LlamaModel(smollm2[0])
