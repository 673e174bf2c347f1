"""Test-only fault injection for training: read from the environment, never from a production signature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertserve.train.faults import ENV, Faults
from expertserve.train.loop import LoopConfig


def test_no_variable_means_no_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    faults = Faults.from_env()
    assert faults == Faults() and faults.loss(1.5, 3) == 1.5


def test_faults_travel_to_the_workers_in_the_loop_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, json.dumps({"nan_at_step": 3}))
    config = LoopConfig(plan={"expert_name": "x"}, faults=Faults.from_env())
    again = LoopConfig.from_dict(json.loads(json.dumps(config.to_dict())))  # as Ray hands it over
    assert again == config and again.faults.loss(1.0, 3) != again.faults.loss(1.0, 3)  # NaN


def test_an_injected_failure_happens_once(tmp_path: Path) -> None:
    faults = Faults(fail_once_at_step=2)
    progress = str(tmp_path / "progress.jsonl")
    faults.maybe_fail(1, progress)
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        faults.maybe_fail(2, progress)
    faults.maybe_fail(2, progress)  # the restarted worker group passes the step


def test_a_bad_variable_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, '{"explode": 1}')
    with pytest.raises(ValueError, match=ENV):
        Faults.from_env()
