"""Keyword matching for routing. Pure Python.

Keywords match as whole words or whole phrases (multi-word keywords match too, unlike the reference router's
substring test), case-insensitively, after Unicode normalisation.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@lru_cache(maxsize=4096)
def _pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in normalise(phrase).split()]
    return re.compile(r"(?<![\w])" + r"\s+".join(words) + r"(?![\w])")


def matches(text: str, phrases: list[str]) -> list[str]:
    """The phrases that occur in `text` as whole words (text already normalised)."""
    return [p for p in phrases if p.strip() and _pattern(p).search(text)]
