"""Resolved decoding (see `expertserve.decoding`) to vLLM `SamplingParams`."""

from __future__ import annotations

import json
from typing import Any

from expertserve.decoding import Constraint, Resolved


def sampling_params(resolved: dict[str, Resolved], constraint: Constraint, **extra: Any) -> Any:
    """vLLM SamplingParams from resolved values; `extra` passes request-only options (n, seed, logprobs...)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    values = {k: v.value for k, v in resolved.items()}
    if values.get("top_k") == 0:
        values["top_k"] = -1  # vLLM's "no limit"
    structured = None
    if constraint.kind == "grammar":
        structured = StructuredOutputsParams(grammar=constraint.value)
    elif constraint.kind == "json_schema":
        structured = StructuredOutputsParams(json=json.dumps(constraint.value))
    elif constraint.kind == "json_object":
        structured = StructuredOutputsParams(json_object=True)
    return SamplingParams(**values, structured_outputs=structured, **extra)
