"""The expert registry: finds experts on disk, keeps their versions, and answers what serving and routing need.

Pure Python: no ray, vllm or torch. Experts come from roots scanned in order (the repository's `experts/`
first, then the install directory). A root holds expert directories (`<root>/<dir>/manifest.json`) or
installed versions (`<root>/<name>/<version>/manifest.json`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from expertserve.engine.request import ExpertSpec
from expertserve.errors import ExpertNotFound, ExpertNotServable, ManifestError, RegistryError
from expertserve.manifest.files import check_files
from expertserve.manifest.load import MANIFEST_FILE, LoadedManifest, load_manifest
from expertserve.manifest.model import Adapter, Decoding, ExpertManifest, Routing, SoftPrompt
from expertserve.packaging.archive import read_provenance
from expertserve.packaging.digests import file_digest

SERVABLE_ADAPTERS = frozenset({"lora"})


def version_key(version: str) -> tuple[int, int, int]:
    """Sort key of a MAJOR.MINOR.PATCH version."""
    major, minor, patch = (int(p) for p in version.split("."))
    return major, minor, patch


def config_rank(config: Any, default: int = 0) -> int:
    """The largest LoRA rank an `adapter_config.json` holds: its `r` and every `rank_pattern` value (PEFT gives
    modules matching a pattern their own rank); `default` when it names none."""
    if not isinstance(config, dict):
        return default
    pattern = config.get("rank_pattern")
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [])]
    valid = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    return max(valid, default=default)


@dataclass(frozen=True)
class ExpertRecord:
    """One version of one expert, as found on disk.

    Attributes:
        loaded: The validated manifest and its file.
        origin: The expert root it was found in.
        broken: Why its files cannot be served (a missing adapter, a soft prompt of the wrong shape, a grammar that
            does not compile...), found by the checks a server runs on every scan; None when they pass.
    """

    loaded: LoadedManifest
    origin: str
    broken: str | None = None

    @property
    def manifest(self) -> ExpertManifest:
        """The validated manifest."""
        return self.loaded.manifest

    @property
    def name(self) -> str:
        """Expert name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Expert version."""
        return self.manifest.version

    @property
    def root(self) -> Path:
        """The expert directory; manifest paths are relative to it."""
        return self.loaded.root

    @property
    def decoding(self) -> Decoding:
        """Default decoding from the manifest."""
        return self.manifest.decoding

    @property
    def routing(self) -> Routing | None:
        """Routing block, if any."""
        return self.manifest.routing

    @property
    def soft_prompts(self) -> list[tuple[SoftPrompt, Path]]:
        """Soft prompts with their absolute file paths."""
        return [(sp, self.root / sp.path) for sp in self.manifest.soft_prompts]

    def adapter_for(self, base_model: str, aliases: Iterable[str] = ()) -> tuple[Adapter, Path] | None:
        """The adapter trained for `base_model` (matched by name or any alias) and its directory."""
        adapter = self.manifest.adapter_for(base_model, aliases)
        return None if adapter is None else (adapter, self.root / adapter.path)

    def adapter_rank(self, base_model: str, aliases: Iterable[str] = ()) -> int:
        """The LoRA rank of the adapter for `base_model`: the largest of `r` and `rank_pattern` in its
        `adapter_config.json`, else the manifest's `r` (0: no adapter, or no rank)."""
        found = self.adapter_for(base_model, aliases)
        if found is None:
            return 0
        adapter, directory = found
        try:
            config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return adapter.r or 0
        return config_rank(config, adapter.r or 0)

    def unservable_reason(self, base_model: str, aliases: Iterable[str] = ()) -> str | None:
        """Why a vLLM server running `base_model` cannot serve this expert, or None when it can."""
        if self.broken:
            return self.broken
        found = self.adapter_for(base_model, aliases)
        if found is None:
            trained = ", ".join(b.name for b in self.manifest.base_model_entries)
            return f"trained for base model(s) {trained}, not {base_model}"
        adapter, _ = found
        if adapter.effective_type not in SERVABLE_ADAPTERS:
            return (
                f"its adapter is {adapter.effective_type.upper()}: vLLM hot-swaps LoRA adapters only "
                "(merge it into a LoRA or serve it from a dedicated base model)"
            )
        return None

    @cached_property
    def content_id(self) -> str:
        """Identity of what an engine loads: the manifest's bytes and the path and SHA-256 of every adapter and
        soft-prompt file. Contents only (no modification times), so the same package mirrored on two nodes, or
        installed again after a restart, keeps its engine cache key; digests are cached per file stat."""
        digest = hashlib.sha256(self.loaded.path.read_bytes() if self.loaded.path.is_file() else b"")
        files = [
            p
            for _, adapter in self.manifest.adapter_entries
            for p in sorted((self.root / adapter.path).glob("*"))
        ]
        files += [path for _, path in self.soft_prompts]
        for path in files:
            digest.update(f"{path.relative_to(self.root)}:{file_digest(path)}\n".encode())
        return digest.hexdigest()

    @cached_property
    def provenance(self) -> dict[str, Any] | None:
        """Where an installed expert came from (`.provenance.json`: package, its hash, signer); None for an expert
        directory that was not installed from a package."""
        return read_provenance(self.root)

    @property
    def source(self) -> str:
        """One phrase for reports: a local directory, or the package and who signed it."""
        if self.provenance is None:
            return f"local directory {self.root}"
        signer = self.provenance.get("signer")
        signed = f"signed by {signer}" if signer else "unsigned"
        return f"package {self.provenance.get('package')} ({signed})"

    def engine_spec(self, base_model: str, aliases: Iterable[str] = ()) -> ExpertSpec:
        """What an engine needs to load this expert for `base_model`.

        Raises:
            ExpertNotServable: The expert has no servable adapter for `base_model`.
        """
        reason = self.unservable_reason(base_model, aliases)
        found = self.adapter_for(base_model, aliases)
        if reason is not None or found is None:
            raise ExpertNotServable(self.name, reason or f"no adapter for {base_model}")
        return ExpertSpec(
            self.name,
            self.version,
            self.content_id,
            str(found[1]),
            tuple(str(path) for _, path in self.soft_prompts),
        )

    def file_problems(self, *, datasets: bool = True) -> list[str]:
        """Missing or malformed files the manifest refers to."""
        return check_files(self.manifest, self.root, datasets=datasets)


