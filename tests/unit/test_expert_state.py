"""The expert-state actor's logic (run here as a plain object) and the follower's catch-up."""

from __future__ import annotations

import time

import pytest

from expertserve.serve import expert_state
from expertserve.serve.expert_state import ExpertState, StateFollower


def test_generations_acks_and_lagging_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ExpertState()
    assert state.current() == 0 and state.bump() == 1
    assert state.ack("a", 1) == 1 and state.ack("b", 0) == 1
    assert state.lagging(1) == ["b"] and state.replicas() == {"a": 1, "b": 0}
    state.ack("b", 1)
    assert state.lagging(1) == []
    # A replica that stopped acknowledging (scaled down, dead) no longer holds a reload up.
    monkeypatch.setattr(expert_state, "LIVE_S", 0.05)
    state.bump()
    state.ack("a", 2)
    time.sleep(0.1)
    state.ack("a", 2)
    assert state.lagging(2) == [] and state.replicas() == {"a": 2}
    state.leave("a")
    assert state.replicas() == {}


def test_the_follower_reloads_once_per_new_generation() -> None:
    reloads: list[int] = []
    served: list[int] = []
    follower = StateFollower(
        None, "r1", lambda: reloads.append(1) or {"added": []}, 3, on_serve=served.append
    )
    follower.catch_up(3)
    assert reloads == [] and follower.generation == 3  # already serves it
    follower.catch_up(5)
    follower.catch_up(4)
    assert reloads == [1] and follower.generation == 5 and served == [5]
    assert follower.reload_to(6) == {"added": []} and follower.generation == 6 and served == [5, 6]


def test_vllm_client_arguments_name_every_adapter() -> None:
    from pathlib import Path

    from expertserve.bench.vllm_client import client_argv
    from expertserve.bench.workload import Shape

    argv = client_argv("http://127.0.0.1:1", "base", Path("/m"), ["e1", "e2"], Shape(8, 4, 16), 7)
    assert argv[argv.index("--num-prompts") + 1] == "8" and argv[argv.index("--max-concurrency") + 1] == "4"
    assert argv[-3:] == ["--lora-modules", "e1", "e2"] and "--ignore-eos" in argv
