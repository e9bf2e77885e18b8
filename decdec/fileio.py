"""Atomic file writes shared by the result writers (sweep tables, benchmark and tuner JSON)."""
from __future__ import annotations

import os


def atomic_write_text(path, text: str) -> None:
    """Write text to path so that readers see the old file or the whole new one, never a part:
    write a temporary file beside it, fsync, then rename over."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
