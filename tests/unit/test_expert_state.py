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
    state.engine_ack("e2", 1)
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
    state.engine_ack("e1", 0)
    assert state.claim_restart("e1")
    for _ in range(4):  # draining for longer than CLAIM_S, acknowledging all along
        time.sleep(0.1)
        state.engine_ack("e1", 0)
        state.engine_ack("e2", 0)
        assert not state.claim_restart("e2")
    time.sleep(0.3)  # silent (died mid-restart): the claim lapses
    state.engine_ack("e2", 0)
    assert state.claim_restart("e2")


def test_the_state_actor_checks_its_inputs_and_recovers_from_the_replicas() -> None:
    """Finding 12 of the security issue: any Ray job could set a malformed shape (every new engine replica then
    failed to start), hold the restart claim, or feed the actor anything; a replaced actor started from zero."""
    state = ExpertState()
    for bad in (
        {"max_lora_rank": 7, "prefix_caching": False},
        {"max_lora_rank": "16", "prefix_caching": False},
        {"max_lora_rank": 16, "prefix_caching": "yes"},
        {"max_lora_rank": 16, "prefix_caching": False, "extra": 1},
        None,
    ):
        with pytest.raises(ValueError, match="an engine shape is"):
            state.set_shape(bad)  # type: ignore[arg-type]
    assert state.target_shape() == (0, None)
    for replica, number in (("", 1), ("x" * 300, 1), ("r\n", 1), ("r", -1), ("r", True), ("r", 2**60)):
        with pytest.raises(ValueError):
            state.ack(replica, number)  # type: ignore[arg-type]
    assert not state.claim_restart("not-an-engine-replica")  # never heard from: no claim
    # A replaced actor (empty) rises to what the replicas report, so the next reload and shape are newer.
    assert state.ack("ingress-1", 7) == 7 and state.bump(at_least=7) == 8
    assert state.engine_ack("engine-1", 4) == (4, None)
    assert state.set_shape({"max_lora_rank": 32, "prefix_caching": False}) == 5


def test_a_shape_that_cannot_start_is_reverted_for_every_replica() -> None:
    state = ExpertState()
    small = {"max_lora_rank": 16, "prefix_caching": False}
    state.set_shape(small)
    state.shape_applied(1)
    state.set_shape({"max_lora_rank": 512, "prefix_caching": True})
    state.engine_ack("e1", 1)
    state.shape_failed("e1", 2, "OutOfMemoryError: no room")
    version, target = state.target_shape()
    assert version == 3 and target == small
    assert state.engine_status()["failed"]["reason"] == "OutOfMemoryError: no room"
    state.shape_failed("e1", 2, "late report of the same failure")  # an older version changes nothing
    assert state.target_shape() == (3, small)


def test_a_redeploy_with_another_config_drops_the_raised_shape() -> None:
    state = ExpertState()
    assert not state.adopt("config-a")
    state.set_shape({"max_lora_rank": 256, "prefix_caching": True})
    assert not state.adopt("config-a")  # another replica of the same deployment keeps it
    assert state.target_shape()[1] is not None
    assert state.adopt("config-b")
    assert state.target_shape() == (2, None)
