"""Byte-level corpora: a file, a folder, enwik8.zip or the Python standard library; seeded windows.

A corpus is one byte array on disk, memory-mapped (never read into Python objects), cut into fixed
splits:
- enwik8.zip: the standard split, the first 90M bytes train, the next 5M valid, the last 5M test;
- anything else: the first 90% train, the next 5% valid, the last 5% test.
Folders, zips and the standard library are first concatenated (in sorted path order) into a cache
file under ``$REFORMER_CACHE`` (default ``~/.cache/reformer``), written atomically.

Training windows are drawn from a generator seeded with (seed, step): the batch of a step depends on
nothing else, so a resumed or a distributed run sees exactly the batches of an uninterrupted
single-process one.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import cache_dir, write_atomically

VOCAB_SIZE = 256
SPLITS = ("train", "valid", "test")
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)


class DataError(ValueError):
    """A corpus that cannot be used (missing, empty, too short); the message says which and why."""


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` files, in sorted order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _concatenated(files: list[Path], label: str) -> Path:
    """A cache file holding the files' bytes one after another (rebuilt when any file changes)."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    target = cache_dir() / f"{label}-{digest.hexdigest()[:16]}.bin"
    if not target.exists():
        write_atomically(target, (f.read_bytes() for f in files))
    return target


def _enwik8(zip_path: Path) -> Path:
    target = cache_dir() / f"enwik8-{zip_path.stat().st_size}-{zip_path.stat().st_mtime_ns}.bin"
    if not target.exists():
        with zipfile.ZipFile(zip_path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise DataError(f"{zip_path}: expected one file (enwik8) in the zip, found {names[:5]}")
            with archive.open(names[0]) as member:
                write_atomically(target, iter(lambda: member.read(1 << 24), b""))
    return target


@dataclass
class Corpus:
    """A memory-mapped byte corpus with its train / valid / test boundaries.

    name: what it was built from; path: the byte file; bounds: split name -> (start, end) offsets.
    """

    name: str
    path: Path
    bounds: dict[str, tuple[int, int]]

    @classmethod
    def open(cls, source: str, glob: str = "**/*") -> "Corpus":
        """``source``: "stdlib", a file, a folder (files matching ``glob``, recursively) or enwik8.zip."""
        if source == "stdlib":
            path, name = _concatenated(stdlib_files(), f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}"), \
                "stdlib"
        else:
            given = Path(source).expanduser()
            if not given.exists():
                raise DataError(f"data source {source!r} does not exist (use a file, a folder, an "
                                "enwik8.zip or 'stdlib')")
            name = given.name
            if given.is_dir():
                files = sorted(p for p in given.glob(glob) if p.is_file())
                if not files:
                    raise DataError(f"folder {source!r} holds no files matching {glob!r}")
                path = _concatenated(files, "folder")
            elif given.suffix == ".zip" and given.stem == "enwik8":
                path = _enwik8(given)
            else:
                path = given
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"data source {source!r} is empty")
        if name == "enwik8.zip" and size == sum(ENWIK8_SPLIT):
            cuts = np.cumsum((0,) + ENWIK8_SPLIT)
        else:
            cuts = [0, int(size * 0.90), int(size * 0.95), size]
        bounds = {split: (int(cuts[i]), int(cuts[i + 1])) for i, split in enumerate(SPLITS)}
        return cls(name, path, bounds)

    def split(self, name: str) -> np.ndarray:
        """The bytes of a split as a read-only memory map (uint8)."""
        if name not in self.bounds:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        start, end = self.bounds[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(end - start,))


def window_batch(data: np.ndarray, batch_size: int, length: int, seed: int, step: int) -> torch.Tensor:
    """``batch_size`` random windows of ``length`` bytes for training step ``step``: (batch, length) int64.

    The draw depends only on (seed, step); ranks of a distributed run take slices of this one batch.
    """
    if len(data) < length:
        raise DataError(f"the split holds {len(data)} bytes, fewer than one window of {length}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - length + 1, size=batch_size)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def eval_batches(data: np.ndarray, batch_size: int, length: int, n_batches: int):
    """Fixed, non-overlapping windows from the start of a split, ``n_batches`` batches at most.

    Yields (batch, length) int64; the last batch may be smaller. Deterministic, so evaluations compare.
    """
    n_windows = min(len(data) // length, batch_size * n_batches)
    if n_windows == 0:
        raise DataError(f"the split holds {len(data)} bytes, fewer than one window of {length}")
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        yield torch.from_numpy(np.stack([data[r * length:(r + 1) * length] for r in rows]).astype(np.int64))
