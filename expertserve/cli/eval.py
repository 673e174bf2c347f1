"""`expertserve eval EXPERT_DIR [--json] [--limit N] [--no-write] [--split test|valid] [--expert-only]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_OK, UsageError, claim_stdout


def run(args: Any) -> int:
    """Evaluates and prints the scores."""
    from expertserve.eval.runner import EvalSettings, evaluate

    expert_dir = Path(args.expert_dir)
    if not expert_dir.is_dir():
        raise UsageError(f"{expert_dir}: not a directory (expected an expert directory with manifest.json)")
    out = claim_stdout()
    settings = EvalSettings(
        limit=args.limit,
        write=not args.no_write,
        split=args.split,
        expert_only=args.expert_only,
        base_model_dir=Path(args.base_model) if args.base_model else None,
        base_model_id=args.base_model_id,
    )
    # Progress on stderr; stdout stays the report.
    report = evaluate(expert_dir, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
        return EXIT_OK
    lines = [
        f"{report.expert}: {report.metric} on {report.n} {report.split} examples ({report.seconds:.0f} s)"
    ]
    if report.base_score is None or report.improvement is None:
        lines.append(f"  expert      {report.expert_score:6.1%}")
    else:
        lines += [
            f"  base model  {report.base_score:6.1%}",
            f"  expert      {report.expert_score:6.1%}   ({100 * report.improvement:+.1f} points)",
        ]
    lines += [f"  {name:<11} {score:6.1%}" for name, score in report.ablation.items()]
    if report.well_formed_metric:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in report.well_formed.items())
        lines.append(f"  {report.well_formed_metric}: {shares}")
    lines.append(f"  decoding: {report.decoding}")
    if not args.no_write and args.split == "test" and not args.expert_only:
        lines.append(f"  written to {expert_dir / 'manifest.json'} (quality_metrics)")
    print("\n".join(lines), file=out)
    return EXIT_OK
