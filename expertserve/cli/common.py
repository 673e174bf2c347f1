"""Exit codes and the usage error shared by every command (kept apart from main so that running
`python -m expertserve.cli.main` does not create a second copy of these classes)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line mistake (exit 2)."""


def claim_stdout() -> TextIO:
    """Sends everything later written to stdout (Python or C: vLLM's and Ray's logs, exit hooks included) to
    stderr, and returns a stream to the real stdout for the command's result (`--json` prints one object)."""
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return result
