"""Router logic with a deterministic bag-of-words embedder (the real embedder is tested in integration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from expertserve.registry import Registry
from expertserve.routing.router import Router, RouterConfig
from tests.fakes import FakeEmbedder
from tests.helpers import make_expert, manifest

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def expert(
    root: Path,
    name: str,
    routing: dict[str, Any] | None,
    description: str,
    capabilities: list[str] | None = None,
) -> None:
    data = manifest(name=name, description=description)
    if capabilities is not None:
        data["capabilities"] = capabilities
    if routing is not None:
        data["routing"] = routing
    data["training"]["dataset"].pop("path")
    make_expert(root / name, data, files=False)


def router(root: Path, **config: Any) -> Router:
    return Router(Registry.scan([root]), FakeEmbedder(), base_model=BASE, config=RouterConfig(**config))


@pytest.fixture
def two(tmp_path: Path) -> Path:
    expert(
        tmp_path,
        "expert-sql",
        {
            "keywords": ["group by", "sql"],
            "exclude_keywords": ["what is sql"],
            "examples": ["write a sql query over the orders table"],
        },
        "sql queries",
    )
    expert(
        tmp_path,
        "expert-json",
        {"keywords": ["json"], "examples": ["extract fields into a json object"]},
        "json extraction",
    )
    return tmp_path


def test_multi_word_keywords_match_as_phrases(two: Path) -> None:
    r = router(two, base_score=0.05, min_confidence=0.0)
    decision = r.route("count orders per customer using GROUP   BY")
    sql = next(c for c in decision.candidates if c.expert == "expert-sql")
    assert sql.keywords == ["group by"] and decision.expert == "expert-sql"
    assert (
        next(c for c in r.route("group the rows by day").candidates if c.expert == "expert-sql").keywords
        == []
    )


def test_exclude_keywords_rule_an_expert_out(two: Path) -> None:
    decision = router(two, base_score=0.2).route("What is SQL? write a sql query over the orders table")
    sql = next(c for c in decision.candidates if c.expert == "expert-sql")
    assert sql.excluded == ["what is sql"] and decision.expert != "expert-sql"


def test_priority_breaks_ties(tmp_path: Path) -> None:
    for name, priority in (("expert-a", 0.2), ("expert-b", 0.9)):
        expert(
            tmp_path,
            name,
            {"keywords": ["report"], "priority": priority, "examples": ["make a sales report"]},
            "reports",
        )
    decision = router(tmp_path, base_score=0.1, min_confidence=0.0).route("make a sales report")
    assert decision.expert == "expert-b"
    assert [c.expert for c in decision.candidates] == ["expert-b", "expert-a"]


def test_expert_without_routing_block_routes_by_description(tmp_path: Path) -> None:
    expert(tmp_path, "expert-poems", None, "writes short poems about the sea")
    r = router(tmp_path, base_score=0.3)
    assert r.route("short poems about the sea please").expert == "expert-poems"
    assert r.route("quarterly tax forms").expert is None


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_goes_to_the_base_model(two: Path, prompt: str) -> None:
    decision = router(two).route(prompt)
    assert (decision.expert, decision.method) == (None, "empty")


def test_very_long_and_non_english_prompts(two: Path) -> None:
    r = router(two, base_score=0.01, min_confidence=0.0)
    decision = r.route("write a sql query over the orders table " + "x " * 20000)
    assert decision.expert == "expert-sql" and decision.candidates[0].keywords == ["sql"]
    decision = router(two, base_score=0.2).route("Напиши запрос: 東京の天気は？ ¿Qué tal? ")
    assert decision.expert is None and 0 <= decision.confidence <= 1


def test_low_confidence_falls_back_to_the_base_model(two: Path) -> None:
    decision = router(two, base_score=0.2, min_confidence=0.999).route("sql json")
    assert decision.expert is None and decision.method == "fallback"


def test_conversations_stay_with_their_expert_unless_another_is_clearly_better(two: Path) -> None:
    r = router(two, base_score=0.2, stickiness=0.5)
    first = {"role": "user", "content": "write a sql query over the orders table"}
    follow = {"role": "user", "content": "and now as a json object please"}
    assert (
        r.route_messages([first, {"role": "assistant", "content": "SELECT 1"}, follow]).expert == "expert-sql"
    )
    assert router(two, base_score=0.2, stickiness=0.0).route_messages([first, follow]).expert == "expert-json"


def test_new_experts_take_part_without_retraining(two: Path) -> None:
    r = router(two, base_score=0.2)
    assert r.route("translate poems into french").expert is None
    expert(
        two, "expert-translate", {"keywords": ["translate"], "examples": ["translate poems into french"]}, "t"
    )
    r.add(Registry.scan([two]).get("expert-translate"))
    assert r.route("translate poems into french").expert == "expert-translate"
    r.remove("expert-translate")
    assert r.route("translate poems into french").expert is None


def test_one_hundred_synthetic_experts(tmp_path: Path) -> None:
    for i in range(100):
        expert(
            tmp_path,
            f"expert-topic{i}",
            {"keywords": [f"topic{i}"], "examples": [f"questions about topic{i}"]},
            f"topic{i} expert",
        )
    r = router(tmp_path, base_score=0.2)
    assert len(r.profiles) == 100
    for i in (0, 42, 99):
        decision = r.route(f"I have questions about topic{i}")
        assert decision.expert == f"expert-topic{i}" and len(decision.candidates) == 100


def test_intent_cues_read_what_a_prompt_wants() -> None:
    from expertserve.routing.intent import cues, is_fragment, languages

    assert cues("What is the difference between a LEFT JOIN and an INNER JOIN?").wants_prose
    assert not cues("Write a query over orders(id, total, customer)").prose
    assert cues("delete old rows from logs(id, created_at, msg)").artifact
    assert not cues("Explain what users(id, name) means").wants_prose  # both: no adjustment
    assert is_fragment("now for 'Ana, 25'") and is_fragment("authors with more than three books")
    assert is_fragment("what about Oslo") and not is_fragment("why is the sky blue?")
    assert not is_fragment("tell me the weather in Oslo")
    # A short elliptical question leans on the turns before it; a marked change of topic does not.
    assert is_fragment("biggest spender last year?") and not is_fragment("btw, best pizza in Naples?")
    assert not is_fragment("which customers spent the most money in total last year?")
    # Writing that is prose is not an artifact request, whatever the imperative.
    haiku = cues("write a haiku about autumn rain")
    assert haiku.wants_prose and not haiku.artifact
    assert cues("Translate 'good morning' into Spanish").wants_prose
    assert cues("write a function that formats an email address").artifact  # code, though it names e-mail
    assert cues("remove duplicate rows from contacts").artifact and cues("postgres: running totals").artifact
    assert languages("Write a PHP function") == {"php"} and languages("a typed TS helper") == {"typescript"}
    assert languages("convert this javascript to typescript") == {"javascript", "typescript"}
    assert languages("Java, not JavaScript") == {"java", "javascript"}


def test_phrases_match_whole_words_and_object_shaped_requests_are_artifacts() -> None:
    from expertserve.routing.intent import cues

    # "give me a" used to match inside "give me arguments", which made a request for arguments an artifact.
    arguments = cues("Why pick Go over Rust? Give me arguments, not examples.")
    assert arguments.wants_prose and not arguments.artifact
    assert cues("give me a query for daily totals").artifact
    assert cues("Put this into an object with keys sku and qty: A-1, 4").artifact
    assert cues("Represent this order as an object: pen x2").artifact
    assert cues("send it back as structured data with date and room").artifact
    assert cues("type the props for a Button component").artifact
    tips = cues("Give me three tips for naming database tables.")
    assert tips.wants_prose and not tips.artifact


def test_prose_questions_go_to_the_base_model_and_artifacts_to_experts(two: Path) -> None:
    r = router(two, base_score=0.3, prose_weight=0.8, artifact_weight=0.2, min_confidence=0.0)
    assert r.route("write a sql query over the orders table").expert == "expert-sql"
    asked = r.route("why do people write a sql query over the orders table?")
    assert asked.expert is None and asked.base_score == pytest.approx(1.1)
    assert r.route("sql query over the orders table").base_score == pytest.approx(0.1)  # starts with 'sql'


def test_an_expert_for_another_language_is_penalised(tmp_path: Path) -> None:
    expert(
        tmp_path, "expert-ts", {"keywords": ["function"], "examples": ["write a typescript function"]}, "ts"
    )
    r = router(tmp_path, base_score=0.2, min_confidence=0.0, language_penalty=0.5)
    assert r.route("write a typescript function that sums").expert == "expert-ts"
    assert r.route("write a ruby function that sums").expert is None


def test_the_language_the_code_is_wanted_in_decides_not_the_ones_it_mentions(tmp_path: Path) -> None:
    from expertserve.routing.intent import languages, wanted_languages

    assert wanted_languages("Write a bash one-liner that counts lines in all .sql files") == {"shell"}
    assert languages("list the .ts files and *.sql dumps") == frozenset()  # extensions name files
    assert wanted_languages("a python function that runs a sql query") == {"python"}
    assert wanted_languages("a TypeScript function that builds a SQL INSERT statement") == {"typescript"}
    assert wanted_languages("Return JSON describing this bash command: tar -czf x") == frozenset()
    assert wanted_languages("now do it in rust.") == {"rust"}
    expert(tmp_path, "expert-sql", {"keywords": ["sql", "query"], "examples": ["write a sql query"]}, "sql")
    expert(
        tmp_path, "expert-json", {"keywords": ["json"], "examples": ["into json"]}, "json", ["format:json"]
    )
    r = router(tmp_path, base_score=0.2, min_confidence=0.0, language_penalty=0.5, format_bonus=0.3)
    assert r.route("write a sql query that counts orders").expert == "expert-sql"
    assert r.route("a python function that runs a sql query and returns rows").expert is None
    json_for_rust = r.route("a rust function that serializes a struct to json").candidates
    assert "format:json" not in next(c for c in json_for_rust if c.expert == "expert-json").keywords


def test_long_keywords_match_one_typing_slip_away_but_not_inflections() -> None:
    from expertserve.routing.lexical import FuzzyIndex

    index = FuzzyIndex(
        {"sql": ["query", "table", "tables", "group by", "sql"], "ts": ["typescript", "generic"]}
    )
    assert index.hits("wirte a qurey over the tabel") == {"sql": ["qurey~query", "tabel~table"]}
    assert index.hits("a typscript helper") == {"ts": ["typscript~typescript"]}
    assert index.hits("the tables and generics and a tablet") == {}  # keywords themselves, inflections
    assert index.hits("a cable and a sq") == {}  # another first letter; short keywords never fuzzy


def test_a_slip_in_the_opening_verb_is_mended_and_typo_questions_want_prose() -> None:
    from expertserve.routing.intent import cues, requested_formats

    assert cues("wirte a qurey for the orders").artifact == ("asks to 'write'",)
    assert cues("pls extrct the name").artifact == ("asks to 'extract'",)
    assert cues("wat is the best way to learn typescript").wants_prose
    assert cues("Write a SQL-themed joke for my coworkers").wants_prose
    assert requested_formats("Give it back as JSON with title") == {"json"}
    assert requested_formats("turn this into a valid YAML file") == {"yaml"}
    assert requested_formats("what is json?") == frozenset()


def test_asking_for_an_experts_declared_format_earns_a_bonus_beyond_the_keyword_cap(tmp_path: Path) -> None:
    routing = {"keywords": ["json", "extract"], "examples": ["extract fields"]}
    expert(tmp_path, "expert-json", routing, "json", ["format:json"])
    r = router(tmp_path, base_score=0.2, min_confidence=0.0, keyword_bonus=0.1, max_keyword_bonus=0.2)
    asked = r.route("extract json fields from this ticket into JSON").candidates[0]
    plain = r.route("extract json fields from this ticket").candidates[0]
    assert asked.keywords == ["json", "extract", "format:json"] and plain.keywords == ["json", "extract"]
    assert asked.score - plain.score == pytest.approx(0.12, abs=0.05)


def test_naming_the_experts_language_counts_as_a_keyword_hit_once(tmp_path: Path) -> None:
    expert(tmp_path, "expert-sql", {"keywords": ["sql"], "examples": ["write a sql query"]}, "sql")
    r = router(tmp_path, base_score=0.2, min_confidence=0.0, keyword_bonus=0.1)
    named = r.route("postgres: running total per day").candidates[0]
    assert named.keywords == ["language:sql"]
    both = r.route("sql for a running total per day").candidates[0]
    assert both.keywords == ["sql"]  # the keyword already says it: no second bonus


def test_manifest_patterns_count_as_keyword_hits(tmp_path: Path) -> None:
    expert(
        tmp_path,
        "expert-sql",
        {"keywords": ["sql"], "patterns": [r"\b\w+\(\w+(?:, \w+)+\)"], "examples": ["sql"]},
        "sql",
    )
    r = router(tmp_path, base_score=0.1, keyword_bonus=0.2, min_confidence=0.0)
    sql = r.route("orders(id, total) per customer").candidates[0]
    assert sql.keywords == [r"/\b\w+\(\w+(?:, \w+)+\)/"] and sql.score == pytest.approx(0.2)
    from pydantic import ValidationError

    from expertserve.manifest.model import Routing

    with pytest.raises(ValidationError, match="(?s)patterns.*not a regular expression"):
        Routing.model_validate({"keywords": ["x"], "patterns": ["(unclosed"]})


def test_a_fragment_continues_the_conversations_expert(two: Path) -> None:
    r = router(two, base_score=0.3, min_confidence=0.0)
    first = {"role": "user", "content": "extract fields into a json object from 'Ana, 25'"}
    reply = {"role": "assistant", "content": '{"name": "Ana"}'}
    follow = r.route_messages([first, reply, {"role": "user", "content": "now for 'Tom, 30'"}])
    assert follow.expert == "expert-json" and follow.method == "follow-up"
    switch = r.route_messages([first, reply, {"role": "user", "content": "why is the sky blue today?"}])
    assert switch.expert is None
    # Thanks before a new short question, or a request for advice, start anew; thanks before a continuation do not.
    for turn in ("thanks! what's Lyon famous for?", "thanks a lot! any tips for a job interview?"):
        assert r.route_messages([first, reply, {"role": "user", "content": turn}]).expert is None, turn
    thanked = r.route_messages(
        [first, reply, {"role": "user", "content": "great, thanks. now for 'Tom, 30'"}]
    )
    assert thanked.expert == "expert-json"


def test_explain_shows_evidence_and_margin(two: Path) -> None:
    r = router(two, base_score=0.3, min_confidence=0.0)
    report = r.explain("write a sql query with group by over orders")
    assert report["expert"] == "expert-sql" and report["margin"] > 0
    sql = next(c for c in report["candidates"] if c["expert"] == "expert-sql")
    assert sql["keywords"] == ["group by", "sql"]
    assert sql["nearest"][0]["text"] == "write a sql query over the orders table"
    assert report["cues"]["artifact"] and report["base_score"] == pytest.approx(
        0.3 - r.config.artifact_weight
    )
    assert report["languages"] == {"named": ["sql"], "wanted": ["sql"]}
    runs = r.explain("a python function that runs a sql query")["languages"]
    assert runs == {"named": ["python", "sql"], "wanted": ["python"]}


def test_the_stacked_semantic_score_is_each_experts_mean_of_its_best_texts() -> None:
    """One product for all experts (router._Index) against the definition, one expert at a time: the mean
    similarity of an expert's `top_k` most similar texts, fewer when it has fewer."""
    import numpy as np

    from expertserve.routing.router import _Index, _Profile

    rng = np.random.default_rng(7)
    for top_k in (1, 3, 12):
        profiles = []
        for i in range(30):
            vectors = rng.normal(size=(int(rng.integers(1, 9)), 16)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            profiles.append(_Profile(f"e{i}", ["t"] * len(vectors), vectors, [], [], 0.0, frozenset()))
        index = _Index(profiles, top_k)
        for _ in range(5):
            query = rng.normal(size=16).astype(np.float32)
            query /= np.linalg.norm(query)
            expected = [
                float(np.sort(p.vectors @ query)[-min(top_k, len(p.vectors)) :].mean()) for p in profiles
            ]
            assert np.allclose(index.semantic(query), expected, atol=1e-6)


def test_the_phrase_index_matches_as_each_list_alone() -> None:
    import re

    from expertserve.routing.lexical import PhraseIndex, normalise

    def whole_words(
        text: str, phrases: list[str]
    ) -> list[str]:  # the definition, one list and phrase at a time
        return [
            p
            for p in phrases
            if p.strip()
            and re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, normalise(p).split())) + r"(?!\w)", text)
        ]

    lists = [["sql", "select rows", "  "], ["json", "sql query", "Select"], [], ["type script", "rows"]]
    index = PhraseIndex(lists)
    for text in ("write a SQL query to select rows", "json please", "nothing here", "selected rowset", ""):
        text = normalise(text)
        assert index.matches(text) == [whole_words(text, phrases) for phrases in lists]
    assert index.matches(normalise("write a SQL query to select rows"))[1] == ["sql query", "Select"]


