"""The training loss curve: series from progress lines (resumed steps, validation points) and the PNG."""

from __future__ import annotations

from pathlib import Path

from expertserve.train.plot import loss_series, moving_average, plot_loss


def test_a_resumed_step_keeps_its_last_value_and_validation_points_are_their_own_series() -> None:
    history = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"eval_step": 2, "eval_loss": 1.8},
        {"step": 2, "loss": 1.4},  # the run restarted from step 1's checkpoint
        {"step": 3, "loss": 1.0},
        {"done": True},
    ]
    train, valid = loss_series(history)
    assert train == [(1, 2.0), (2, 1.4), (3, 1.0)]
    assert valid == [(2, 1.8)]


def test_moving_average_is_trailing_and_starts_with_what_there_is() -> None:
    assert moving_average([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert moving_average([1.0], 5) == [1.0]


def test_plot_writes_a_png_and_nothing_without_losses(tmp_path: Path) -> None:
    history = [{"step": i, "loss": 1 / i} for i in range(1, 30)] + [{"eval_step": 10, "eval_loss": 0.2}]
    path = plot_loss(history, tmp_path / "run" / "loss.png", "expert-demo")
    assert path == tmp_path / "run" / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"], "no temporary file left"
    assert plot_loss([{"done": True}], tmp_path / "none.png", "x") is None
    assert not (tmp_path / "none.png").exists()
