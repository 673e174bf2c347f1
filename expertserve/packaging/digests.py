"""File digests, cached by file stat: a rescan hashes only what changed. Pure Python."""

from __future__ import annotations

import hashlib
from pathlib import Path

_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str | None:
    """A file's SHA-256 (None: not a file), cached by path, inode, size and modification time so that a rescan
    reads only what changed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    cached = _DIGESTS.get(key)
    if cached is None:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        cached = _DIGESTS[key] = sha.hexdigest()
        if len(_DIGESTS) > 4096:  # bounded: files of experts long gone leave
            _DIGESTS.pop(next(iter(_DIGESTS)))
    return cached
