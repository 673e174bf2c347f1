"""`expertserve package | verify | install | keygen | list`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, UsageError
from expertserve.models.offline import DEFAULT_MODEL
from expertserve.packaging import archive, signing, store
from expertserve.packaging.trust import TrustPolicy
from expertserve.registry import Registry
from expertserve.serve.config import ServeConfig
from expertserve.settings import default_expert_roots, install_dir


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
    trusted = TrustPolicy.build().trusts(info.signer)
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
                    "trusted": trusted,
                    "sha256": info.sha256,
                },
                indent=2,
            )
        )
    else:
        signed = f"signature OK, signed by {info.signer} at {info.signed_at}" if info.signer else "unsigned"
        trust = "a trusted key" if trusted else "not a trusted key ($EXPERTSERVE_TRUSTED_KEYS)"
        print(
            f"{args.file}: {info.name} {info.version}: {len(info.files)} files, every SHA-256 matches; {signed}; "
            f"{trust}"
        )
    return EXIT_OK


def run_install(args: Any) -> int:
    """Verifies a package, checks its signer against the trust policy and installs it; warns when the expert
    shadows one from another root or signer."""
    key = signing.read_public_key(args.public_key) if args.public_key else None
    config = ServeConfig.load(args.config) if args.config else None
    policy = TrustPolicy.build(
        [*args.trusted_key, *(config.trusted_keys if config else [])],
        allow_untrusted=args.allow_untrusted or bool(config and config.allow_untrusted),
    )
    if args.dir and store.is_store(args.dir):
        try:
            uri = store.check_uri(args.dir)
        except store.StoreError as e:
            raise UsageError(f"--dir: {e}") from None
        where, info = store.upload(Path(args.file), uri, public_key=key, policy=policy, force=args.force)
        trust = (
            "signed by a trusted key"
            if policy.trusts(info.signer)
            else "NOT signed by a trusted key (allowed)"
        )
        print(
            f"uploaded {args.file} to {where} ({trust}); servers with this store among their expert roots "
            "serve it after their next reload"
        )
        return EXIT_OK
    root = install_dir(args.dir)
    target = archive.install_package(Path(args.file), root, public_key=key, policy=policy, force=args.force)
    provenance = archive.read_provenance(target) or {}
    signer = provenance.get("signer")
    trust = "signed by a trusted key" if policy.trusts(signer) else "NOT signed by a trusted key (allowed)"
    print(f"installed {args.file} at {target} ({trust})")
    roots = (
        [Path(d) for d in config.experts_dirs] if config and config.experts_dirs else default_expert_roots()
    )
    registry = Registry.scan([*[r for r in roots if r.resolve() != root.resolve()], root])
    for warning in registry.shadowing():
        if target.parent.name in warning:
            print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def run_keygen(args: Any) -> int:
    """Creates a signing key pair."""
    public = signing.generate_key(Path(args.output), force=args.force)
    print(f"private key: {args.output} (keep it secret)\npublic key:  {args.output}.pub  {public}")
    return EXIT_OK


def run_list(args: Any) -> int:
    """Lists registered experts; exit 1 when some could not be registered."""
    wanted = args.experts_dir or [Path("experts"), install_dir()]
    roots, store_problems = store.local_roots(wanted)
    registry = Registry.scan(roots)
    registry.problems[:0] = store_problems
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
