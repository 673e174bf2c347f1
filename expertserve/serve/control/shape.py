"""The engine shape: what the running engines must be built with for every expert to be servable (the largest
LoRA rank slot, prefix caching). Pure Python.

At start the config's explicit settings win (`start_shape`); `POST /admin/engines/restart` grows the running shape
to what the experts need (`experts_need`) and never shrinks it: an engine restarted for a bigger rank still serves
every smaller adapter, and turning prefix caching off would stop the experts that asked for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from expertserve.engine.args import lora_rank_slot
from expertserve.engine.config import EngineConfig
from expertserve.registry import Registry


@dataclass(frozen=True)
class EngineShape:
    """The engine arguments that decide which experts an engine can serve.

    Attributes:
        max_lora_rank: The largest adapter rank (a slot vLLM accepts).
        prefix_caching: Whether prefix caching is on.
    """

    max_lora_rank: int
    prefix_caching: bool

    def covers(self, other: EngineShape) -> bool:
        """Whether an engine of this shape serves every expert one of `other` serves."""
        return self.max_lora_rank >= other.max_lora_rank and (self.prefix_caching or not other.prefix_caching)

    def grown(self, other: EngineShape | None) -> EngineShape:
        """The smallest shape that covers both."""
        if other is None:
            return self
        return EngineShape(
            lora_rank_slot(max(self.max_lora_rank, other.max_lora_rank)),
            self.prefix_caching or other.prefix_caching,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (admin answers, the expert-state actor)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EngineShape | None:
        """Back from `to_dict` (None stays None)."""
        return None if data is None else cls(int(data["max_lora_rank"]), bool(data["prefix_caching"]))


def experts_need(registry: Registry, base_model: str, rank_limit: int = 512) -> EngineShape:
    """The shape the registry's servable experts need (scan it with the trust check: an untrusted package must not
    size the engines): the largest adapter rank's slot, at most `rank_limit` (`engine.lora_rank_limit`), and prefix
    caching when an expert asks for `runtime.requires_kv_cache_persistence` or has a soft prompt (its positions,
    the same in every request of the expert, are then computed once and reused; see `engine.block_size`)."""
    servable = registry.servable(base_model)
    wants_cache = any(
        (r.manifest.runtime and r.manifest.runtime.requires_kv_cache_persistence) or r.soft_prompts
        for r in servable
    )
    rank = min(registry.max_lora_rank(base_model), rank_limit)
    return EngineShape(lora_rank_slot(rank), bool(wants_cache))


def start_shape(registry: Registry, base_model: str, engine: EngineConfig) -> EngineShape:
    """The shape engines start with: the config's `max_lora_rank` and `prefix_caching` where set (a user may cap
    the adapter memory), else what the experts need."""
    need = experts_need(registry, base_model, engine.lora_rank_limit)
    rank = engine.max_lora_rank or need.max_lora_rank
    prefix = engine.prefix_caching if engine.prefix_caching is not None else need.prefix_caching
    return EngineShape(lora_rank_slot(rank), bool(prefix))
