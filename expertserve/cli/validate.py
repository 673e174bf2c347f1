"""`expertserve validate`: strict manifest checks and the status of every field."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, UsageError
from expertserve.engine.hardware import choose_dtype
from expertserve.errors import ExpertserveError, ManifestError, PackageError
from expertserve.manifest.files import check_files, file_refs
from expertserve.manifest.load import MANIFEST_FILE, LoadedManifest, load_manifest
from expertserve.manifest.status import RuntimeContext, field_statuses
from expertserve.models.offline import DEFAULT_MODEL
from expertserve.packaging.archive import SUFFIX, extract_verified
from expertserve.packaging.trust import TrustPolicy
from expertserve.registry import ExpertRecord

VALUE_WIDTH = 60


def run(args: Any) -> int:
    """Validates every PATH; exit 1 when any is invalid."""
    targets = expand_targets([Path(p) for p in args.paths])
    ctx = RuntimeContext.detect()
    results = [validate_path(t, strict=args.strict, ctx=ctx) for t in targets]
    ok = all(r["valid"] for r in results)
    dtype, why = choose_dtype("auto", gpu=ctx.device == "cuda")
    if args.json:
        print(
            json.dumps(
                {
                    "valid": ok,
                    "strict": args.strict,
                    "device": ctx.device,
                    "engine_dtype": {"dtype": dtype, "why": why},
                    "results": results,
                },
                indent=2,
            )
        )
    else:
        for r in results:
            print(render(r))
        print(f"{sum(r['valid'] for r in results)} of {len(results)} valid")
        print(f"served here with engine dtype {dtype} by default ({why})")
    return EXIT_OK if ok else EXIT_FAIL


def expand_targets(paths: list[Path]) -> list[Path]:
    """Each path as given, except a directory of experts, which stands for the experts inside it.

    Raises:
        UsageError: A path does not exist.
    """
    targets: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path}: no such file or directory")
        if path.is_dir() and not (path / MANIFEST_FILE).exists():
            inner = sorted(p for p in path.iterdir() if (p / MANIFEST_FILE).is_file())
            targets.extend(inner or [path])  # an empty dir is reported as "no manifest.json"
        else:
            targets.append(path)
    return targets


def validate_path(path: Path, *, strict: bool, ctx: RuntimeContext) -> dict[str, Any]:
    """The report for one expert directory, manifest file or package; every failure is a report (`--json` always
    prints one object)."""
    kind = "package" if path.name.endswith(SUFFIX) else "directory" if path.is_dir() else "manifest"
    try:
        return _validate_path(path, strict=strict, ctx=ctx)
    except (ExpertserveError, OSError, UnicodeDecodeError) as e:
        return _failed(path, kind, [str(e)])
    except Exception as e:  # a bug of ours: still one report, never a half-printed JSON document
        return _failed(path, kind, [f"internal error: {type(e).__name__}: {e}"])


def _validate_path(path: Path, *, strict: bool, ctx: RuntimeContext) -> dict[str, Any]:
    if path.is_file() and path.name.endswith(SUFFIX):
        with tempfile.TemporaryDirectory(prefix="expertserve-validate-") as scratch:
            try:
                info, tree = extract_verified(path, Path(scratch) / "x")
            except PackageError as e:
                return _failed(path, "package", [str(e)])
            report = _report(path, "package", load_manifest(tree), strict=strict, ctx=ctx, datasets=False)
            report["package"] = {
                "files": len(info.files),
                "signer": info.signer,
                "signed_at": info.signed_at,
                "trusted": TrustPolicy.build().trusts(info.signer),
            }
            return report
    kind = "directory" if path.is_dir() else "manifest"
    try:
        loaded = load_manifest(path)
    except ManifestError as e:
        return _failed(path, kind, e.problems)
    return _report(path, kind, loaded, strict=strict, ctx=ctx, datasets=True)


def _report(
    path: Path, kind: str, loaded: LoadedManifest, *, strict: bool, ctx: RuntimeContext, datasets: bool
) -> dict[str, Any]:
    manifest = loaded.manifest
    errors = check_files(manifest, loaded.root, datasets=datasets) if strict else []
    notes = []
    if strict and not datasets:
        notes += [
            f"{r.field}: {r.path} is not packaged (datasets stay out of packages); not checked"
            for r in file_refs(manifest)
            if not r.packaged
        ]
    fields = [vars(f) for f in field_statuses(manifest, ctx)]
    summary = {s: sum(f["status"] == s for f in fields) for s in ("active", "planned", "not applicable")}
    reason = ExpertRecord(loaded, origin=str(path)).unservable_reason(DEFAULT_MODEL.model_id)
    return {
        "path": str(path),
        "kind": kind,
        "valid": not errors,
        "name": manifest.name,
        "version": manifest.version,
        "schema_version": manifest.effective_schema_version,
        "errors": errors,
        "notes": notes,
        "summary": summary,
        "fields": fields,
        "serving": {"base_model": DEFAULT_MODEL.model_id, "servable": reason is None, "reason": reason},
    }


def _failed(path: Path, kind: str, errors: list[str]) -> dict[str, Any]:
    return {"path": str(path), "kind": kind, "valid": False, "errors": errors, "fields": []}


def render(r: dict[str, Any]) -> str:
    """Text form of one report."""
    if "name" not in r:
        lines = [f"{r['path']}: INVALID"]
        return "\n".join(lines + [f"  error: {e}" for e in r["errors"]]) + "\n"
    head = f"{r['path']}: {r['name']} {r['version']} (schema {r['schema_version']}): "
    lines = [head + ("valid" if r["valid"] else "INVALID")]
    lines += [f"  error: {e}" for e in r["errors"]] + [f"  note: {n}" for n in r["notes"]]
    serving = r["serving"]
    verdict = "yes" if serving["servable"] else f"no, {serving['reason']}"
    lines.append(f"  served on {serving['base_model']}: {verdict}")
    s = r["summary"]
    lines.append(
        f"  fields: {s['active']} active, {s['planned']} planned, {s['not applicable']} not applicable"
    )
    for f in r["fields"]:
        lines.append(f"  {f['status']:<14} {f['path']} = {_short(f['value'])}")
        lines.append(f"  {'':<14}   {f['detail']}")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_WIDTH else text[: VALUE_WIDTH - 3] + "..."
