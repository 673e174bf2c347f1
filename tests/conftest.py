"""Shared fixtures and hooks. Tests never touch the user's cache: EXPERTSERVE_HOME points into a temp dir unless a
test needs the prepared base model (see tests/integration)."""

from __future__ import annotations

import functools
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


@functools.cache
def has_cuda() -> bool:
    """Whether torch sees a CUDA device (torch is imported only when a `gpu` test is collected)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# A marker that implies others: `-m "not engine"` must also skip what starts a server.
IMPLIED = {"server": ("engine", "cluster")}
# Test modules that share a server of tests/e2e/conftest.py: with several workers (pytest-xdist's loadgroup, as
# scripts/test.sh runs the suite) each group runs whole on one worker, so its server starts once.
SHARED_SERVERS = {
    "tests/e2e/test_server.py": "e2e-shared-server",
    "tests/e2e/test_reload.py": "e2e-shared-server",
    "tests/e2e/test_fuzz.py": "e2e-shared-server",
    "tests/e2e/test_engine_failure.py": "e2e-shared-server",
    "tests/e2e/test_overload.py": "e2e-small-queue",
    "tests/e2e/test_engine_restart.py": "e2e-small-queue",
    "tests/e2e/test_tenancy.py": "e2e-small-queue",
}


def xdist_group(nodeid: str) -> str:
    """The worker group of a test: its module (module fixtures start once), or its shared server's group."""
    module = nodeid.split("::", 1)[0]
    return SHARED_SERVERS.get(module, module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.nodeid)))
        for marker, implied in IMPLIED.items():
            if item.get_closest_marker(marker):
                for name in implied:
                    item.add_marker(name)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (the `gpu` marker); none is visible to torch")
        for item in gpu_items:
            item.add_marker(skip)
