"""Shared fixtures. Tests never touch the user's cache: EXPERTSERVE_HOME points into a temp dir unless a
test needs the prepared base model (see tests/integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """EXPERTSERVE_HOME and the install directory under tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setenv("EXPERTSERVE_HOME", str(home))
    monkeypatch.delenv("EXPERTSERVE_INSTALL_DIR", raising=False)
    return home


def pytest_report_header(config: pytest.Config) -> str:
    return f"EXPERTSERVE_HOME={os.environ.get('EXPERTSERVE_HOME', '(default)')}"
