"""expert-typescript data: short typed functions from a one-sentence description, with tests; the scorer.

Each task family has several names, phrasings, a reference implementation and test cases. The generator
checks every reference implementation with the scorer itself, so no example with a wrong answer ships.
Scoring: the answer type-checks with `tsc --strict` and passes every test case under Node, in a sandbox, with the
expected values checked outside the process under test.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertserve.datasets.common import Example, chat_example
from expertserve.eval import sandbox

SYSTEM = "You write TypeScript. Answer with the function only, fully typed."


@dataclass(frozen=True)
class Family:
    """One kind of task: `{name}` and `{p}` are filled in per example."""

    names: tuple[str, ...]
    params: tuple[str, ...]
    asks: tuple[str, ...]
    signature: str
    body: str
    tests: tuple[tuple[str, str], ...]


FAMILIES = [
    Family(
        ("sumArray", "total", "addAll", "sumOf"),
        ("xs", "nums", "values"),
        ("returns the sum of the numbers in {p}", "adds up every number in {p}"),
        "function {name}({p}: number[]): number",
        "  return {p}.reduce((a, b) => a + b, 0);",
        (("[1, 2, 3]", "6"), ("[]", "0"), ("[-4, 4, 10]", "10")),
    ),
    Family(
        ("maxOf", "largest", "biggest", "findMax"),
        ("xs", "nums", "values"),
        ("returns the largest number in {p} (the array is not empty)", "finds the maximum of {p}"),
        "function {name}({p}: number[]): number",
        "  return Math.max(...{p});",
        (("[1, 9, 3]", "9"), ("[-5, -2]", "-2")),
    ),
    Family(
        ("minOf", "smallest", "findMin"),
        ("xs", "nums", "values"),
        ("returns the smallest number in {p} (the array is not empty)", "finds the minimum of {p}"),
        "function {name}({p}: number[]): number",
        "  return Math.min(...{p});",
        (("[4, 2, 8]", "2"), ("[7]", "7")),
    ),
    Family(
        ("average", "mean", "avg"),
        ("xs", "nums", "values"),
        ("returns the average of {p}, or 0 for an empty array", "computes the mean of {p} (0 when empty)"),
        "function {name}({p}: number[]): number",
        "  if ({p}.length === 0) return 0;\n  return {p}.reduce((a, b) => a + b, 0) / {p}.length;",
        (("[2, 4, 6]", "4"), ("[]", "0"), ("[1, 2]", "1.5")),
    ),
    Family(
        ("countEven", "evens", "numEven"),
        ("xs", "nums", "values"),
        ("counts how many numbers in {p} are even", "returns the number of even values in {p}"),
        "function {name}({p}: number[]): number",
        "  return {p}.filter((x) => x % 2 === 0).length;",
        (("[1, 2, 4, 7]", "2"), ("[]", "0")),
    ),
    Family(
        ("positives", "keepPositive", "onlyPositive"),
        ("xs", "nums", "values"),
        ("returns the numbers in {p} that are greater than zero", "filters {p} down to its positive numbers"),
        "function {name}({p}: number[]): number[]",
        "  return {p}.filter((x) => x > 0);",
        (("[-1, 2, 0, 5]", "[2, 5]"), ("[]", "[]")),
    ),
    Family(
        ("doubleAll", "twice", "doubled"),
        ("xs", "nums", "values"),
        ("returns a new array with every number in {p} multiplied by two", "doubles each element of {p}"),
        "function {name}({p}: number[]): number[]",
        "  return {p}.map((x) => x * 2);",
        (("[1, 2, 3]", "[2, 4, 6]"), ("[]", "[]")),
    ),
    Family(
        ("reverseString", "reversed", "flip"),
        ("s", "text", "str"),
        ("returns the string {p} reversed", "reverses the characters of {p}"),
        "function {name}({p}: string): string",
        '  return {p}.split("").reverse().join("");',
        (('"abc"', '"cba"'), ('""', '""')),
    ),
    Family(
        ("capitalize", "upperFirst", "titleCase"),
        ("s", "word", "text"),
        ("returns {p} with its first letter in upper case", "capitalizes the first character of {p}"),
        "function {name}({p}: string): string",
        "  return {p}.charAt(0).toUpperCase() + {p}.slice(1);",
        (('"hello"', '"Hello"'), ('""', '""'), ('"a b"', '"A b"')),
    ),
    Family(
        ("countVowels", "vowels", "numVowels"),
        ("s", "text", "word"),
        ("counts the vowels (a, e, i, o, u, in any case) in {p}", "returns how many vowels {p} contains"),
        "function {name}({p}: string): number",
        "  return ({p}.match(/[aeiou]/gi) ?? []).length;",
        (('"Hello World"', "3"), ('"xyz"', "0")),
    ),
    Family(
        ("isPalindrome", "palindrome", "readsSame"),
        ("s", "text", "word"),
        ("returns true when {p} reads the same forwards and backwards", "checks whether {p} is a palindrome"),
        "function {name}({p}: string): boolean",
        '  return {p} === {p}.split("").reverse().join("");',
        (('"level"', "true"), ('"abc"', "false"), ('""', "true")),
    ),
    Family(
        ("clamp", "bound", "limit"),
        ("x", "value", "n"),
        ("returns {p} limited to the range from lo to hi", "clamps {p} between lo and hi"),
        "function {name}({p}: number, lo: number, hi: number): number",
        "  return Math.min(hi, Math.max(lo, {p}));",
        (("5, 0, 10", "5"), ("-3, 0, 10", "0"), ("42, 0, 10", "10")),
    ),
    Family(
        ("factorial", "fact", "productUpTo"),
        ("n", "k", "num"),
        ("returns the factorial of {p} (1 for 0)", "computes {p}! for a non-negative integer {p}"),
        "function {name}({p}: number): number",
        "  let result = 1;\n  for (let i = 2; i <= {p}; i++) result *= i;\n  return result;",
        (("0", "1"), ("5", "120"), ("1", "1")),
    ),
    Family(
        ("fibonacci", "fib", "nthFib"),
        ("n", "k", "index"),
        (
            "returns the {p}-th Fibonacci number, with fib(0) = 0 and fib(1) = 1",
            "computes Fibonacci number {p}",
        ),
        "function {name}({p}: number): number",
        "  let a = 0;\n  let b = 1;\n  for (let i = 0; i < {p}; i++) [a, b] = [b, a + b];\n  return a;",
        (("0", "0"), ("1", "1"), ("10", "55")),
    ),
    Family(
        ("range", "upTo", "sequence"),
        ("n", "count", "size"),
        ("returns the array [0, 1, ..., {p} - 1]", "builds an array of the integers from 0 below {p}"),
        "function {name}({p}: number): number[]",
        "  return Array.from({ length: {p} }, (_, i) => i);",
        (("3", "[0, 1, 2]"), ("0", "[]")),
    ),
    Family(
        ("unique", "dedupe", "distinct"),
        ("xs", "items", "values"),
        (
            "returns the numbers of {p} without duplicates, in first-seen order",
            "removes repeated numbers from {p}",
        ),
        "function {name}({p}: number[]): number[]",
        "  return [...new Set({p})];",
        (("[1, 2, 1, 3, 2]", "[1, 2, 3]"), ("[]", "[]")),
    ),
    Family(
        ("joinWords", "commaJoin", "listToString"),
        ("words", "items", "parts"),
        ('joins the strings in {p} with ", " between them', "returns {p} joined by a comma and a space"),
        "function {name}({p}: string[]): string",
        '  return {p}.join(", ");',
        (('["a", "b"]', '"a, b"'), ("[]", '""')),
    ),
    Family(
        ("lastItem", "last", "finalElement"),
        ("xs", "items", "values"),
        (
            "returns the last number in {p}, or undefined when it is empty",
            "gets the final element of {p} if any",
        ),
        "function {name}({p}: number[]): number | undefined",
        "  return {p}.length ? {p}[{p}.length - 1] : undefined;",
        (("[1, 2, 3]", "3"), ("[]", "undefined")),
    ),
    Family(
        ("wordCount", "countWords", "numWords"),
        ("s", "text", "sentence"),
        (
            "counts the words in {p}, separated by spaces",
            "returns the number of space-separated words in {p}",
        ),
        "function {name}({p}: string): number",
        '  return {p}.split(" ").filter((w) => w.length > 0).length;',
        (('"the quick fox"', "3"), ('""', "0"), ('"  a  b "', "2")),
    ),
    Family(
        ("toFahrenheit", "celsiusToF", "cToF"),
        ("c", "celsius", "degrees"),
        ("converts {p} degrees Celsius to Fahrenheit", "returns the Fahrenheit value of {p} Celsius"),
        "function {name}({p}: number): number",
        "  return {p} * 9 / 5 + 32;",
        (("0", "32"), ("100", "212")),
    ),
    Family(
        ("sumOfSquares", "squaresTotal", "sumSquares"),
        ("xs", "nums", "values"),
        ("returns the sum of the squares of the numbers in {p}", "adds up x * x for each x in {p}"),
        "function {name}({p}: number[]): number",
        "  return {p}.reduce((a, x) => a + x * x, 0);",
        (("[1, 2, 3]", "14"), ("[]", "0")),
    ),
    Family(
        ("product", "multiplyAll", "productOf"),
        ("xs", "nums", "values"),
        (
            "returns the product of the numbers in {p} (1 for an empty array)",
            "multiplies every number in {p}",
        ),
        "function {name}({p}: number[]): number",
        "  return {p}.reduce((a, b) => a * b, 1);",
        (("[2, 3, 4]", "24"), ("[]", "1")),
    ),
    Family(
        ("isEven", "even", "divisibleByTwo"),
        ("n", "x", "value"),
        ("returns true when {p} is even", "checks whether the integer {p} is even"),
        "function {name}({p}: number): boolean",
        "  return {p} % 2 === 0;",
        (("4", "true"), ("7", "false")),
    ),
    Family(
        ("countChar", "occurrences", "timesIn"),
        ("s", "text", "str"),
        (
            "counts how many times the character ch occurs in {p}",
            "returns the number of ch characters in {p}",
        ),
        "function {name}({p}: string, ch: string): number",
        "  return {p}.split(ch).length - 1;",
        (('"banana", "a"', "3"), ('"abc", "z"', "0")),
    ),
    Family(
        ("longestWord", "longest", "maxWord"),
        ("words", "items", "list"),
        (
            'returns the longest string in {p} (the first one on ties, "" when empty)',
            "finds the longest word of {p}",
        ),
        "function {name}({p}: string[]): string",
        '  return {p}.reduce((best, w) => (w.length > best.length ? w : best), "");',
        (('["a", "abc", "ab"]', '"abc"'), ("[]", '""')),
    ),
    Family(
        ("chunk", "chunked", "inGroups"),
        ("xs", "items", "values"),
        ("splits {p} into arrays of at most size elements", "groups the numbers of {p} in chunks of size"),
        "function {name}({p}: number[], size: number): number[][]",
        "  const out: number[][] = [];\n  for (let i = 0; i < {p}.length; i += size) out.push({p}.slice(i, i + size));\n  return out;",
        (("[1, 2, 3, 4, 5], 2", "[[1, 2], [3, 4], [5]]"), ("[], 3", "[]")),
    ),
]
TEMPLATES = (
    "Write a TypeScript function {name} that {ask}.",
    "Implement {name} in TypeScript: it {ask}.",
    "Create a typed TypeScript function `{name}` which {ask}.",
)


def generate(seed: int) -> list[Example]:
    """Every (family, name, parameter, phrasing) combination, shuffled. `meta.held_out` marks each family's
    last name: those functions are kept for the test split, so the test asks for names never trained on."""
    rng = random.Random(seed)
    out: list[Example] = []
    for fam in FAMILIES:
        for name in fam.names:
            for p in fam.params:
                code = f"{fam.signature.format(name=name, p=p)} {{\n{fam.body.replace('{p}', p)}\n}}"
                for ask in fam.asks:
                    for template in TEMPLATES:
                        user = template.format(name=name, ask=ask.format(p=p))
                        meta = {"name": name, "tests": list(fam.tests), "held_out": name == fam.names[-1]}
                        out.append(chat_example(SYSTEM, user, code, meta=meta))
    rng.shuffle(out)
    return out


def extract_code(text: str) -> str:
    """The code in a model answer, without Markdown fences."""
    fenced = re.search(r"```(?:typescript|ts)?\n(.*?)(?:```|$)", text, flags=re.S)
    return (fenced.group(1) if fenced else text).strip()


def tsc_command() -> list[str] | None:
    """How to run the TypeScript compiler: the project's local install, else one on PATH."""
    local = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "tsc"
    if local.exists():
        return [str(local)]
    found = shutil.which("tsc")
    return [found] if found else None


