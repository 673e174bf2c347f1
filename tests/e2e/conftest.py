"""One server for the e2e tests, started as a user starts it (`expertserve serve --config FILE`), on a tiny fp32
model with experts made here: LoRA + soft prompt, LoRA alone, soft prompt alone (identity LoRA), a GBNF
grammar, and a DoRA expert the engine cannot serve."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from expertserve.bench.servers import free_port, running
from tests.helpers import make_expert, manifest

TINY_ID = "tiny-test-model"


@dataclass(frozen=True)
class Server:
    """A running server and what it was built from."""

    url: str
    base: Path
    experts: Path
    log: Path
    headers: dict[str, str] = field(
        default_factory=dict
    )  # a key of the server's default tenant, if it has keys

    def expert(self, name: str) -> Path:
        return self.experts / name


def _expert(
    root: Path, base: Path, name: str, *, lora: str | None, soft: bool, decoding: dict, seed: int
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from expertserve.engine.soft_prompts import save_soft_prompt

    data = manifest(name=name)
    data["base_models"][0]["name"] = TINY_ID
    data["training"]["decoding"] = decoding
    if not soft:
        data["soft_prompts"] = []
    if lora == "dora":
        data["base_models"][0]["adapters"][0]["type"] = "dora"
        data["training"]["config"]["adapter_type"] = "dora"
    expert = make_expert(root / name, data)
    if decoding.get("grammar_file"):
        (expert / decoding["grammar_file"]).write_text('root ::= "yes" | "no"\n')
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=lora == "identity",
        use_dora=lora == "dora",
    )
    get_peft_model(model, config).save_pretrained(expert / "adapter")
    if soft:
        save_soft_prompt(expert / "soft_prompts" / "style.safetensors", torch.randn(4, 64) * 0.05)
    return expert


@contextlib.contextmanager
def launched_server(
    args: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`expertserve serve ARGS` in a subprocess, as a user starts it, until the block ends; yields its URL.

    The port must be among `args`; the server is stopped with SIGTERM (then SIGKILL after a minute).
    """
    port = args[args.index("--port") + 1]
    full_env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        **(env or {}),
    }
    with running(
        [sys.executable, "-m", "expertserve", "serve", *args],
        f"http://127.0.0.1:{port}",
        "/healthz",
        log,
        full_env,
        timeout=300,
        cwd=cwd,
    ) as url:
        yield url


@contextlib.contextmanager
def running_server(root: Path, base: Path, experts: Path, **overrides: object) -> Iterator[Server]:
    """A server on the tiny model and the experts made here, with config overrides."""
    port = free_port()
    config = root / f"serve-{port}.json"
    config.write_text(
        json.dumps(
            {
                "model_dir": str(base),
                "model_id": TINY_ID,
                "experts_dirs": [str(experts)],
                "port": port,
                "max_body_bytes": 65536,
                "ray_dashboard": False,
                "engine": {"dtype": "float32", "in_process": True},
                **overrides,
            }
        )
    )
    log = root / f"server-{port}.log"
    keys = overrides.get("api_keys")
    headers = {"Authorization": f"Bearer {keys[0]}"} if isinstance(keys, list) and keys else {}
    with launched_server(["--config", str(config), "--port", str(port)], log) as url:
        yield Server(url, base, experts, log, headers)


# An expert that calls a function by default (manifest tools; request > manifest).
TOOL_DECODING = {
    "temperature": 0.0,
    "max_tokens": 40,
    "tools": [
        {
            "name": "lookup_city",
            "description": "Look a city up",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        }
    ],
    "tool_choice": "lookup_city",
}


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(root, tiny base model, experts directory)."""
    from expertserve.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("e2e")
    base = build_tiny_model(root / "tiny", seed=1)
    experts = root / "experts"
    plain = {"temperature": 0.1, "max_tokens": 12}
    _expert(experts, base, "expert-alpha", lora="random", soft=True, decoding=plain, seed=1)
    _expert(experts, base, "expert-beta", lora="random", soft=False, decoding=plain, seed=2)
    _expert(experts, base, "expert-delta", lora="identity", soft=True, decoding=plain, seed=3)
    _expert(
        experts,
        base,
        "expert-gram",
        lora="random",
        soft=False,
        seed=4,
        decoding={"temperature": 0.0, "max_tokens": 8, "grammar_file": "yesno.gbnf"},
    )
    _expert(experts, base, "expert-dora", lora="dora", soft=False, decoding=plain, seed=5)
    _expert(experts, base, "expert-tools", lora="random", soft=False, decoding=TOOL_DECODING, seed=6)
    # Installed from an unsigned package: the server's trust policy (no trusted keys) must refuse to serve it.
    from expertserve.packaging import archive

    source = _expert(root / "src", base, "expert-unsigned", lora="random", soft=False, decoding=plain, seed=7)
    archive.install_package(archive.build_package(source, root / "packages"), experts)
    return root, base, experts


# Tests that end the shared server: they run after every other test of the session.
ENDS_THE_SERVER = ("tests/e2e/test_engine_failure.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.nodeid.startswith(ENDS_THE_SERVER)]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session")
def server(built: tuple[Path, Path, Path]) -> Iterator[Server]:
    with running_server(*built) as running:
        yield running


# One engine request running and one queued per engine replica: what the overload test fills. Two ingress
# replicas and tenants (the default tenant from api_keys, two scoped ones from a tenants file; test_tenancy.py).
SMALL_QUEUE = {
    "replicas": {"max_ongoing_requests": 1, "max_queued_requests": 1, "ingress_replicas": 2},
    "api_keys": ["sk-e2e-default"],
}
TENANTS_FILE = """\
tenants:
  team-beta:
    keys: [sk-e2e-beta]
    experts: [expert-beta]
    base_model: false
    limits: {requests_per_minute: 6}
  team-base:
    keys: [sk-e2e-base]
    experts: []
"""


@pytest.fixture(scope="session")
def small_queue_server(
    built: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A second server, for the tests the shared one must not see: the engine restart changes its engines' shape
    and its experts, the overload test fills its queue (`SMALL_QUEUE`). Its experts are a copy of expert-beta."""
    import shutil

    _, base, shared = built
    root = tmp_path_factory.mktemp("small-queue")
    experts = root / "experts"
    experts.mkdir()
    shutil.copytree(shared / "expert-beta", experts / "expert-beta")
    (root / "tenants.yaml").write_text(TENANTS_FILE)
    with running_server(
        root, base, experts, **SMALL_QUEUE, tenants_file=str(root / "tenants.yaml")
    ) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
