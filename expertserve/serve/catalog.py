"""The experts an ingress replica serves: its registry and router, rescanned together from the expert roots, and
the checks an expert must pass on this server (trust, engine limits, grammars).

The catalog answers "which expert is this name" for the completion pipeline and "what is served" for the listings
(serve/listings.py). The control plane (serve/control/plane.py) decides when it rescans.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.decoding import load_defaults
from expertserve.engine.request import ExpertSpec
from expertserve.errors import ExpertNotFound, ExpertNotServable
from expertserve.packaging.store import is_store, local_roots, mirror_dir, store_of
from expertserve.packaging.trust import TrustPolicy
from expertserve.registry import ExpertRecord, Registry
from expertserve.serve.config import ServeConfig
from expertserve.serve.control.shape import EngineShape
from expertserve.serve.expert_checks import ServingContext, expert_problems, trust_problems, xgrammar_compiler
from expertserve.serve.lifecycle import log_changes
from expertserve.serve.metrics import Metrics
from expertserve.settings import install_dir

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Experts:
    """The registry and the router built from it, swapped together on reload (a request never sees one without
    the other)."""

    registry: Registry
    router: Any  # expertserve.routing.router.Router, or None when routing is off


class ExpertCatalog:
    """The experts served now, and their rescan.

    Args:
        config: The server config.
        roots: Expert roots (directories or stores), scanned on every reload.
        serving: The engines' limits experts are checked against.
        metrics: Where the lifecycle transitions of a scan are counted.
        embedder: The router's text embedder; None when routing is off.
        compile_grammars: Compile every expert's grammar with the engine's backend on each scan.
    """

    def __init__(
        self,
        config: ServeConfig,
        roots: list[str],
        *,
        serving: ServingContext,
        metrics: Metrics,
        embedder: Any = None,
        compile_grammars: bool = True,
    ) -> None:
        self.config = config
        self.roots = roots
        # Each store's mirror on this node, once: the request path asks which store an expert came from.
        self.mirrors = {r: mirror_dir(r) for r in roots if is_store(r)}
        self.serving = serving
        self.metrics = metrics
        self.embedder = embedder
        self.compile_grammars = compile_grammars
        # The config's keys are checked hex already and hold EXPERTSERVE_TRUSTED_KEYS (ServeConfig.load).
        self.trust = TrustPolicy(frozenset(config.trusted_keys), config.allow_untrusted)
        self.install_root = install_dir()  # only packages are served from here (expert_checks.trust_problems)
        self.defaults = load_defaults(Path(config.decoding_defaults) if config.decoding_defaults else None)
        self.experts = Experts(Registry(), None)
        # The shape every engine runs once a restart applied one (the control plane sets it); read before a scan.
        self.applied_shape: Callable[[], EngineShape | None] = lambda: None

    @property
    def registry(self) -> Registry:
        """The experts served now."""
        return self.experts.registry

    @property
    def router(self) -> Any:
        """The router over them (None when routing is off)."""
        return self.experts.router

    @property
    def model_id(self) -> str:
        """The base model's id."""
        return self.config.model_id

    def reload(self) -> dict[str, list[str]]:
        """Rescans the expert roots, all or nothing: the new registry and router replace the old ones together.

        New experts serve at once and removed ones stop taking requests; an expert whose new manifest is invalid
        keeps its last valid version; one whose files this server cannot serve is listed as broken, with why. The
        answer lists every problem (`problems`)."""
        self._follow_engine_shape(self.applied_shape())
        previous = self.registry
        paths, store_problems = local_roots(self.roots)  # stores synced into this node's mirrors
        fresh = Registry.scan(paths, previous=previous, check=self._check)
        fresh.problems[:0] = store_problems
        before = {r.name: (r.version, r.content_id) for r in previous}
        after = {r.name: (r.version, r.content_id) for r in fresh}
        router = self._router(fresh)
        self.experts = Experts(fresh, router)
        log_changes(fresh, before, self.metrics, self.model_id)
        return {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "updated": sorted(n for n in after if n in before and after[n] != before[n]),
            "problems": [*fresh.problems, *(router.problems if router else [])],
            "warnings": fresh.shadowing(),
        }

    def _router(self, registry: Registry) -> Any:
        if self.embedder is None:
            return None
        from expertserve.routing.router import Router, RouterConfig

        routing = RouterConfig(
            min_confidence=self.config.routing.min_confidence, base_score=self.config.routing.base_score
        )
        return Router(registry, self.embedder, base_model=self.model_id, config=routing)

    def _follow_engine_shape(self, applied: EngineShape | None) -> None:
        """Experts are checked against the shape every engine runs: the one a restart applied, if any."""
        if applied is not None and not self.engine_shape().covers(applied):
            shape = self.engine_shape().grown(applied)
            self.serving = dataclasses.replace(
                self.serving, max_lora_rank=shape.max_lora_rank, prefix_caching=shape.prefix_caching
            )

    def engine_shape(self) -> EngineShape:
        """The shape experts are checked against here."""
        return EngineShape(self.serving.max_lora_rank, bool(self.serving.prefix_caching))

    def _check(self, record: ExpertRecord) -> list[str]:
        """This server's checks of an expert's files (engine limits, grammars); see serve/expert_checks.py."""
        return [
            *trust_problems(record, self.trust, self.install_root),
            *expert_problems(record, self.serving, xgrammar_compiler if self.compile_grammars else None),
        ]

    def with_store(self, record: ExpertRecord, spec: ExpertSpec) -> ExpertSpec:
        """The spec with the shared store its files are mirrored from, if any (packaging/store.py)."""
        store = store_of(record.root, self.mirrors) if self.mirrors else None
        return (
            spec if store is None else dataclasses.replace(spec, store=store, mirror=str(self.mirrors[store]))
        )

    def spec(self, record: ExpertRecord) -> ExpertSpec:
        """What the engine needs to load `record`."""
        return self.with_store(record, record.engine_spec(self.model_id))

    def is_base(self, model: str) -> bool:
        """Whether `model` names the base model."""
        return model in (self.model_id, "base")

    @staticmethod
    def not_found(model: str) -> ExpertNotFound:
        """The one answer for a model that does not exist, and for one outside the caller's scope (no existence
        leak: the same status, code and text)."""
        return ExpertNotFound(
            f"model {model!r} does not exist; GET /v1/models lists the base model and the experts"
        )

    def resolve(self, model: str) -> ExpertRecord | None:
        """None for the base model; the expert's record otherwise.

        Raises:
            ExpertNotFound: No such model.
            ExpertNotServable: The expert is registered but this server cannot serve it.
        """
        if self.is_base(model):
            return None
        if model not in self.registry:
            raise self.not_found(model)
        record = self.registry.get(model)
        reason = record.unservable_reason(self.model_id)
        if reason:
            raise ExpertNotServable(model, reason)
        return record
