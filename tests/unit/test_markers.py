"""The `gpu` marker skips without CUDA (tests/conftest.py), and only then."""

from __future__ import annotations

from typing import Any

import pytest

from tests import conftest


class Item:
    def __init__(self, gpu: bool):
        self.gpu, self.added = gpu, []

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
    assert bool(gpu.added) == skipped and cpu.added == []
    if skipped:
        assert gpu.added[0].mark.name == "skip" and "CUDA" in gpu.added[0].mark.kwargs["reason"]