# The test runner: ours, not the model's. It reads the cases (and a per-run nonce) from stdin and builds the
# arguments before the candidate's code loads, keeps its own references to what it writes with, and prints the
# return values, never a verdict: the expected values stay in this Python process, so output that prints what a
# test "wants to see" cannot pass.
RUNNER_JS = """"use strict";
const fs = require("fs");
const input = JSON.parse(fs.readFileSync(0, "utf8"));
const write = process.stdout.write.bind(process.stdout);
const stringify = JSON.stringify;
const cases = input.cases.map((args) => new Function("return [" + args + "];")());
let fn;
try {
  fn = require("./candidate.js").__candidate;
} catch (e) {
  write(input.nonce + stringify([{ error: "load: " + String(e) }]) + "\\n");
  process.exit(0);
}
const out = [];
for (const args of cases) {
  try {
    const text = stringify(fn(...args));
    out.push(text === undefined ? { undefined: true } : { json: text });
  } catch (e) {
    out.push({ error: String(e) });
  }
}
write(input.nonce + stringify(out) + "\\n");
"""


# tsc over a batch of answers: more time, memory, output and files than one program's run.
TSC_LIMITS = sandbox.SandboxLimits(
    cpu_seconds=600, wall_seconds=600, memory_bytes=8 * 2**30, file_bytes=64 * 2**20, open_files=1024
)


