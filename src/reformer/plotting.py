"""Matplotlib on the file-only Agg backend, and PNGs written atomically (shared by training and reports)."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save a figure as PNG through a temporary name and a rename, then close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, path)


def time_and_memory(points: list[dict], implementations, memory_key: str, time_label: str, memory_label: str,
                    title: str, path: Path) -> None:
    """Two log-log panels against sequence length, one line per implementation: seconds, and the memory
    of each point (``memory_key``). points: dicts with "implementation", "length", "seconds"."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for impl in implementations:
        rows = sorted((p["length"], p["seconds"], p[memory_key]) for p in points if p["implementation"] == impl)
        if rows:
            lengths, seconds, memory = zip(*rows, strict=True)
            axes[0].plot(lengths, seconds, "o-", label=impl)
            axes[1].plot(lengths, memory, "o-", label=impl)
    axes[0].set_ylabel(time_label)
    axes[1].set_ylabel(memory_label)
    for ax in axes:   # lengths in powers of two, seconds and MiB in decades with their numbers
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(pyplot().matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(title)
    save_figure(fig, path)
