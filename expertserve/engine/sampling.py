"""Resolved decoding values (see `expertserve.decoding`) and the output constraint to vLLM `SamplingParams`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from expertserve.decoding import Constraint


def sampling_params(values: Mapping[str, Any], constraint: Constraint, **extra: Any) -> Any:
    """vLLM SamplingParams from plain resolved values; `extra` passes request-only options (n, seed, ...)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    values = dict(values)
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
