"""Keyword matching for routing. Pure Python.

Keywords match as whole words or whole phrases (multi-word keywords match too, unlike the reference router's
substring test), case-insensitively, after Unicode normalisation. Single-word keywords of five letters or more
also match a word one typing slip away (`qurey`, `extrct`, `typscript`): real users' prompts carry typos.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from functools import lru_cache


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@lru_cache(maxsize=4096)
def _pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in normalise(phrase).split()]
    return re.compile(r"(?<![\w])" + r"\s+".join(words) + r"(?![\w])")


@lru_cache(maxsize=16384)
def _first_word(phrase: str) -> str:
    words = normalise(phrase).split()
    return words[0] if words else ""


class PhraseIndex:
    """Which phrases of each list (every expert's keywords) occur in a text as whole words. A plain substring test of
    a phrase's first word comes before its regex: most keywords are absent, and a hundred experts' keywords cost
    2,000 regex searches a decision (5 ms) without it. Each distinct first word and phrase is looked up once, where
    a hundred experts' lists repeat most of them (a decision's cost stays flat in their number)."""

    def __init__(self, lists: Iterable[Iterable[str]]):
        self._lists = [[(p, _first_word(p)) for p in phrases if p.strip()] for phrases in lists]
        self._first = {first for phrases in self._lists for _, first in phrases}

    def matches(self, text: str) -> list[list[str]]:
        """Per list, its phrases that occur in `text` (already normalised) as whole words, in list order."""
        present = {first for first in self._first if first in text}
        if not present:
            return [[] for _ in self._lists]
        candidates = {p for phrases in self._lists for p, first in phrases if first in present}
        found = {p for p in candidates if _pattern(p).search(text)}
        return [[p for p, _ in phrases if p in found] for phrases in self._lists]


# Shorter words have too many neighbours one slip away ("rows"/"rose"); a slip rarely hits the first letter.
FUZZY_MIN_LENGTH = 5
_WORD = re.compile(r"[^\W\d_]+")


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _transpositions(word: str) -> set[str]:
    return {word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1)}


class FuzzyIndex:
    """Single-word keywords of several owners, found in a text one slip away (a letter missing, extra, replaced,
    or two swapped). One index for all owners keeps a decision's cost flat in their number."""

    def __init__(self, keywords: Mapping[str, Iterable[str]]):
        self._variants: dict[str, set[tuple[str, str]]] = {}
        self._exact: dict[str, set[str]] = {}
        for owner, words in keywords.items():
            self._exact[owner] = {normalise(w) for w in words}
            for keyword in words:
                kw = normalise(keyword)
                if " " in kw or len(kw) < FUZZY_MIN_LENGTH or not kw.isalpha():
                    continue
                for variant in {kw} | _deletions(kw) | _transpositions(kw):
                    self._variants.setdefault(variant, set()).add((owner, kw))

    def hits(self, text: str) -> dict[str, list[str]]:
        """Per owner, `slip~keyword` for each keyword a word of `text` (normalised) misspells; a word that is one
        of the owner's keywords is left to `matches`."""
        found: dict[str, set[str]] = {}
        for word in set(_WORD.findall(text)):
            if len(word) < FUZZY_MIN_LENGTH - 1:
                continue
            for variant in {word} | _deletions(word):
                for owner, kw in self._variants.get(variant, ()):
                    if (
                        word not in self._exact[owner]
                        # an inflection of a keyword (`generics`, `parses`, `tablet`), not a slip
                        and not any(word.startswith(k) for k in self._exact[owner] if len(k) >= 4)
                        and kw[0] == word[0]
                        and abs(len(kw) - len(word)) <= 1
                    ):
                        found.setdefault(owner, set()).add(f"{word}~{kw}")
        return {owner: sorted(labels) for owner, labels in found.items()}
