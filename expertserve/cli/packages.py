"""`expertserve package | verify | install | keygen | list`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, UsageError
from expertserve.models.offline import DEFAULT_MODEL
from expertserve.packaging import archive, signing
from expertserve.registry import Registry
from expertserve.settings import install_dir


def run_package(args: Any) -> int:
    """Writes `<name>-<version>.expert`."""
    expert_dir = Path(args.expert_dir)
    if not expert_dir.is_dir():
        raise UsageError(f"{expert_dir}: not a directory (expected an expert directory with manifest.json)")
    path = archive.build_package(
        expert_dir, Path(args.output), sign_key=Path(args.sign) if args.sign else None
    )
    info = archive.verify_package(path)
    signed = f"signed by {info.signer}" if info.signer else "unsigned"
    print(f"{path} ({path.stat().st_size} bytes, {len(info.files)} files, {signed})")
    return EXIT_OK


def run_verify(args: Any) -> int:
    """Checks a package; exit 1 when any check fails."""
    key = signing.read_public_key(args.public_key) if args.public_key else None
    info = archive.verify_package(Path(args.file), public_key=key)
    if args.json:
        print(
            json.dumps(
                {
                    "valid": True,
                    "name": info.name,
                    "version": info.version,
                    "files": info.files,
                    "signer": info.signer,
                    "signed_at": info.signed_at,
                },
                indent=2,
            )
        )
    else:
        signed = f"signature OK, signed by {info.signer} at {info.signed_at}" if info.signer else "unsigned"
        print(
            f"{args.file}: {info.name} {info.version}: {len(info.files)} files, every SHA-256 matches; {signed}"
        )
    return EXIT_OK


def run_install(args: Any) -> int:
    """Verifies and installs a package."""
    key = signing.read_public_key(args.public_key) if args.public_key else None
    target = archive.install_package(Path(args.file), install_dir(args.dir), public_key=key, force=args.force)
    print(f"installed {args.file} at {target}")
    return EXIT_OK


def run_keygen(args: Any) -> int:
    """Creates a signing key pair."""
    public = signing.generate_key(Path(args.output), force=args.force)
    print(f"private key: {args.output} (keep it secret)\npublic key:  {args.output}.pub  {public}")
    return EXIT_OK


def run_list(args: Any) -> int:
    """Lists registered experts; exit 1 when some could not be registered."""
    roots = [Path(d) for d in args.experts_dir] if args.experts_dir else [Path("experts"), install_dir()]
    registry = Registry.scan(roots)
    rows = []
    for record in registry:
        reason = record.unservable_reason(DEFAULT_MODEL.model_id)
        rows.append(
            {
                "name": record.name,
                "version": record.version,
                "versions": registry.versions(record.name),
                "path": str(record.root),
                "servable": reason is None,
                "reason": reason,
            }
        )
    if args.json:
        print(json.dumps({"experts": rows, "problems": registry.problems}, indent=2))
    else:
        for row in rows:
            serving = "servable" if row["servable"] else f"not servable: {row['reason']}"
            print(f"{row['name']:<28} {row['version']:<10} {row['path']}  ({serving})")
        for problem in registry.problems:
            print(f"problem: {problem}")
    return EXIT_FAIL if registry.problems else EXIT_OK
