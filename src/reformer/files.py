"""Leaf helpers for files: the cache folder, atomic writes and /proc/cpuinfo (imported by the kernels' loader,
the corpora, the run folders and the reports alike, so they sit below all of them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def cache_dir() -> Path:
    """``$REFORMER_CACHE``, default ``~/.cache/reformer``: built kernels and concatenated corpora."""
    return Path(os.environ.get("REFORMER_CACHE", Path.home() / ".cache" / "reformer"))


def cpuinfo(field: str) -> str | None:
    """The first value of ``field`` (e.g. "model name", "flags") in Linux's /proc/cpuinfo; None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


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


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock; the message says which."""


class FolderLock:
    """An exclusive lock on a folder for as long as it is held: ``flock`` on ``folder/.lock``, released by
    the kernel when the holder exits, however it exits (so a killed writer never leaves it stale).

    with FolderLock(run_dir): ...    raises FolderInUse at once when another process holds it.
    """

    def __init__(self, folder: Path, what: str = "training"):
        self.path, self.what, self._fd = Path(folder) / ".lock", what, None

    def acquire(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(f"{self.path.parent} is in use: {holder} holds it; wait for it to finish or "
                              "stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.what} process {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
