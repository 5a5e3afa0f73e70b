"""Supported versions, in one place: setup.py reads this file (without importing the package), the code checks
against it, and tests/test_versions.py checks that setup.py, requirements.txt and README.md agree with it."""

from __future__ import annotations

PYTHON_MIN = (3, 10)
TORCH_MIN = (2, 11)
TRITON_RANGE = ((3, 6), (3, 9))  # inclusive, major.minor
SENTENCE_TRANSFORMERS_SERIES = (6, 2)  # the drop-in modules mirror 6.2.x (and import its internals)


def major_minor(version: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; pre-release tags after the minor number are ignored."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        parts.append(int(digits or 0))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def as_text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))
