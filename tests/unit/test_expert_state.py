"""The expert-state actor's logic (run here as a plain object) and the follower's catch-up."""

from __future__ import annotations

import threading
import time

import pytest

from expertserve.serve.control import state as expert_state
from expertserve.serve.control.state import ExpertState, StateFollower


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


def test_a_replica_catching_up_stays_live_and_lagging_until_its_reload_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A catch-up reload longer than LIVE_S (a busy node) must not make the replica look gone: a reload elsewhere
    would then answer before this replica serves the new experts."""
    monkeypatch.setattr(expert_state, "POLL_S", 0.01)
    monkeypatch.setattr(expert_state, "LIVE_S", 0.1)
    state = ExpertState()
    release = threading.Event()
    follower = StateFollower(None, "slow", lambda: release.wait(5) and {}, 0)
    monkeypatch.setattr(follower, "_ack", lambda: state.ack(follower.replica, follower.generation))
    follower.start()
    try:
        state.bump()
        time.sleep(0.5)  # five times LIVE_S into the reload
        assert state.lagging(1) == ["slow"] and state.replicas() == {"slow": 0}
        release.set()
        deadline = time.monotonic() + 5
        while state.lagging(1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.replicas() == {"slow": 1}
    finally:
        follower.stop.set()
        release.set()


def test_vllm_client_arguments_name_every_adapter() -> None:
    from pathlib import Path

    from expertserve.bench.vllm_client import client_argv
    from expertserve.bench.workload import Shape

    argv = client_argv("http://127.0.0.1:1", "base", Path("/m"), ["e1", "e2"], Shape(8, 4, 16), 7)
    assert argv[argv.index("--num-prompts") + 1] == "8" and argv[argv.index("--max-concurrency") + 1] == "4"
    assert argv[-3:] == ["--lora-modules", "e1", "e2"] and "--ignore-eos" in argv


def test_engine_restarts_go_one_replica_at_a_time_and_count_the_restarting_one_as_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = ExpertState()
    assert state.target_shape() == (0, None) and state.applied_shape() is None
    shape = {"max_lora_rank": 16, "prefix_caching": False}
    assert state.set_shape(shape) == 1
    assert state.engine_ack("e1", 0) == (1, shape) and state.engine_ack("e2", 0) == (1, shape)
    assert state.engines_behind(1) == ["e1", "e2"]
    assert state.claim_restart("e1") and not state.claim_restart("e2")
    assert state.claim_restart("e1"), "the holder may claim again"
    # While restarting, e1 may stop acknowledging (vLLM's start blocks its loop): it is still behind.
    monkeypatch.setattr(expert_state, "LIVE_S", 0.05)
    time.sleep(0.1)
    state.engine_ack("e2", 0)
    assert state.engines_behind(1) == ["e1", "e2"]
    state.engine_ack("e1", 1)
    state.release_restart("e1")
    assert state.engines_behind(1) == ["e2"] and state.claim_restart("e2")
    state.engine_ack("e2", 1)
    state.release_restart("e2")
    assert state.engines_behind(1) == []
    assert state.applied_shape() is None, "applied only when the restart call says every engine runs it"
    state.shape_applied(1)
    assert state.applied_shape() == shape
    status = state.engine_status()
    assert status["version"] == 1 and status["engine_replicas"] == {"e1": 1, "e2": 1}
    # A claim whose holder died lapses; a replica that leaves releases its claim.
    assert state.claim_restart("e1")
    monkeypatch.setattr(expert_state, "CLAIM_S", 0.05)
    time.sleep(0.1)
    assert state.claim_restart("e2")
    state.engine_leave("e2")
    assert state.restarting is None and "e2" not in state.engine_status()["engine_replicas"]


def test_an_older_version_does_not_become_the_applied_shape() -> None:
    state = ExpertState()
    state.set_shape({"max_lora_rank": 16, "prefix_caching": False})
    state.set_shape({"max_lora_rank": 32, "prefix_caching": False})
    state.shape_applied(1)
    assert state.applied_shape() is None
    state.shape_applied(2)
    assert state.applied_shape() == {"max_lora_rank": 32, "prefix_caching": False}


def test_a_restart_claim_holds_while_its_replica_is_heard_from(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ExpertState()
    monkeypatch.setattr(expert_state, "CLAIM_S", 0.2)
    assert state.claim_restart("e1")
    for _ in range(4):  # draining for longer than CLAIM_S, acknowledging all along
        time.sleep(0.1)
        state.engine_ack("e1", 0)
        assert not state.claim_restart("e2")
    time.sleep(0.3)  # silent (died mid-restart): the claim lapses
    assert state.claim_restart("e2")
