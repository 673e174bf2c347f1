"""Live reload on the real server with every kind of broken expert, while a stream runs: good experts serve
throughout, the stream never stalls, broken experts are reported with why and never listed as servable."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.server
HELLO = [{"role": "user", "content": "hello world"}]
BROKEN = [
    "expert-noadapter",
    "expert-bigrank",
    "expert-badtarget",
    "expert-wide",
    "expert-rows",
    "expert-badgram",
]


def _copy(server: Server, source: str, name: str) -> Path:
    target = server.experts / name
    shutil.copytree(server.expert(source), target)
    data = json.loads((target / "manifest.json").read_text())
    data["name"] = name
    (target / "manifest.json").write_text(json.dumps(data))
    return target


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _make_broken(server: Server) -> None:
    import torch

    from expertserve.engine.soft_prompts import save_soft_prompt

    shutil.rmtree(_copy(server, "expert-beta", "expert-noadapter") / "adapter")
    _edit_json(_copy(server, "expert-beta", "expert-bigrank") / "adapter" / "adapter_config.json", r=64)
    _edit_json(
        _copy(server, "expert-beta", "expert-badtarget") / "adapter" / "adapter_config.json",
        target_modules=["q_proj", "fc9_proj"],
    )
    save_soft_prompt(
        _copy(server, "expert-alpha", "expert-wide") / "soft_prompts" / "style.safetensors",
        torch.zeros(4, 32),
    )
    save_soft_prompt(
        _copy(server, "expert-alpha", "expert-rows") / "soft_prompts" / "style.safetensors",
        torch.zeros(5, 64),
    )
    (_copy(server, "expert-gram", "expert-badgram") / "yesno.gbnf").write_text('root ::= "yes\n')


def test_reload_with_broken_experts_while_streaming(server: Server) -> None:
    url = server.url
    zeta = _copy(server, "expert-beta", "expert-zeta")
    assert httpx.post(f"{url}/admin/experts/reload", timeout=60).json()["added"] == ["expert-zeta"]
    _make_broken(server)
    (zeta / "manifest.json").write_text('{"name": "expert-zeta", "version": "x"}')  # an invalid new manifest
    eta = _copy(server, "expert-beta", "expert-eta")
    (eta / "data").mkdir(exist_ok=True)
    (eta / "data" / "train.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')

    arrivals: list[float] = []
    body = {
        "model": "expert-beta",
        "messages": HELLO,
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: list[dict] = []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
                if line.startswith("data: {") and '"usage"' in line:
                    usage.append(json.loads(line[6:]).get("usage") or {})

    reader = threading.Thread(target=stream)
    reader.start()
    while not arrivals:
        time.sleep(0.01)
    try:
        reload_started = time.monotonic()
        answer = httpx.post(f"{url}/admin/experts/reload", timeout=120)
        during = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "expert-zeta", "messages": HELLO, "max_tokens": 2},
            timeout=120,
        )
        reader.join(120)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert sorted(result["added"]) == sorted([*BROKEN, "expert-eta"])
        problems = "\n".join(result["problems"])
        for name in BROKEN:
            assert f"{name} 0.1.0 is not servable" in problems, (name, problems)
        assert "still serving expert-zeta 0.1.0" in problems and "expert-eta: not routed to" in problems
        assert during.status_code == 200, "the last valid version keeps serving"
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert not listed & set(BROKEN) and {"expert-zeta", "expert-eta", "expert-beta"} <= listed
        experts = {e["name"]: e for e in httpx.get(f"{url}/v1/experts").json()["data"]}
        assert all(experts[n]["servable"] is False and experts[n]["reason"] for n in BROKEN)
        assert "does not compile" in experts["expert-badgram"]["reason"]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        # Chunks are coalesced (engine.stream_interval_ms), so their count says little; the stream ran across the
        # reload, delivered every token and never paused for half a second.
        assert arrivals[0] < reload_started < arrivals[-1]
        assert usage and usage[-1].get("completion_tokens") == 900, usage[-1:]
        assert max(gaps) < 0.5, f"longest gap {max(gaps):.2f} s"
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "expert-bigrank", "messages": HELLO}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "expert_not_servable"
    finally:
        for name in [*BROKEN, "expert-zeta", "expert-eta"]:
            shutil.rmtree(server.experts / name, ignore_errors=True)
        httpx.post(f"{url}/admin/experts/reload", timeout=120)
