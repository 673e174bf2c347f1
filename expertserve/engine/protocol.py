"""The engine interface an engine replica drives. Pure Python.

The Serve deployment (`expertserve.serve.replica.EngineReplica`) takes the engine class as a keyword argument, so
the real Serve app runs on vLLM in production and on `tests.fakes.FakeEngine` in CPU tests (the shape Ray Serve
LLM uses: an engine protocol, the engine class injected into the server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from expertserve.engine.config import EngineSettings
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec


@dataclass(frozen=True)
class LoadedExpert:
    """An expert as one replica holds it; engines subclass it with what they need to apply it.

    Attributes:
        spec: What was loaded.
        load_seconds: How long loading took.
        soft_prompt_tokens: Positions the expert's soft prompts add in front of every prompt.
    """

    spec: ExpertSpec
    load_seconds: float
    soft_prompt_tokens: int = 0


class ExpertEngine(ABC):
    """One inference engine serving the base model and any number of experts.

    Engines raise the domain errors of `expertserve.errors` (`PromptTooLong`, `InvalidSampling`,
    `ExpertLoadError`); only serve/ maps them to HTTP.
    """

    @abstractmethod
    def __init__(self, settings: EngineSettings) -> None:
        """Takes the replica's settings; starts nothing heavy (see `start`)."""

    @abstractmethod
    async def start(self) -> None:
        """Starts the engine; returns when it can take requests."""

    @abstractmethod
    async def load_expert(self, spec: ExpertSpec) -> LoadedExpert:
        """Loads an expert's adapter and soft prompts (the replica keeps the result while Serve keeps the expert).

        Raises:
            ExpertLoadError: The adapter or a soft prompt cannot be loaded or does not fit the base model.
        """

    @abstractmethod
    def generate(self, request: EngineRequest, expert: LoadedExpert | None) -> AsyncIterator[Chunk]:
        """Streams the output of every choice of `request`, with `expert` applied (None: the base model).

        Raises:
            PromptTooLong: The prompt leaves no room in the context.
            InvalidSampling: The engine refuses a parameter or the output constraint.
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stops a request (its client went away); unknown ids are ignored."""

    @abstractmethod
    async def check_health(self) -> None:
        """Returns when the engine is healthy; raises otherwise."""

    async def shutdown(self) -> None:  # noqa: B027 - optional: engines without resources to free need nothing
        """Frees the engine's resources (a replica restarting its engine for a new shape calls it on the old one,
        once no request runs on it)."""
