"""The completion pipeline: parse the body, choose the expert (serve/choose.py), resolve decoding (request >
manifest > server defaults) and the output constraint, build the typed engine requests, and hand them to the
responder (serve/respond.py), which streams or answers whole. Every client mistake is a `RequestError` (4xx)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Any

from fastapi.responses import Response

from expertserve import __version__
from expertserve.decoding import Constraint, describe, resolve, resolve_constraint
from expertserve.engine.request import EngineRequest, Extras, Kind, Message, Role, Sampling, check_sampling
from expertserve.registry import ExpertRecord
from expertserve.serve.catalog import ExpertCatalog
from expertserve.serve.choose import AnyRequest, Choice, Chooser
from expertserve.serve.errors import RequestError
from expertserve.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from expertserve.serve.quota import Quota, estimate
from expertserve.serve.respond import Responder
from expertserve.serve.responses import ResponseMeta
from expertserve.serve.tenants import TenantCaller
from expertserve.serve.tools import ToolPlan, render_tool_turn, with_manifest
from expertserve.serve.tools import plan as plan_tools

logger = logging.getLogger("ray.serve")
# OpenAI's roles as the chat template sees them (tool turns are rendered by serve/tools.py).
_ROLES: dict[str, Role] = {
    "developer": "system",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
# Response headers stay small whatever a client sends (16 stop strings of 60 KB once stalled the response);
# the full values go to the log line and GET /v1/experts.
HEADER_VALUE_CHARS = 48


class Completions:
    """Chat completions and completions, streaming or not.

    Args:
        catalog: The experts served (their manifests, the decoding defaults, the engines' limits).
        chooser: Picks the expert per request.
        responder: Sends engine requests and answers.
    """

    def __init__(
        self, *, catalog: ExpertCatalog, chooser: Chooser, responder: Responder, quota: Quota | None = None
    ) -> None:
        self.catalog = catalog
        self.chooser = chooser
        self.responder = responder
        self.quota = quota

    async def complete(
        self, kind: Kind, body: dict[str, Any], caller: TenantCaller | None = None
    ) -> Response:
        """Answers one request of `kind` with the parsed JSON `body`, for `caller` (None: no tenancy, every
        expert): its scope narrows the choice, its limits and fair share admit the request."""
        req = parse_request(kind, body)
        tenant = caller.tenant if caller else None
        choice = await self.chooser.choose(req, kind, tenant)
        tool_plan = self._tool_plan(req, choice.record)
        engine_requests = self._engine_requests(kind, req, choice.record, tool_plan)
        first = engine_requests[0]
        headers = self._headers(req, choice, first)
        logger.info(
            "request %s tenant=%s model=%s expert=%s user=%s decoding: %s",
            first.request_id,
            caller.name if caller else "-",
            req.model,
            headers["x-expertserve-expert"],
            json.dumps(req.user),
            describe(dict(first.sampling.items()), first.constraint),
        )
        meta = self._meta(req, choice, first, tool_plan)
        if self.quota is None or caller is None:
            return await self.responder.respond(req, engine_requests, headers, meta)
        ticket = await self.quota.admit(
            caller.name, caller.tenant, headers["x-expertserve-expert"], _estimate(req, engine_requests)
        )
        headers.update(ticket.headers)
        if ticket.priority:  # the engine's waiting queue keeps the tenants' fair order too
            engine_requests = [dataclasses.replace(r, priority=ticket.priority) for r in engine_requests]
        return await self.responder.respond(req, engine_requests, headers, meta, on_end=ticket.end)

    def _tool_plan(self, req: AnyRequest, record: ExpertRecord | None) -> ToolPlan | None:
        """How the request's tools (or the expert's declared ones) are enforced (None: no tool call); see
        serve/tools.py."""
        if not isinstance(req, ChatCompletionRequest):
            return None
        decoding = record.decoding if record and not self.catalog.config.ignore_manifest_decoding else None
        tools, tool_choice, source = with_manifest(req.tools_dicts(), req.tool_choice_value(), decoding)
        tool_plan = plan_tools(
            tools, tool_choice, template_has_tools=self.catalog.serving.template_has_tools, source=source
        )
        if tool_plan is not None and req.response_format is not None:
            raise RequestError(
                400,
                "response_format: cannot be combined with a tool call (the call's arguments "
                "schema constrains the output)",
                param="response_format",
            )
        return tool_plan

    def _headers(self, req: AnyRequest, choice: Choice, engine_request: EngineRequest) -> dict[str, str]:
        """Who answered and with which decoding (values shortened; the log line has them whole)."""
        resolved = dict(engine_request.sampling.items())
        headers = {
            "x-expertserve-expert": choice.record.name if choice.record else self.catalog.model_id,
            "x-expertserve-decoding": describe(
                resolved, engine_request.constraint, max_value_chars=HEADER_VALUE_CHARS
            ),
            "x-expertserve-request-id": engine_request.request_id,
        }
        if choice.route:
            headers["x-expertserve-route"] = f"requested={req.model}; {choice.route}"
        return headers

    def _meta(
        self, req: AnyRequest, choice: Choice, engine_request: EngineRequest, tool_plan: ToolPlan | None
    ) -> ResponseMeta:
        """The body's `model` is who answered (an expert, or the base model); the fingerprint names its version."""
        record = choice.record
        answered = record.name if record else self.catalog.model_id
        echo = tuple(req.prompts()) if isinstance(req, CompletionRequest) and req.echo else ()
        return ResponseMeta.new(
            engine_request.kind,
            engine_request.request_id,
            int(time.time()),
            answered,
            fingerprint=f"expertserve-{__version__}:{record.name}@{record.version}"
            if record
            else f"expertserve-{__version__}:base",
            n=req.n,
            logprobs=req.sample_logprobs() is not None,
            token_ids=req.return_token_ids,
            echo=echo,
            tools=tool_plan,
        )

    def _engine_requests(
        self, kind: Kind, req: AnyRequest, record: ExpertRecord | None, tool_plan: ToolPlan | None = None
    ) -> list[EngineRequest]:
        """Decoding resolved (request > manifest > defaults) and the typed requests the engine applies as they
        are: one per prompt."""
        manifest = record.decoding if record else None
        ignore = self.catalog.config.ignore_manifest_decoding
        sampling = Sampling.of(
            resolve(req.sampling_request(), manifest, self.catalog.defaults, ignore_manifest=ignore)
        )
        constraint: Constraint = resolve_constraint(
            req.response_format.as_dict() if req.response_format else None,
            manifest,
            record.root if record else None,
            ignore_manifest=ignore,
        )
        if tool_plan is not None:  # a request's constraint replaces the manifest's (request > manifest)
            constraint = Constraint("json_schema", tool_plan.schema, "request")
        extras = _extras(req)
        check_sampling(sampling, extras)
        spec = self.catalog.spec(record) if record else None
        if isinstance(req, ChatCompletionRequest):
            messages = tuple(self._message(i, m) for i, m in enumerate(req.messages))
            if tool_plan is not None:
                messages = (Message("system", tool_plan.instruction), *messages)
            return [
                EngineRequest(
                    "chat", uuid.uuid4().hex, sampling, constraint, spec, messages=messages, extras=extras
                )
            ]
        return [
            EngineRequest(
                "completion", uuid.uuid4().hex, sampling, constraint, spec, prompt=prompt, extras=extras
            )
            for prompt in req.prompts()
        ]

    def _message(self, index: int, message: Any) -> Message:
        """A chat message for the template; an author `name` only where the template uses names."""
        if message.name is not None and not self.catalog.serving.template_uses_name:
            raise RequestError(
                400,
                f"messages[{index}].name: the base model's chat template has no author names; "
                "leave name out or put it in the content",
                param=f"messages[{index}].name",
            )
        if (
            message.role == "tool" or message.tool_calls
        ):  # templates here have no tool turns: rendered as text
            calls = [c.model_dump() for c in message.tool_calls or []]
            turn, text = render_tool_turn(message.text() or None, calls, message.tool_call_id)
            return Message(turn, text, message.name)
        return Message(_ROLES[message.role], message.text(), message.name)


def _estimate(req: AnyRequest, engine_requests: list[EngineRequest]) -> int:
    """The request's tokens at admission (serve/quota.py `estimate`)."""
    chars = sum(len(r.prompt or "") + sum(len(m.content) for m in r.messages) for r in engine_requests)
    max_tokens = engine_requests[0].sampling.max_tokens
    return estimate(chars, len(engine_requests), req.n, int(max_tokens.value) if max_tokens else None)


def _extras(req: AnyRequest) -> Extras:
    echo = isinstance(req, CompletionRequest) and req.echo
    logprobs = req.sample_logprobs()
    return Extras(
        n=req.n,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
        score_only=echo and req.max_tokens == 0,
        whole=not req.stream,
    )
