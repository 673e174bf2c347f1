"""Tool calling with structured outputs (pure): plans, calls from constrained output, tool turns as text."""

from __future__ import annotations

import json

import pytest

from expertserve.serve.errors import RequestError
from expertserve.serve.protocol import ChatCompletionRequest
from expertserve.serve.tools import plan, render_tool_turn, tool_call

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_a_named_function_constrains_the_output_to_its_arguments() -> None:
    p = plan(
        [WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, template_has_tools=False
    )
    assert p is not None and p.named == "get_weather" and p.schema == WEATHER["function"]["parameters"]
    assert "get_weather" in p.instruction
    call = tool_call(p, '{"city": "Lisbon"}')
    assert call is not None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}


def test_required_with_several_functions_names_one_of_them() -> None:
    p = plan([WEATHER, TIME], "required", template_has_tools=False)
    assert p is not None and p.named is None and len(p.schema["anyOf"]) == 2
    assert p.schema["anyOf"][1]["properties"]["name"] == {"const": "get_time"}
    call = tool_call(p, '{"name": "get_time", "arguments": {}}')
    assert call is not None and call["function"] == {"name": "get_time", "arguments": "{}"}
    assert tool_call(p, '{"name": "get_time", "argu') is None  # cut by max_tokens: not a call


def test_none_and_auto() -> None:
    assert (
        plan([WEATHER], "none", template_has_tools=False) is None
        and plan(None, None, template_has_tools=False) is None
    )
    for has_tools in (False, True):
        with pytest.raises(RequestError) as info:
            plan([WEATHER], None, template_has_tools=has_tools)  # auto is the default with tools
        assert info.value.param == "tool_choice" and "'required'" in info.value.message
    with pytest.raises(RequestError, match="not in tools"):
        plan([WEATHER], {"type": "function", "function": {"name": "nope"}}, template_has_tools=False)
    with pytest.raises(RequestError, match="needs tools"):
        plan([], "required", template_has_tools=False)


def test_tool_turns_render_as_text_for_templates_without_tools() -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    role, text = render_tool_turn(None, calls, None)
    assert role == "assistant" and json.loads(text) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert render_tool_turn("12 C", None, "call_1") == ("user", "Result of tool call call_1: 12 C")


def test_the_request_model_takes_tools_and_tool_turns() -> None:
    r = ChatCompletionRequest.model_validate(
        {
            "model": "x",
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "messages": [
                {"role": "user", "content": "weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
            ],
        }
    )
    assert r.tools_dicts()[0]["function"]["name"] == "get_weather" and r.tool_choice_value() == "required"
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "content": None}):
        with pytest.raises(ValueError):
            ChatCompletionRequest.model_validate({"model": "x", "messages": [bad]})


def test_an_experts_declared_tools_apply_when_the_request_sends_none() -> None:
    """request > manifest: the manifest's tools and tool_choice fill in what the request leaves out."""
    from expertserve.manifest.model import Decoding
    from expertserve.serve.tools import with_manifest

    decoding = Decoding.model_validate(
        {"tools": [{"name": "lookup", "parameters": {"type": "object"}}], "tool_choice": "lookup"}
    )
    tools, choice, source = with_manifest([], None, decoding)
    assert [t["function"]["name"] for t in tools] == ["lookup"] and source == "manifest"
    assert choice == {"type": "function", "function": {"name": "lookup"}}
    assert plan(tools, choice, template_has_tools=False).named == "lookup"
    assert with_manifest([], "none", decoding)[1:] == ("none", "request")
    assert with_manifest([WEATHER], None, decoding) == ([WEATHER], None, "request")
    assert with_manifest([], None, None) == ([], None, "request")
    auto = Decoding.model_validate({"tools": [{"name": "lookup"}], "tool_choice": "auto"})
    with pytest.raises(RequestError, match="manifest default") as info:
        plan(*with_manifest([], None, auto)[:2], template_has_tools=False, source="manifest")
    assert info.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("decoding", "message"),
    [
        ({"tools": [{"name": "f"}]}, "tool_choice: required when tools are declared"),
        ({"tools": [{"name": "f"}], "tool_choice": "g"}, "tool_choice: expected 'none', 'required'"),
        ({"tool_choice": "required"}, "tool_choice: 'required' needs tools"),
        ({"tools": [{"name": "f"}, {"name": "f"}], "tool_choice": "f"}, "declared twice"),
        ({"tools": [{"name": "f", "parameters": {"type": "string"}}], "tool_choice": "f"}, "type 'object'"),
        ({"tools": [{"name": "bad name"}], "tool_choice": "none"}, "tools.0.name"),
    ],
)
def test_declared_tools_are_validated(decoding: dict, message: str) -> None:
    from pydantic import ValidationError

    from expertserve.manifest.model import Decoding

    with pytest.raises(ValidationError, match=message):
        Decoding.model_validate(decoding)
