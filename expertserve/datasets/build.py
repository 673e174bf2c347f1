"""Regenerates the shipped experts' datasets: `python -m expertserve.datasets.build [--experts-dir DIR]`.

Deterministic (fixed seeds). Every gold answer is checked with its expert's own scorer before it is written,
so a dataset never ships a wrong answer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from expertserve.datasets import json_extract, sql, typescript
from expertserve.datasets.common import Example, answer, split, write_jsonl
from expertserve.settings import repo_experts_dir

SEED = 1234
SIZES = {  # (total examples, valid, test)
    "expert-sql": (1600, 100, 150),
    "expert-json": (1400, 100, 150),
}


def build_sql(out: Path) -> dict[str, list[Example]]:
    """SQLite database plus question/query splits."""
    out.mkdir(parents=True, exist_ok=True)
    schema = sql.build_database(out / sql.DB_FILE)
    total, valid, test = SIZES["expert-sql"]
    examples = sql.generate(out / sql.DB_FILE, schema, total, SEED)
    bad = [e for e in examples if not sql.score(answer(e), e["meta"], out)]
    assert not bad, f"{len(bad)} gold queries fail their own scorer"
    return split(examples, SEED, valid, test)


def build_json() -> dict[str, list[Example]]:
    """Extraction splits."""
    total, valid, test = SIZES["expert-json"]
    examples = json_extract.generate(total, SEED)
    assert all(json_extract.score(answer(e), e["meta"]) for e in examples)
    return split(examples, SEED, valid, test)


def build_typescript() -> dict[str, list[Example]]:
    """Function-writing splits; each reference implementation passes tsc --strict and its tests."""
    examples = typescript.generate(SEED)
    ok = typescript.score_many([answer(e) for e in examples], [e["meta"] for e in examples])
    bad = [e["meta"]["name"] for e, good in zip(examples, ok, strict=True) if not good]
    assert not bad, f"reference implementations fail: {bad}"
    held_out = [e for e in examples if e["meta"]["held_out"]]
    seen = split([e for e in examples if not e["meta"]["held_out"]], SEED, valid=60, test=0)
    return {"test": held_out[:120], "valid": seen["valid"], "train": seen["train"]}


def main(argv: list[str] | None = None) -> int:
    """Writes data/{train,valid,test}.jsonl for each shipped expert."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts-dir", type=Path, default=repo_experts_dir())
    parser.add_argument("--only", choices=["expert-sql", "expert-json", "expert-typescript"])
    args = parser.parse_args(argv)
    builders = {
        "expert-sql": lambda d: build_sql(d),
        "expert-json": lambda d: build_json(),
        "expert-typescript": lambda d: build_typescript(),
    }
    for name, build in builders.items():
        if args.only and name != args.only:
            continue
        data_dir = args.experts_dir / name / "data"
        splits = build(data_dir)
        for part, examples in splits.items():
            write_jsonl(data_dir / f"{part}.jsonl", examples)
        print(f"{name}: " + ", ".join(f"{part} {len(ex)}" for part, ex in splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
