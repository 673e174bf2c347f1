"""The loss curve of a training run as a PNG: training loss per step (and its moving average), validation loss
where it was measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_series(history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from a run's progress lines.

    A resumed run repeats steps; the last value of a step wins, so the curve is the one the model followed.
    """
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for h in history:
        if "loss" in h and "step" in h:
            train[int(h["step"])] = float(h["loss"])
        if "eval_loss" in h and "eval_step" in h:
            valid[int(h["eval_step"])] = float(h["eval_loss"])
    return sorted(train.items()), sorted(valid.items())


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Writes the curve to `path` (written aside, then moved); None when the history has no loss."""
    train, valid = loss_series(history)
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    steps, losses = zip(*train, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="training loss (step)")
    window = max(1, len(losses) // 20)
    ax.plot(
        steps,
        moving_average(list(losses), window),
        color="tab:blue",
        label=f"training loss ({window}-step mean)",
    )
    if valid:
        vs, vl = zip(*valid, strict=True)
        ax.plot(vs, vl, "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
