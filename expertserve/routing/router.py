"""The router: scores every registered expert for a request and returns an expert or the base model, with a
confidence and each candidate's score.

Signals, per expert, from its manifest and data (nothing is trained globally, so an expert takes part as soon
as it is registered):
- semantic: cosine similarity between the request and the expert's profile (routing.examples, its description,
  and user prompts sampled from its training split), averaged over the best few profile texts;
- keywords: whole-word / phrase matches of routing.keywords and capabilities (a long keyword also one typing
  slip away), and a language the prompt names that the expert's profile names (a small bonus each);
- format: the prompt asks for its answer in a format the expert declares (`format:json` and "... into JSON");
- exclude_keywords: a match rules the expert out;
- priority: a tie-breaker.
The base model competes as a candidate whose score moves with what the prompt wants (routing/intent.py): up for a
prompt that wants prose (a question about SQL that wants an explanation), down for one that brings or asks for an
artifact (a pasted table, "write ...", "extract ..."). A softmax over all candidates gives confidences, and an
expert whose confidence is below the threshold loses to the base model. The constants were chosen on
configs/routing/dev.jsonl only; the test sets are reported, never tuned on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from expertserve.registry import ExpertRecord, Registry
from expertserve.routing.intent import Cues, cues, is_fragment, languages, requested_formats, wanted_languages
from expertserve.routing.lexical import FuzzyIndex, PhraseIndex, normalise

BASE = None  # the decision "base model"


class TextEmbedder(Protocol):
    """What the router needs from an embedding model."""

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class RouterConfig:
    """Scoring constants (chosen on configs/routing/dev.jsonl)."""

    base_score: float = 0.42
    prose_weight: float = 0.25
    artifact_weight: float = 0.18
    language_penalty: float = 0.3
    keyword_bonus: float = 0.12
    max_keyword_bonus: float = 0.24
    format_bonus: float = 0.12
    priority_weight: float = 0.02
    temperature: float = 0.05
    min_confidence: float = 0.5
    top_k: int = 3
    data_samples: int = 40
    stickiness: float = 0.08
    max_chars: int = 2000


@dataclass(frozen=True)
class Candidate:
    """One expert's score for a request."""

    expert: str
    score: float
    semantic: float
    keywords: list[str]
    excluded: list[str]
    confidence: float


@dataclass(frozen=True)
class Decision:
    """The router's answer."""

    expert: str | None
    confidence: float
    method: str
    candidates: list[Candidate] = field(default_factory=list)
    base_score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "expert": self.expert,
            "confidence": round(self.confidence, 4),
            "method": self.method,
            "candidates": [
                {
                    "expert": c.expert,
                    "score": round(c.score, 4),
                    "semantic": round(c.semantic, 4),
                    "keywords": c.keywords,
                    "excluded": c.excluded,
                    "confidence": round(c.confidence, 4),
                }
                for c in self.candidates
            ],
        }


@dataclass
class _Profile:
    name: str
    texts: list[str]
    vectors: np.ndarray
    keywords: list[str]
    exclude: list[str]
    priority: float
    languages: frozenset[str]
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    formats: frozenset[str] = frozenset()  # its `format:X` capabilities


class _Index:
    """What a decision reads of all profiles at once, built on first use after the profiles change: one product of
    every profile text's vector with the query instead of one per expert, and the keyword indexes."""

    def __init__(self, profiles: list[_Profile], top_k: int):
        counts = np.array([len(p.vectors) for p in profiles], dtype=np.int64)
        dim = profiles[0].vectors.shape[1] if profiles else 0
        self.vectors = np.concatenate([p.vectors for p in profiles]) if profiles else np.zeros((0, dim))
        # Row i holds the positions of profile i's vectors, padded with the position of a -inf appended to the
        # similarities; sorted descending, a row's first k entries are its best k texts.
        padded = len(self.vectors)
        self._rows: np.ndarray = np.full(
            (len(profiles), max(int(counts.max(initial=0)), 1)), padded, dtype=np.int64
        )
        start = 0
        for i, n in enumerate(counts):
            self._rows[i, :n] = np.arange(start, start + n)
            start += n
        self._k = np.minimum(top_k, counts)
        self._top = max(1, min(top_k, self._rows.shape[1]))
        # Experts cloned from one another share their patterns: each distinct one searched once a decision.
        self.patterns = list(dict.fromkeys(r for p in profiles for r in p.patterns))
        self.fuzzy = FuzzyIndex({p.name: p.keywords for p in profiles})
        self.keywords = PhraseIndex(p.keywords for p in profiles)
        self.exclude = PhraseIndex(p.exclude for p in profiles)

    def semantic(self, query: np.ndarray) -> np.ndarray:
        """Per profile, the mean similarity of its `top_k` texts most similar to `query` (0 for no texts)."""
        sims = np.append(self.vectors @ query, -np.inf)
        # Only each row's best `top_k` are sorted (the -inf padding of a short row sorts last).
        best = -np.partition(-sims[self._rows], self._top - 1, axis=1)[:, : self._top]
        best_first = -np.sort(-best, axis=1)
        sums = np.cumsum(best_first, axis=1)[np.arange(len(self._k)), np.maximum(self._k - 1, 0)]
        return np.where(self._k > 0, sums / np.maximum(self._k, 1), 0.0)


