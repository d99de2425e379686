"""metrics.jsonl, the record of a run, and curves.png, its plot.

One JSON object a line: a training step ({"step", "loss", "lr", "tokens_per_s", "elapsed"}), a validation
({"step", "valid_loss", "valid_bpb"}) or an event ({"step", "event": "resume" | "diverged" | "interrupted",
...}). A line is appended with one write; a write that fails (a full disk) is cut back off, so the file
never holds half a line that this process wrote. A resume keeps the complete lines up to the checkpoint's
step and drops the rest (the steps after it are trained again), which also repairs a file whose last line
another crash cut short.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import write_atomically
from ..plotting import pyplot, save_figure
from .checkpoint import CheckpointError


def _complete_records(path: Path, last_step: int) -> list[str]:
    """The lines of ``path`` up to the first that is not a complete record, those after ``last_step`` left out."""
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]:   # the last is unfinished
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError):
            break
        if step <= last_step:
            kept.append(line)
    return kept


def tensorboard_writer(folder: Path, resume_step: int | None):
    """A TensorBoard SummaryWriter on ``folder``; on a resume, events after ``resume_step`` are purged (they
    are trained again). Needs the tensorboard package (an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'reformer[tensorboard]')") from error
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)


class MetricsLog:
    """metrics.jsonl of a run: a new file for a new run; cut to ``resume_step`` for a resumed one. With a
    ``tensorboard`` folder, every number is also a TensorBoard scalar (train/loss, valid/bpb, ...):
    metrics.jsonl stays the record."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard: Path | None = None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            write_atomically(path, "".join(line + "\n" for line in _complete_records(path, resume_step)))
        self.writer = None if tensorboard is None else tensorboard_writer(tensorboard, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        with open(self.path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            try:
                written = f.write(line)
                if written != len(line):
                    raise OSError(28, "short write")
            except OSError as error:
                f.truncate(start)
                raise CheckpointError(f"could not append to {self.path} ({error.strerror or error})") from error
        if self.writer is not None and "event" not in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"valid/{key[len('valid_'):]}" if key.startswith("valid_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and valid bits/byte against steps, as a PNG titled ``title`` (the run)."""
    train = [(r["step"], r["loss"] / math.log(2)) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_bpb"]) for r in records if "valid_bpb" in r]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (one batch)", alpha=0.6)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="valid")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
