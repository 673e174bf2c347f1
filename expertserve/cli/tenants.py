"""`expertserve tenants`: a tenants file checked offline, and a key's digest for `key_sha256`."""

from __future__ import annotations

import json
import sys
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, UsageError
from expertserve.tenancy.config import TenantsError, key_digest


def run_check(args: Any) -> int:
    """Loads FILE as the server would (with its server config's keys when `--config` names one)."""
    from expertserve.serve.config import ServeConfig
    from expertserve.serve.tenants import load

    config = ServeConfig.load(args.config, environ={}) if args.config else ServeConfig()
    config = config.model_copy(update={"tenants_file": args.file})
    try:
        tenants = load(config)
    except TenantsError as e:
        if args.json:
            print(json.dumps({"file": args.file, "valid": False, "problems": e.problems}))
            return EXIT_FAIL
        raise
    summary: dict[str, dict[str, Any]] = {
        name: {
            "keys": len(t.digests()),
            "experts": t.experts,
            "base_model": t.base_model,
            "limits": t.limits.model_dump(exclude_none=True),
            "expert_limits": {e: lim.model_dump(exclude_none=True) for e, lim in t.expert_limits.items()},
            "weight": t.weight,
        }
        for name, t in sorted(tenants.by_name.items())
    }
    if args.json:
        print(json.dumps({"file": args.file, "valid": True, "tenants": summary}))
        return EXIT_OK
    print(f"{args.file}: valid, {len(summary)} tenant(s)")
    for name, row in summary.items():
        limits = ", ".join(f"{k} {v}" for k, v in row["limits"].items()) or "no limits"
        print(
            f"  {name}: {row['keys']} key(s), experts {', '.join(row['experts'])}, "
            f"base model {'yes' if row['base_model'] else 'no'}, {limits}, weight {row['weight']:g}"
        )
    return EXIT_OK


def run_hash(args: Any) -> int:
    """The SHA-256 of the key on standard input (its one line, without the newline)."""
    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        raise UsageError("no key on standard input (echo -n KEY | expertserve tenants hash)")
    print(key_digest(key))
    return EXIT_OK
