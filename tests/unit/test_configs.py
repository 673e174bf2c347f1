"""Every shipped config parses and names real objects."""

from __future__ import annotations

import importlib

import yaml

from expertserve.serve.config import ServeConfig
from tests.helpers import REPO


def test_expertserve_config_matches_the_defaults() -> None:
    config = ServeConfig.from_file(REPO / "configs" / "expertserve.yaml")
    assert config == ServeConfig()


def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(data)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(data)
    )
    [app] = schema.applications
    module, name = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    ServeConfig.model_validate(app.args)


def test_train_config_matches_the_defaults_and_the_command_line_wins(tmp_path) -> None:
    from expertserve.train.settings import TrainSettings

    assert TrainSettings.resolve({}, REPO / "configs" / "train.yaml") == TrainSettings()
    file = tmp_path / "t.yaml"
    file.write_text("workers: 3\nplacement_strategy: SPREAD\n")
    s = TrainSettings.resolve({"workers": 2, "gpu": None, "max_steps": None}, file)
    assert (s.workers, s.placement_strategy, s.gpu) == (2, "SPREAD", False)
    file.write_text("wokers: 3\n")
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="wokers"):
        TrainSettings.resolve({}, file)
