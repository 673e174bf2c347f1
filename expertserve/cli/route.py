"""`expertserve route "PROMPT" [--json]`, `route --explain PROMPT`, `route --eval FILE [--json]`, `route --bench`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_OK, UsageError


def build_router(experts_dirs: list[str] | None, base_model: str) -> Any:
    """A router over the registry's servable experts, with the offline embedder."""
    from expertserve.registry import Registry
    from expertserve.routing.embedder import Embedder
    from expertserve.routing.router import Router
    from expertserve.settings import default_expert_roots

    return Router(Registry.scan(experts_dirs or default_expert_roots()), Embedder(), base_model=base_model)


def run(args: Any) -> int:
    """Routes one prompt, or evaluates a labelled file."""
    from expertserve.routing.evaluate import evaluate, read_labelled

    if sum(x is not None and x is not False for x in (args.prompt, args.eval, args.bench, args.explain)) != 1:
        raise UsageError("give one of PROMPT, --explain PROMPT, --eval FILE, --bench")
    if args.bench:
        return _bench(args)
    rows = read_labelled(Path(args.eval)) if args.eval else None
    router = build_router(args.experts_dir, args.base_model)
    if args.explain is not None:
        return _explain(router.explain(args.explain), as_json=args.json)
    if rows is None:
        decision = router.route(args.prompt)
        if args.json:
            print(json.dumps(decision.to_dict(), indent=2))
        else:
            print(
                f"{decision.expert or 'base model'} (confidence {decision.confidence:.2f}, {decision.method})"
            )
            for c in decision.candidates:
                extra = (
                    f" excluded by {c.excluded}"
                    if c.excluded
                    else (f" keywords {c.keywords}" if c.keywords else "")
                )
                print(f"  {c.expert:<24} score {c.score:6.3f}  semantic {c.semantic:5.3f}{extra}")
        return EXIT_OK
    report = evaluate(router, rows)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(
        f"{report['n']} prompts: in-domain accuracy {report['in_domain_accuracy']:.1%}, "
        f"off-domain accuracy {report['off_domain_accuracy']:.1%}"
    )
    for name, recall in report["per_expert_recall"].items():
        print(f"  recall {name:<24} {recall:.1%}")
    names = sorted(report["confusion"])
    print("  confusion (rows: label, columns: routed to)")
    print("  " + " " * 20 + "".join(f"{n[:14]:>15}" for n in names))
    for a in names:
        print(f"  {a[:20]:<20}" + "".join(f"{report['confusion'][a].get(b, 0):>15}" for b in names))
    return EXIT_OK


def _explain(report: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(
        f"{report['expert'] or 'base model'} (confidence {report['confidence']:.2f}, {report['method']}; "
        f"margin over the runner-up {report['margin']:.3f})"
    )
    cues = report["cues"]
    print(
        f"  base model      score {report['base_score']:6.3f}  prose cues {cues['prose'] or 'none'}; "
        f"artifact cues {cues['artifact'] or 'none'}"
    )
    for c in report["candidates"]:
        evidence = f"keywords {c['keywords']}" if c["keywords"] else "no keywords"
        if c["excluded"]:
            evidence = f"excluded by {c['excluded']}"
        print(
            f"  {c['expert']:<15} score {c['score']:6.3f}  semantic {c['semantic']:5.3f}  "
            f"confidence {c['confidence']:.2f}  {evidence}"
        )
        for n in c["nearest"]:
            print(f"      {n['similarity']:5.3f}  {n['text'][:100]!r}")
    return EXIT_OK


def _bench(args: Any) -> int:
    from expertserve.registry import Registry
    from expertserve.routing.bench import run_bench
    from expertserve.routing.embedder import Embedder
    from expertserve.routing.evaluate import read_labelled
    from expertserve.settings import default_expert_roots

    roots = args.experts_dir or default_expert_roots()
    heldout = Path(__file__).resolve().parents[2] / "configs" / "routing" / "heldout.jsonl"
    prompts = [r["prompt"] for r in read_labelled(heldout) if r.get("prompt", "").strip()]
    results = run_bench(
        Embedder(), Registry.scan(roots), args.base_model, prompts, n=args.bench_n, synthetic=args.synthetic
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return EXIT_OK
    print(f"{'registry':<12}{'experts':>8}{'p50 ms':>9}{'p99 ms':>9}{'target p99':>12}  result")
    for key, r in results.items():
        print(
            f"{key:<12}{r['experts']:>8}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['target_p99_ms']:>12}  "
            f"{'pass' if r['pass'] else 'FAIL'}"
        )
    return EXIT_OK
