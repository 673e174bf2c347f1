"""The `gpu` marker skips without CUDA (tests/conftest.py), and only then."""

from __future__ import annotations

from typing import Any

import pytest

from tests import conftest


class Item:
    def __init__(self, gpu: bool, nodeid: str = "tests/unit/test_x.py::test_y"):
        self.gpu, self.added, self.nodeid = gpu, [], nodeid

    def get_closest_marker(self, name: str) -> Any:
        return object() if name == "gpu" and self.gpu else None

    def add_marker(self, marker: Any) -> None:
        self.added.append(marker)


@pytest.mark.parametrize(("cuda", "skipped"), [(False, True), (True, False)])
def test_gpu_tests_skip_exactly_when_no_cuda_device_is_visible(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, skipped: bool
) -> None:
    monkeypatch.setattr(conftest, "has_cuda", lambda: cuda)
    gpu, cpu = Item(gpu=True), Item(gpu=False)
    conftest.pytest_collection_modifyitems(None, [gpu, cpu])  # type: ignore[arg-type]
    gpu_skips = [m for m in gpu.added if m.mark.name == "skip"]
    assert bool(gpu_skips) == skipped and not [m for m in cpu.added if m.mark.name == "skip"]
    if skipped:
        assert "CUDA" in gpu_skips[0].mark.kwargs["reason"]


def test_a_module_runs_whole_on_one_worker_and_shared_servers_group_their_modules() -> None:
    assert conftest.xdist_group("tests/unit/test_body.py::test_x[1]") == "tests/unit/test_body.py"
    shared = {
        conftest.xdist_group(f"tests/e2e/{m}.py::t") for m in ("test_server", "test_reload", "test_fuzz")
    }
    assert shared == {conftest.xdist_group("tests/e2e/test_engine_failure.py::t")}
    assert conftest.xdist_group("tests/e2e/test_overload.py::t") == conftest.xdist_group(
        "tests/e2e/test_engine_restart.py::t"
    )
    item = Item(gpu=False, nodeid="tests/e2e/test_fuzz.py::t")
    conftest.pytest_collection_modifyitems(None, [item])  # type: ignore[arg-type]
    assert [m.mark.args for m in item.added if m.mark.name == "xdist_group"] == [("e2e-shared-server",)]