def test_training_rows_with_content_lists_or_odd_shapes_never_break_the_router(tmp_path: Path) -> None:
    """Finding 15 of the security issue: a training row whose user `content` was a list broke the router (the
    reload and the server's start failed)."""
    import json

    from expertserve.routing.router import _training_prompts

    data = manifest(name="expert-sql", description="sql queries")
    make_expert(tmp_path / "expert-sql", data)
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "count orders per day"}]}]},
        {"messages": [{"role": "user", "content": {"not": "text"}}]},
        {"messages": ["not a message"]},
        {"messages": [{"role": "user", "content": "list the customers"}]},
    ]
    dataset = tmp_path / "expert-sql" / data["training"]["dataset"]["path"]
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n[[[\n")
    record = Registry.scan([tmp_path]).get("expert-sql")
    assert _training_prompts(record, 10) == ["count orders per day", "list the customers"]
    assert router(tmp_path).route("count the orders per day in sql").expert in ("expert-sql", "base")


def test_a_callers_scope_narrows_the_candidates_before_the_decision(two: Path) -> None:
    r = router(two, base_score=0.05, min_confidence=0.0)
    prompt = "write a sql query with group by over the orders table"
    assert r.route(prompt).expert == "expert-sql"
    narrowed = r.route(prompt, lambda name: name == "expert-json")
    assert {c.expert for c in narrowed.candidates} == {"expert-json"}
    assert narrowed.expert in ("expert-json", None)  # never an expert outside the scope
    nothing = r.route(prompt, lambda name: False)
    assert nothing.expert is None and nothing.method == "no-permitted-experts"
    chat = [{"role": "user", "content": prompt}, {"role": "user", "content": "and by month"}]
    assert r.route_messages(chat, lambda name: name != "expert-sql").expert != "expert-sql"
