"""Test-only fault injection for training runs, kept out of every production signature.

Tests set EXPERTSERVE_TRAIN_FAULTS to a JSON object (`{"fail_once_at_step": 7}` or `{"nan_at_step": 3}`); the
driver reads it once (`Faults.from_env`) and hands it to the workers with the rest of the loop's config. Unset (as
in production) nothing is injected. Pure Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "EXPERTSERVE_TRAIN_FAULTS"


@dataclass(frozen=True)
class Faults:
    """Which faults a run injects (none by default)."""

    fail_once_at_step: int | None = None  # one worker raises once at this step, as a lost worker would
    nan_at_step: int | None = None  # the loss of this step is NaN

    @classmethod
    def from_env(cls) -> Faults:
        """The faults EXPERTSERVE_TRAIN_FAULTS asks for.

        Raises:
            ValueError: The variable is not a JSON object of these keys.
        """
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        try:
            return cls(**json.loads(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{ENV}: expected a JSON object with fail_once_at_step / nan_at_step: {e}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loss(self, loss: float, step: int) -> float:
        """The step's loss, NaN at `nan_at_step`."""
        return float("nan") if self.nan_at_step == step else loss

    def maybe_fail(self, step: int, progress_file: str | None) -> None:
        """Raises once at `fail_once_at_step` (a marker file next to the progress file keeps it to once).

        Raises:
            RuntimeError: The injected failure.
        """
        if self.fail_once_at_step is None or step != self.fail_once_at_step or progress_file is None:
            return
        flag = Path(progress_file).with_name("injected-failure")
        if not flag.exists():
            flag.write_text(str(step))
            raise RuntimeError(f"injected failure at step {step} (fail_once_at_step)")
