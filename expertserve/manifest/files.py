"""The files a manifest refers to, and the checks `validate --strict` runs on them. Pure Python."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from expertserve.manifest.model import ExpertManifest

FileKind = Literal["adapter", "soft_prompt", "grammar", "json_schema", "dataset"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The one tensor of a soft-prompt file: [tokens, hidden], the rows prepended to the input embeddings.
SOFT_PROMPT_TENSOR = "prompt_embeddings"


@dataclass(frozen=True)
class FileRef:
    """A path the manifest names.

    Attributes:
        field: JSON path of the field that names it.
        path: The path as written, relative to the expert directory.
        kind: What the file is.
        packaged: Whether `.expert` packages carry it (datasets stay out).
    """

    field: str
    path: str
    kind: FileKind
    packaged: bool = True


def file_refs(manifest: ExpertManifest) -> list[FileRef]:
    """Every file or directory the manifest refers to."""
    refs: list[FileRef] = []
    for i, (_, adapter) in enumerate(manifest.adapter_entries):
        where = f"base_models[{i}].adapters[0]" if manifest.base_models else "adapters[0]"
        refs.append(FileRef(f"{where}.path", adapter.path, "adapter"))
    for i, sp in enumerate(manifest.soft_prompts):
        refs.append(FileRef(f"soft_prompts[{i}].path", sp.path, "soft_prompt"))
    dec = manifest.training.decoding
    if dec is not None and dec.grammar_file:
        refs.append(FileRef("training.decoding.grammar_file", dec.grammar_file, "grammar"))
    if dec is not None and dec.json_schema_file:
        refs.append(FileRef("training.decoding.json_schema_file", dec.json_schema_file, "json_schema"))
    ds = manifest.training.dataset
    for name in ("path", "validation_path", "test_path"):
        value = getattr(ds, name)
        if value:
            refs.append(FileRef(f"training.dataset.{name}", value, "dataset", packaged=False))
    return refs


def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of a PEFT adapter directory that serving needs."""
    return [adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS]


def check_files(manifest: ExpertManifest, root: Path, *, datasets: bool = True) -> list[str]:
    """Problems with the files the manifest refers to, one line each, starting with the field path.

    Args:
        manifest: The validated manifest.
        root: The expert directory.
        datasets: Whether to require the dataset files (packages do not carry them).
    """
    problems: list[str] = []
    for ref in file_refs(manifest):
        if ref.kind == "dataset" and not datasets:
            continue
        target = root / ref.path
        outside = outside_reason(root, ref.path)
        if outside:  # what `train` and `package` refuse, reported here too (`validate --strict`)
            problems.append(f"{ref.field}: {outside}")
            continue
        problem = _CHECKS[ref.kind](manifest, ref, target)
        if problem:
            problems.append(f"{ref.field}: {problem} ({target})")
    for i, (_, adapter) in enumerate(manifest.adapter_entries):
        where = f"base_models[{i}].adapters[0]" if manifest.base_models else "adapters[0]"
        weights = root / adapter.path / ADAPTER_WEIGHTS
        if weights.is_file():
            if adapter.size_bytes and weights.stat().st_size != adapter.size_bytes:
                problems.append(
                    f"{where}.size_bytes: {adapter.size_bytes} but {weights} has "
                    f"{weights.stat().st_size} bytes"
                )
            if adapter.sha256 and sha256_file(weights) != adapter.sha256:
                problems.append(f"{where}.sha256: does not match {weights}")
    return problems


def outside_reason(root: Path, rel: str) -> str | None:
    """Why `rel` is not a path inside the expert directory `root` (absolute, `..` or a link out of it), or None.
    One rule for `validate --strict` (check_files) and `train` (train/plan.py)."""
    if Path(rel).is_absolute():
        return f"expected a path inside the expert directory, got {rel!r}"
    resolved, base = (root / rel).resolve(), root.resolve()
    if not resolved.is_relative_to(base):
        return f"{rel!r} resolves to {resolved}, outside the expert directory {base}"
    return None


def _check_adapter(manifest: ExpertManifest, ref: FileRef, target: Path) -> str | None:
    if not target.is_dir():
        return "adapter directory not found"
    missing = [p.name for p in adapter_files(target) if not p.is_file()]
    if missing:
        return f"adapter directory lacks {', '.join(missing)}"
    try:
        config = json.loads((target / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        read_safetensors_header(target / ADAPTER_WEIGHTS)
    except (ValueError, OSError) as e:
        return f"unreadable adapter: {e}"
    if not isinstance(config, dict):
        return f"{ADAPTER_CONFIG} is not a JSON object"
    return None


def _check_soft_prompt(manifest: ExpertManifest, ref: FileRef, target: Path) -> str | None:
    if not target.is_file():
        return "soft prompt file not found"
    index = int(ref.field.split("[")[1].split("]")[0])
    tokens = manifest.soft_prompts[index].tokens
    try:
        shape = soft_prompt_shape(target)
    except ValueError as e:
        return str(e)
    if shape[0] != tokens:
        return f"tensor has {shape[0]} rows but tokens is {tokens}"
    return None


def _check_grammar(manifest: ExpertManifest, ref: FileRef, target: Path) -> str | None:
    if not target.is_file():
        return "grammar file not found"
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"unreadable grammar: {e}"
    if "::=" not in text:
        return "not a GBNF grammar (no 'rule ::= ...' line)"
    return None


def _check_json_schema(manifest: ExpertManifest, ref: FileRef, target: Path) -> str | None:
    if not target.is_file():
        return "JSON schema file not found"
    try:
        schema = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not a JSON file: {e}"
    return None if isinstance(schema, dict) else "a JSON schema must be an object"


def _check_dataset(manifest: ExpertManifest, ref: FileRef, target: Path) -> str | None:
    return None if target.is_file() else "dataset file not found"


_CHECKS = {
    "adapter": _check_adapter,
    "soft_prompt": _check_soft_prompt,
    "grammar": _check_grammar,
    "json_schema": _check_json_schema,
    "dataset": _check_dataset,
}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without torch.

    Raises:
        ValueError: The file is not a well-formed safetensors file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError("not a safetensors file (header length out of range)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not an object)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise ValueError("not a safetensors file (a tensor entry lacks integer data_offsets)") from None
    if 8 + n + end > size:
        raise ValueError("truncated safetensors file (data ends past the end of the file)")
    return header


def soft_prompt_shape(path: Path) -> tuple[int, int]:
    """The [tokens, hidden] shape of a soft-prompt file.

    Raises:
        ValueError: Not a safetensors file with exactly the `prompt_embeddings` 2-D tensor.
    """
    header = read_safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if list(tensors) != [SOFT_PROMPT_TENSOR]:
        raise ValueError(f"expected one tensor named {SOFT_PROMPT_TENSOR!r}, found {sorted(tensors)}")
    entry = tensors[SOFT_PROMPT_TENSOR]
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and d > 0 for d in shape):
        raise ValueError(f"expected a [tokens, hidden] tensor of positive sizes, got shape {shape!r}")
    return shape[0], shape[1]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