def score_many(
    predictions: list[str], metas: list[dict[str, Any]], data_dir: Any = None, *, timeout_s: float = 10
) -> list[bool]:
    """Type-checks all answers in one `tsc --strict` run, then runs each one's tests in the sandbox
    (`expertserve/eval/sandbox.py`): Node's permission model, a scrubbed environment, its own directory, CPU,
    memory and time limits. The tests' inputs reach the program on stdin; their expected values never do.

    Raises:
        RuntimeError: Node (20 or newer, for its permission model) or the TypeScript compiler is missing.
    """
    tsc, node = tsc_command(), shutil.which("node")
    if tsc is None or node is None:
        raise RuntimeError(
            "TypeScript scoring needs node and tsc; run scripts/setup.sh (installs tsc in .tools/)"
        )
    with tempfile.TemporaryDirectory(prefix="expertserve-ts-") as tmp:
        root = Path(tmp)
        for i, (pred, meta) in enumerate(zip(predictions, metas, strict=True)):
            if not re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", meta["name"]):
                raise ValueError(f"test meta: {meta['name']!r} is not a function name")
            (root / f"c{i}.ts").write_text(
                f"{extract_code(pred)}\n\nexport {{ {meta['name']} as __candidate }};\n"
            )
        files = [f"c{i}.ts" for i in range(len(predictions))]
        # The compiler reads model text too: the sandbox's limits and no network, with room for a big batch.
        proc = sandbox.run(
            [
                *tsc,
                "--strict",
                "--target",
                "es2020",
                "--module",
                "commonjs",
                "--outDir",
                "out",
                "--noEmitOnError",
                "false",
                "--skipLibCheck",
                *files,
            ],
            root,
            limits=TSC_LIMITS,
        )
        failed = {int(m) for m in re.findall(r"^c(\d+)\.ts\(", proc.stdout, flags=re.M)}
        limits = sandbox.SandboxLimits(cpu_seconds=max(1, int(timeout_s)), wall_seconds=timeout_s + 5)
        return [
            i not in failed
            and (root / "out" / f"c{i}.js").exists()
            and _passes(root / "out" / f"c{i}.js", root / f"run{i}", meta["tests"], limits)
            for i, meta in enumerate(metas)
        ]


