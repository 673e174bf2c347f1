"""Test helpers: expert directories on disk, without torch."""

from __future__ import annotations

import contextlib
import copy
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "hivellm"
REPO = Path(__file__).resolve().parent.parent

MINIMAL_MANIFEST: dict[str, Any] = {
    "name": "expert-demo",
    "version": "0.1.0",
    "description": "A demo expert.",
    "license": "Apache-2.0",
    "base_models": [
        {
            "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "adapters": [
                {
                    "type": "lora",
                    "target_modules": ["q_proj", "v_proj"],
                    "r": 4,
                    "alpha": 8,
                    "path": "adapter",
                }
            ],
        }
    ],
    "soft_prompts": [
        {"name": "style", "path": "soft_prompts/style.safetensors", "tokens": 4, "init_method": "random"}
    ],
    "capabilities": ["task:demo"],
    "training": {
        "dataset": {"path": "data/train.jsonl", "format": "jsonl"},
        "config": {
            "method": "sft",
            "adapter_type": "lora",
            "rank": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "epochs": 1,
            "learning_rate": 0.001,
            "batch_size": 2,
        },
        "decoding": {"temperature": 0.1, "grammar_file": "grammar.gbnf"},
    },
}


def manifest(**changes: Any) -> dict[str, Any]:
    """A deep copy of the minimal manifest with top-level keys replaced."""
    data = copy.deepcopy(MINIMAL_MANIFEST)
    data.update(changes)
    return data


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], str]], fill: int = 0) -> None:
    """Writes a safetensors file of zero-filled (or `fill`-byte) tensors; dtype F32 or BF16."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([fill]) * offset)


def make_expert(root: Path, data: dict[str, Any] | None = None, *, files: bool = True) -> Path:
    """Writes an expert directory (manifest and, with files=True, every file it names); returns it."""
    data = data or manifest()
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data, indent=2))
    if not files:
        return root
    for base in data.get("base_models", []):
        for adapter in base["adapters"]:
            d = root / adapter.get("path", ".")
            d.mkdir(parents=True, exist_ok=True)
            (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": adapter.get("r")}))
            write_safetensors(
                d / "adapter_model.safetensors",
                {"base_model.model.layers.0.q_proj.lora_A.weight": ([4, 8], "F32")},
                fill=1,
            )
    for sp in data.get("soft_prompts", []):
        write_safetensors(root / sp["path"], {"prompt_embeddings": ([sp["tokens"], 8], "F32")})
    dec = data.get("training", {}).get("decoding", {})
    if dec.get("grammar_file"):
        (root / dec["grammar_file"]).write_text('root ::= "SELECT" [a-z]+\n')
    ds = data.get("training", {}).get("dataset", {})
    for key in ("path", "validation_path", "test_path"):
        if ds.get(key):
            (root / ds[key]).parent.mkdir(parents=True, exist_ok=True)
            (root / ds[key]).write_text('{"messages": []}\n')
    return root


# Credentials an S3-compatible test server accepts; pyarrow and boto read them from the environment.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def s3_server(bucket: str = "experts") -> Iterator[str]:
    """moto's S3 server (a real HTTP server, installed from the package registries) on a free loopback port, with
    `bucket` created; yields the base URI of an expert store in it (`s3://bucket/store?endpoint_override=...`).
    The caller puts `S3_ENV` into the environment of every process that opens the store."""
    import subprocess
    import sys
    import time
    import urllib.request

    from expertserve.bench.servers import free_port

    port = free_port()  # outside the range other Rays on the machine take ports from
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.2)
        yield f"s3://{bucket}/store?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