class Router:
    """Routes requests among the registry's servable experts."""

    def __init__(
        self,
        registry: Registry,
        embedder: TextEmbedder,
        *,
        base_model: str,
        config: RouterConfig | None = None,
    ):
        self.embedder = embedder
        self.config = config or RouterConfig()
        self.profiles: list[_Profile] = []
        self._index: _Index | None = None  # built on first use after the profiles change
        # Experts left without a routing profile, with why (they still serve by name).
        self.problems: list[str] = []
        for record in registry.servable(base_model):
            try:
                self.add(record)
            except (
                OSError,
                UnicodeDecodeError,
            ) as e:  # a bad data file costs the expert its profile, not the rest
                self.problems.append(f"{record.name}: not routed to: its training data cannot be read ({e})")

    def add(self, record: ExpertRecord) -> None:
        """Registers (or replaces) an expert's profile."""
        self.profiles = [p for p in self.profiles if p.name != record.name]
        self._index = None
        routing = record.routing
        texts = [record.manifest.description, *(routing.examples if routing else [])]
        texts += _training_prompts(record, self.config.data_samples)
        keywords = list(  # a keyword that is also a capability counts once
            dict.fromkeys(
                [
                    *(routing.keywords if routing else []),
                    *(c.split(":", 1)[-1].replace("_", " ") for c in record.manifest.capabilities),
                ]
            )
        )
        self.profiles.append(
            _Profile(
                record.name,
                texts,
                self.embedder.embed(texts),
                keywords,
                list(routing.exclude_keywords) if routing else [],
                (routing.priority or 0.0) if routing and routing.priority is not None else 0.0,
                languages(" ".join([*texts[: 1 + len(routing.examples if routing else [])], *keywords])),
                [re.compile(p, re.IGNORECASE) for p in (routing.patterns if routing else [])],
                frozenset(
                    c.split(":", 1)[1].casefold()
                    for c in record.manifest.capabilities
                    if c.startswith("format:")
                ),
            )
        )

    def remove(self, name: str) -> None:
        """Drops an expert."""
        self.profiles = [p for p in self.profiles if p.name != name]
        self._index = None

    def route_messages(
        self, messages: list[dict[str, str]], allowed: Callable[[str], bool] | None = None
    ) -> Decision:
        """Routes a conversation: the last user turn decides, except that a short fragment continuing the previous
        turns (`now for 'Ana, 25'`, `and one that checks palindromes`) stays with the expert they route to, and the
        expert earlier turns picked keeps the conversation unless another expert is clearly better (by
        `stickiness`)."""
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            return Decision(BASE, 1.0, "no-user-message")
        decision = self.route(users[-1], allowed)
        if len(users) == 1:
            return decision
        incumbent_decision = self.route("\n".join(users[:-1]), allowed)
        incumbent = incumbent_decision.expert
        if incumbent is None or incumbent == decision.expert:
            return decision
        # A continuation the base model would take; a turn that asks for prose (`any tips for ...?`) starts anew.
        if decision.expert is None and is_fragment(users[-1]) and not cues(users[-1]).wants_prose:
            return Decision(
                incumbent,
                incumbent_decision.confidence,
                "follow-up",
                incumbent_decision.candidates,
                incumbent_decision.base_score,
            )
        scores = {c.expert: c.score for c in decision.candidates}
        best = scores.get(decision.expert, decision.base_score) if decision.expert else decision.base_score
        if incumbent in scores and best - scores[incumbent] < self.config.stickiness:
            candidate = next(c for c in decision.candidates if c.expert == incumbent)
            return Decision(
                incumbent, candidate.confidence, "sticky", decision.candidates, decision.base_score
            )
        return decision

    def route(self, prompt: str, allowed: Callable[[str], bool] | None = None) -> Decision:
        """Routes one prompt among the experts `allowed` accepts (all when None: a caller's scope narrows the
        candidates before the softmax, so confidences are among what the caller may use)."""
        cfg = self.config
        # The start of a prompt says what it is; a bounded read keeps a decision cheap for any length.
        prompt = prompt[: cfg.max_chars]
        text = normalise(prompt)
        if not text or not self.profiles:
            return Decision(BASE, 1.0, "empty" if not text else "no-experts")
        query = self.embedder.embed([prompt])[0]
        base_score = self.base_score(cues(prompt))
        named = languages(prompt)
        wanted = wanted_languages(prompt)
        formats = requested_formats(prompt)
        if self._index is None:
            self._index = _Index(self.profiles, cfg.top_k)
        index = self._index
        slips = index.fuzzy.hits(text)
        raw: list[tuple[_Profile, float, float, list[str], list[str]]] = []
        semantics = index.semantic(query).tolist()
        searched = {r for r in index.patterns if r.search(text)}
        for p, semantic, hits, excluded in zip(
            self.profiles, semantics, index.keywords.matches(text), index.exclude.matches(text), strict=True
        ):
            hits += [slip for slip in slips.get(p.name, []) if slip.split("~")[1] not in hits]
            hits += [f"/{r.pattern}/" for r in p.patterns if r in searched]
            # The prompt names the expert's language in words no keyword covers ("postgres: ..." for SQL).
            spoken = sorted(named & p.languages)
            if spoken and not (languages(" ".join(hits)) & p.languages):
                hits.append(f"language:{spoken[0]}")
            bonus = min(cfg.max_keyword_bonus, cfg.keyword_bonus * len(hits))
            # The answer's format is asked for and the expert declares it: the task, whatever the text is about.
            # The code is wanted in another language (`a rust function that serializes to JSON`): the format is
            # what that code handles, not the answer's.
            foreign = bool(wanted) and not (wanted & p.languages)
            asked = sorted(formats & p.formats)
            if asked and not foreign:
                hits.append(f"format:{asked[0]}")
                bonus += cfg.format_bonus
            # The prompt wants code in, or only names, languages none of which is the expert's: a request for
            # another language's code.
            mismatch = cfg.language_penalty if foreign or (named and not (named & p.languages)) else 0.0
            score = -1.0 if excluded else semantic + bonus + cfg.priority_weight * p.priority - mismatch
            raw.append((p, score, semantic, hits, excluded))
        if allowed is not None:
            raw = [r for r in raw if allowed(r[0].name)]
            if not raw:
                return Decision(BASE, 1.0, "no-permitted-experts")
        logits = np.array([s for _, s, *_ in raw] + [base_score]) / cfg.temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        candidates = sorted(
            (
                Candidate(p.name, s, sem, hits, exc, float(pr))
                for (p, s, sem, hits, exc), pr in zip(raw, probs[:-1], strict=True)
            ),
            key=lambda c: (-c.score, c.expert),
        )
        best = candidates[0]
        if best.score > base_score and best.confidence >= cfg.min_confidence:
            return Decision(best.expert, best.confidence, "semantic+keywords", candidates, base_score)
        return Decision(BASE, float(probs[-1]), "fallback", candidates, base_score)

    def base_score(self, found: Cues) -> float:
        """The base model's score for a prompt with these cues: higher when it wants prose, lower when it brings or
        asks for an artifact (both or neither: unchanged)."""
        cfg = self.config
        if found.prose and not found.artifact:
            return cfg.base_score + cfg.prose_weight
        if found.artifact and not found.prose:
            return cfg.base_score - cfg.artifact_weight
        return cfg.base_score

    def explain(self, prompt: str, *, nearest: int = 3) -> dict[str, Any]:
        """The decision with its evidence: each candidate's score, its nearest profile texts and keyword hits, the
        prompt's intent cues, the base model's score, and the margin between the winner and the runner-up."""
        decision = self.route(prompt)
        found = cues(prompt[: self.config.max_chars])
        query = self.embedder.embed([prompt[: self.config.max_chars]])[0]
        profiles = {p.name: p for p in self.profiles}
        out = []
        for c in decision.candidates:
            profile = profiles[c.expert]
            sims = profile.vectors @ query
            order = np.argsort(-sims)[:nearest]
            out.append(
                {
                    **next(d for d in decision.to_dict()["candidates"] if d["expert"] == c.expert),
                    "nearest": [
                        {"text": profile.texts[i][:160], "similarity": round(float(sims[i]), 4)}
                        for i in order
                    ],
                }
            )
        ranked = sorted([*(c.score for c in decision.candidates), decision.base_score], reverse=True)
        return {
            **decision.to_dict(),
            "base_score": round(decision.base_score, 4),
            "cues": {"prose": list(found.prose), "artifact": list(found.artifact)},
            # Named: every language the prompt names; wanted: the one its code is asked in (the penalty's rule).
            "languages": {
                "named": sorted(languages(prompt[: self.config.max_chars])),
                "wanted": sorted(wanted_languages(prompt[: self.config.max_chars])),
            },
            "margin": round(ranked[0] - ranked[1], 4) if len(ranked) > 1 else None,
            "candidates": out,
        }


def _training_prompts(record: ExpertRecord, count: int) -> list[str]:
    """The last user message of up to `count` training examples (a deterministic sample)."""
    path = record.manifest.training.dataset.path
    if not path or count <= 0:
        return []
    file = Path(record.root) / path
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // count)
    prompts = []
    for line in lines[::step][:count]:
        try:
            users = [_text(m["content"]) for m in json.loads(line)["messages"] if m["role"] == "user"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue  # a row the router cannot read costs that row only, never the reload
        if users and users[-1]:
            prompts.append(users[-1])
    return prompts


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list (other parts carry no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text")
        )
    return ""
