"""Decoding precedence: request > manifest > server defaults, each value with its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertserve.decoding import describe, load_defaults, resolve, resolve_constraint
from expertserve.manifest.model import Decoding

DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 256, "stop": []}


def test_request_beats_manifest_beats_defaults() -> None:
    manifest = Decoding(temperature=0.1, stop_sequences=[";"])
    r = resolve({"temperature": 0.9, "max_tokens": None}, manifest, DEFAULTS)
    assert (r["temperature"].value, r["temperature"].source) == (0.9, "request")
    assert (r["stop"].value, r["stop"].source) == ([";"], "manifest")
    assert (r["max_tokens"].value, r["max_tokens"].source) == (256, "default")
    r = resolve({}, manifest, DEFAULTS)
    assert (r["temperature"].value, r["temperature"].source) == (0.1, "manifest")


def test_manifest_can_be_ignored_for_comparisons() -> None:
    r = resolve({}, Decoding(temperature=0.1), DEFAULTS, ignore_manifest=True)
    assert (r["temperature"].value, r["temperature"].source) == (0.7, "default")


def test_describe_says_where_each_value_came_from() -> None:
    line = describe(resolve({}, Decoding(temperature=0.1), DEFAULTS))
    assert "temperature=0.1 (manifest)" in line and "top_p=1.0 (default)" in line


def test_packaged_defaults_load_and_unknown_keys_fail(tmp_path: Path) -> None:
    assert load_defaults()["temperature"] == 0.7
    bad = tmp_path / "d.json"
    bad.write_text('{"temprature": 1}')
    with pytest.raises(ValueError, match="unknown parameter"):
        load_defaults(bad)


def test_constraint_precedence(tmp_path: Path) -> None:
    (tmp_path / "g.gbnf").write_text('root ::= "a"')
    grammar = Decoding(grammar_file="g.gbnf")
    c = resolve_constraint(None, grammar, tmp_path)
    assert (c.kind, c.value, c.source) == ("grammar", 'root ::= "a"', "manifest")
    schema = {"type": "object"}
    c = resolve_constraint(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, grammar, tmp_path
    )
    assert (c.kind, c.value, c.source) == ("json_schema", schema, "request")
    assert resolve_constraint({"type": "text"}, grammar, tmp_path).kind == "none"
    assert (
        resolve_constraint(None, Decoding(grammar_type="json", use_grammar=True), tmp_path).kind
        == "json_object"
    )
    assert (
        resolve_constraint(None, Decoding(grammar_file="g.gbnf", use_grammar=False), tmp_path).kind == "none"
    )
    assert resolve_constraint(None, grammar, tmp_path, ignore_manifest=True).kind == "none"
