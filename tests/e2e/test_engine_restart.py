"""Engine restart on the real server (vLLM): an expert whose LoRA rank is above the running engine's is refused;
`POST /admin/engines/restart` restarts the engine with the bigger rank while a client keeps sending requests (each
one answered), then the expert answers token for token as transformers + PEFT do."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import TINY_ID, Server
from tests.reference import reference_greedy

pytestmark = [pytest.mark.server, pytest.mark.scaling]


def _rank16(experts: Path, base: Path) -> Path:
    """expert-beta again as `expert-wide-rank`, with a random rank-16 LoRA (the engine starts at rank 8)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    target = experts / "expert-wide-rank"
    shutil.copytree(experts / "expert-beta", target)
    shutil.rmtree(target / "adapter")
    data = json.loads((target / "manifest.json").read_text())
    data["name"] = "expert-wide-rank"
    data["base_models"][0]["adapters"][0]["r"] = 16
    data["training"]["config"]["rank"] = 16
    (target / "manifest.json").write_text(json.dumps(data))
    torch.manual_seed(16)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target / "adapter")
    return target


def _greedy(url: str, model: str, n: int = 8) -> list[int]:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=180,
        headers={"Authorization": "Bearer sk-e2e-default"},  # the small-queue server's default tenant
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": n,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_engine_restart_for_a_bigger_rank_on_vllm(small_queue_server: Server) -> None:
    # The small-queue server (its own experts: the shared server's stay as they are); one client at a time here.
    server = small_queue_server
    base, experts = server.base, server.experts
    h = server.headers
    assert httpx.get(f"{server.url}/admin/engines", timeout=30).json()["serving"]["max_lora_rank"] == 8
    before = _greedy(server.url, "expert-beta")
    wide = _rank16(experts, base)
    reloaded = httpx.post(f"{server.url}/admin/experts/reload", timeout=120).json()
    assert any("expert-wide-rank" in p and "max_lora_rank 8" in p for p in reloaded["problems"]), reloaded
    assert (
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "expert-wide-rank", "messages": [{"role": "user", "content": "hi"}]},
            headers=h,
            timeout=60,
        ).status_code
        == 400
    )

    answers: list[object] = []
    done = threading.Event()

    def keep_asking() -> None:
        while not done.is_set():
            try:
                answers.append(_greedy(server.url, "expert-beta"))
            except (AssertionError, httpx.HTTPError) as e:
                answers.append(e)

    client = threading.Thread(target=keep_asking)
    client.start()
    try:
        restarted = httpx.post(f"{server.url}/admin/engines/restart", timeout=600)
    finally:
        done.set()
        client.join(timeout=200)
    assert restarted.status_code == 200, restarted.text
    answer = restarted.json()
    assert answer["restarted"] is True and answer["shape"]["max_lora_rank"] == 16, answer
    assert answers and all(a == before for a in answers), f"answers during the restart: {answers}"

    assert "expert-wide-rank" in {
        m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=h, timeout=30).json()["data"]
    }
    got = _greedy(server.url, "expert-wide-rank")
    assert got == reference_greedy(base, wide, "hello world", True, False, len(got))
    assert _greedy(server.url, "expert-beta") == before
    assert _greedy(server.url, TINY_ID) == reference_greedy(base, base, "hello world", False, False, 8)
