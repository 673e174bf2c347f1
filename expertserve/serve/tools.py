"""Tool calling (`tools`, `tool_choice`) with structured outputs. Pure Python.

`tool_choice: "required"` or a named function is enforced: the output is constrained to a JSON object valid against
the function's `parameters` schema (with several functions and `"required"`, to `{"name": ..., "arguments": ...}`
for one of them), and answered as `tool_calls` with `finish_reason: "tool_calls"`. `"auto"` needs the model to
decide whether to call, which needs a chat template trained for tools and a parser for its format; a base model
without one gets a 400 that says so (SmolLM2's template has no tools). `"none"` calls nothing.

Chat templates without tools never see the tool messages of a conversation as such, so they are rendered as text
the model can read: an assistant's tool call as its JSON, a tool's result as a user turn naming the call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from expertserve.manifest.model import Decoding
from expertserve.serve.errors import RequestError


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools are enforced and answered.

    Attributes:
        schema: The JSON schema the output is constrained to.
        named: The function called when only one can be (its arguments are the whole output); None when the
            output names the function itself.
        instruction: A system message telling the model which function(s) it calls (templates without tools
            never show the model the `tools` list).
    """

    schema: dict[str, Any]
    named: str | None
    instruction: str


def with_manifest(
    tools: list[dict[str, Any]], tool_choice: Any, decoding: Decoding | None
) -> tuple[list[dict[str, Any]], Any, str]:
    """The tools and tool_choice a chat request runs with, and where they came from: request > manifest.

    A request that sends `tools` brings its own list (and its `tool_choice`, or OpenAI's default); one that sends
    none takes the expert's declared tools; a request's `tool_choice` wins over the manifest's either way (so
    `"none"` turns the expert's default call off).
    """
    declared = decoding.tools if decoding is not None else None
    if tools or not declared:
        return tools, tool_choice, "request"
    assert decoding is not None and decoding.tool_choice is not None  # the manifest model requires it
    manifest_tools = [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in declared]
    if tool_choice is not None:
        return manifest_tools, tool_choice, "request"
    choice = decoding.tool_choice
    if choice in ("none", "auto", "required"):
        return manifest_tools, choice, "manifest"
    return manifest_tools, {"type": "function", "function": {"name": choice}}, "manifest"


def plan(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    *,
    template_has_tools: bool,
    source: str = "request",
) -> ToolPlan | None:
    """The plan for a request's `tools` and `tool_choice` (None: no tool call).

    Raises:
        RequestError: `tool_choice` names a function not in `tools`, or asks for `"auto"` where the base model
            cannot decide by itself.
    """
    tools = tools or []
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none":
        return None
    if not tools:
        raise RequestError(400, "tool_choice: needs tools", param="tool_choice")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in functions:
            raise RequestError(
                400,
                f"tool_choice: function {name!r} is not in tools ({', '.join(functions)})",
                param="tool_choice",
            )
        selected = [functions[name]]
    elif choice == "required":
        selected = list(functions.values())
    else:
        why = (
            "this base model's chat template has no tool support"
            if not template_has_tools
            else "deciding whether to call a tool needs a tool-call parser for this model family, which "
            "expertserve does not ship yet"
        )
        origin = "" if source == "request" else " (the expert's manifest default)"
        raise RequestError(
            400,
            f"tool_choice: 'auto'{origin} is not available: {why}; send tool_choice 'required' or "
            "{'type': 'function', 'function': {'name': ...}} to have a call enforced",
            param="tool_choice",
        )
    return _plan(selected)


def _plan(functions: list[dict[str, Any]]) -> ToolPlan:
    described = "\n".join(
        f"- {f['name']}: {f.get('description') or 'no description'}; arguments schema: "
        f"{json.dumps(f.get('parameters') or {'type': 'object'})}"
        for f in functions
    )
    if len(functions) == 1:
        only = functions[0]
        return ToolPlan(
            only.get("parameters") or {"type": "object"},
            only["name"],
            f"Call the function {only['name']}. Answer with its arguments as one JSON object, "
            f"nothing else.\n{described}",
        )
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return ToolPlan(
        {"anyOf": options},
        None,
        'Call one of these functions. Answer with one JSON object {"name": ..., "arguments": {...}}, '
        f"nothing else.\n{described}",
    )


def tool_call(plan: ToolPlan, text: str) -> dict[str, Any] | None:
    """The OpenAI `tool_calls` entry for the constrained output, or None when it is not complete JSON (the
    output was cut by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.named is not None:
        name, arguments = plan.named, value
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        name, arguments = value["name"], value.get("arguments", {})
    else:
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def render_tool_turn(
    content: str | None, tool_calls: list[dict[str, Any]] | None, tool_call_id: str | None
) -> tuple[Literal["user", "assistant"], str]:
    """A tool-call turn as (role, text) for a chat template without tools: a tool's result (`tool_call_id` set)
    becomes a user turn naming the call; an assistant's calls become its JSON."""
    if tool_call_id is not None:
        return "user", f"Result of tool call {tool_call_id}: {content or ''}"
    calls = [
        {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
        for c in tool_calls or []
    ]
    shown = json.dumps(calls[0] if len(calls) == 1 else calls)
    return "assistant", (f"{content}\n{shown}" if content else shown)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw
