"""Public-domain texts shipped for calibration and evaluation (see SOURCE.md)."""
from __future__ import annotations

from pathlib import Path

TEXTS = {"emma": "emma.txt", "persuasion": "persuasion.txt",
         "pride_and_prejudice": "pride_and_prejudice.txt"}
CALIBRATION = "emma"
DEVELOPMENT = "persuasion"
REPORTED = "pride_and_prejudice"


def path(name: str) -> Path:
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; shipped texts: {sorted(TEXTS)}")
    return Path(__file__).with_name(TEXTS[name])


def text(name: str) -> str:
    return path(name).read_text(encoding="utf-8")