@dataclass
class Registry:
    """Every expert version found, indexed by name; the latest version answers a bare name.

    Attributes:
        problems: Experts that could not be registered (invalid manifests, clashes), one line each.
    """

    _by_name: dict[str, dict[str, ExpertRecord]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def scan(
        cls,
        roots: Sequence[str | Path],
        *,
        strict: bool = False,
        previous: Registry | None = None,
        check: Callable[[ExpertRecord], list[str]] | None = None,
    ) -> Registry:
        """Builds a registry from expert roots, searched in order. Missing roots are skipped.

        Args:
            roots: Directories holding experts.
            strict: Raise on the first problem instead of recording it.
            previous: The registry being replaced (a reload): an expert whose manifest no longer validates keeps
                the version it had there, so one bad edit never takes a good expert down.
            check: Problems with a record's files for the server at hand; a record with any is registered but
                `broken` (not servable, and says why).

        Raises:
            RegistryError: With strict=True, on an invalid manifest or a clash.
        """
        registry = cls()
        kept = {r.loaded.path.resolve(): r for r in previous.all_records()} if previous else {}
        for root in roots:
            for manifest_file in _manifest_files(Path(root)):
                try:
                    record = ExpertRecord(load_manifest(manifest_file), origin=str(root))
                    problems = check(record) if check else []
                    if problems:
                        record = replace(record, broken="; ".join(problems))
                        registry.problems.append(
                            f"{manifest_file}: {record.name} {record.version} is not "
                            f"servable: {record.broken}"
                        )
                    registry.add(record)
                except (ManifestError, RegistryError) as e:
                    if strict:
                        raise RegistryError(str(e)) from None
                    last = kept.get(manifest_file.resolve())
                    if last is not None and last.version not in registry._by_name.get(last.name, {}):
                        registry._by_name.setdefault(last.name, {})[last.version] = last
                        registry.problems.append(
                            f"{e} (still serving {last.name} {last.version}, its last valid version)"
                        )
                    else:
                        registry.problems.append(str(e))
        return registry

    def all_records(self) -> Iterator[ExpertRecord]:
        """Every registered version of every expert."""
        return (record for versions in self._by_name.values() for record in versions.values())

    def add(self, record: ExpertRecord) -> None:
        """Registers one expert version.

        Expert names match `^expert-...`, so they never collide with `auto` or a base model id. A version is
        identified by its name, version and source: when two sources define the same one, a servable record
        (a trusted signer, where the server checks trust) takes the place of a broken one, whichever was found
        first, so an unsigned package in a store can never take a trusted expert offline.

        Raises:
            RegistryError: This name and version are already registered (the record that stays is named).
        """
        versions = self._by_name.setdefault(record.name, {})
        current = versions.get(record.version)
        if current is None:
            versions[record.version] = record
            return
        if _rank(record) > _rank(current):
            versions[record.version] = record
            raise RegistryError(
                f"name clash: {record.name} {record.version} is defined twice; {record.loaded.path} "
                f"({record.source}) is used, not {current.loaded.path} ({current.source})"
                + (f", which is not servable: {current.broken}" if current.broken else ", which is unsigned")
            )
        raise RegistryError(
            f"name clash: {record.name} {record.version} is defined twice, by {current.loaded.path} "
            f"({current.source}) and by {record.loaded.path} ({record.source}); the first one is used "
            "(bump a version or remove one)"
        )

    def remove(self, name: str, version: str | None = None) -> None:
        """Unregisters one version, or every version of a name.

        Raises:
            ExpertNotFound: Nothing by that name (and version).
        """
        self.get(name, version)
        if version is None:
            del self._by_name[name]
        else:
            del self._by_name[name][version]
            if not self._by_name[name]:
                del self._by_name[name]

    def get(self, name: str, version: str | None = None) -> ExpertRecord:
        """An expert by name: the given version, or the latest (the latest whose files are not broken, if any).

        Raises:
            ExpertNotFound: No such expert or version.
        """
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ExpertNotFound(f"no expert named {name!r} (registered: {known})")
        if version is None:  # the latest servable version answers; a broken newer one does not take it down
            good = [v for v, record in versions.items() if record.broken is None]
            return versions[max(good or versions, key=version_key)]
        if version not in versions:
            raise ExpertNotFound(f"{name} has no version {version} (have: {', '.join(self.versions(name))})")
        return versions[version]

    def versions(self, name: str) -> list[str]:
        """Registered versions of a name, oldest first."""
        return sorted(self._by_name.get(name, {}), key=version_key)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ExpertRecord]:
        """The latest version of every expert, by name."""
        return (self.get(n) for n in self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    def servable(self, base_model: str, aliases: Iterable[str] = ()) -> list[ExpertRecord]:
        """Latest versions a vLLM server running `base_model` can serve."""
        aliases = tuple(aliases)
        return [r for r in self if r.unservable_reason(base_model, aliases) is None]

    def shadowing(self) -> list[str]:
        """One warning per expert whose versions come from several roots or signers: the latest servable version
        takes all of the name's traffic, so an installed package can take an expert over from another source."""
        warnings = []
        for name in self.names():
            versions = self._by_name[name]
            sources = {
                (r.origin, (r.provenance or {}).get("signer") if r.provenance else "local")
                for r in versions.values()
            }
            if len(sources) < 2:
                continue
            answering = self.get(name)
            others = ", ".join(
                f"{v} from {versions[v].origin}: {versions[v].source}"
                for v in self.versions(name)
                if v != answering.version
            )
            warnings.append(
                f"{name} {answering.version} from {answering.origin} ({answering.source}) shadows {others}; "
                f"it takes every request for {name}"
            )
        return warnings

    def max_lora_rank(self, base_model: str, aliases: Iterable[str] = ()) -> int:
        """The largest LoRA rank among servable experts (what the engine must be sized for); 0 if none. Servable
        excludes broken records, so where the scan checks trust an untrusted package never sizes the engines; the
        rank is the adapter's own (`adapter_config.json`, what the engine loads), not the manifest's claim."""
        aliases = tuple(aliases)
        return max(
            (r.adapter_rank(base_model, aliases) for r in self.servable(base_model, aliases)), default=0
        )


def _rank(record: ExpertRecord) -> tuple[bool, bool]:
    """Which of two records of one name and version answers: servable first, then signed."""
    return record.broken is None, bool((record.provenance or {}).get("signer"))


def _manifest_files(root: Path) -> list[Path]:
    """`<root>/*/manifest.json` and `<root>/*/*/manifest.json`, sorted; a directory with a manifest is a leaf."""
    if not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / MANIFEST_FILE).is_file():
            found.append(child / MANIFEST_FILE)
        else:
            found.extend(sorted(g / MANIFEST_FILE for g in child.iterdir() if (g / MANIFEST_FILE).is_file()))
    return found
