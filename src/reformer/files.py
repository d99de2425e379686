"""Leaf helpers for files: the cache folder and atomic writes (imported by the kernels' loader, the corpora
and the run folders alike, so they sit below all of them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def cache_dir() -> Path:
    """``$REFORMER_CACHE``, default ``~/.cache/reformer``: built kernels and concatenated corpora."""
    return Path(os.environ.get("REFORMER_CACHE", Path.home() / ".cache" / "reformer"))


def write_atomically(path: Path, data: bytes | str | Iterable[bytes]) -> None:
    """Write ``data`` (or each chunk of it, in turn) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [data.encode() if isinstance(data, str) else data] if isinstance(data, (str, bytes)) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
