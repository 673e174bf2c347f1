"""`expertserve bench [--quick | --size S] [--json FILE] [--plot FILE]`."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, UsageError


def run(args: Any) -> int:
    """Runs the benchmark, prints the table, writes JSON and PNG."""
    from expertserve.bench.plot import plot
    from expertserve.bench.run import SIZES
    from expertserve.bench.run import run as run_bench
    from expertserve.bench.stats import table
    from expertserve.settings import repo_experts_dir

    size = "quick" if args.quick else args.size
    if args.quick and args.size not in (None, "quick"):
        raise UsageError("--quick and --size: give one of them")
    size = size or "full"
    if size not in SIZES:
        raise UsageError(f"--size: expected one of {', '.join(SIZES)}, got {size!r}")
    json_path = Path(args.json) if args.json else Path("out") / "bench" / f"bench-{size}.json"
    png_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    for p in (json_path, png_path):
        if p.is_dir():
            raise UsageError(f"{p}: is a directory; give a file name")
        try:  # fail now, not after minutes of measuring
            p.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=p.parent):
                pass
        except OSError as e:
            raise UsageError(f"{p}: cannot write there ({e.strerror})") from None

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="expertserve-bench-") as work:
        results = run_bench(size, Path(work), repo_experts_dir().parent, log=log)

    tmp = json_path.with_suffix(json_path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
    tmp.replace(json_path)  # never a half-written file
    plot(results, png_path)

    print(
        f"machine: {results['machine']['cores']} cores, {results['machine']['memory_gib']} GiB, "
        f"{results['machine']['device']}; size {size}; {results['elapsed_s']:.0f} s"
    )
    print(table(results))
    print(f"json: {json_path}\nplot: {png_path}")
    if results["errors"]:
        print(f"error: {results['errors']} requests failed; the figures are not trustworthy", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _finite(value: Any) -> Any:
    """NaN (a figure that could not be measured) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