def _passes(compiled: Path, workdir: Path, tests: list[list[str]], limits: Any) -> bool:
    """Runs one compiled answer on its tests' inputs in a directory of its own and compares what it returned with
    the expected values here, outside the process under test."""
    workdir.mkdir()
    shutil.copy(compiled, workdir / "candidate.js")
    (workdir / "runner.js").write_text(RUNNER_JS)
    nonce = secrets.token_hex(16)
    outcome = sandbox.run(
        sandbox.node_argv(workdir / "runner.js"),
        workdir,
        stdin=json.dumps({"nonce": nonce, "cases": [args for args, _ in tests]}),
        limits=limits,
    )
    if outcome.timed_out or outcome.returncode != 0:
        return False
    lines = [line for line in outcome.stdout.splitlines() if line.startswith(nonce)]
    try:
        results = json.loads(lines[-1][len(nonce) :]) if lines else []
    except ValueError:
        return False
    return len(results) == len(tests) and all(
        _same(result, want) for result, (_, want) in zip(results, tests, strict=True)
    )


def _same(result: Any, want: str) -> bool:
    """Whether a returned value (as the runner reports it) equals the expected JavaScript literal."""
    if not isinstance(result, dict):
        return False
    if want.strip() == "undefined":
        return result.get("undefined") is True
    if not isinstance(result.get("json"), str):
        return False
    try:
        return bool(json.loads(result["json"]) == json.loads(want))
    except ValueError:
        return False
