"""Seconds per training step against length at a fixed number of tokens per batch (the paper's speed figure).

The measuring code is shared with ``benchmarks/model.py`` (which adds transformers' model): one
training step (forward, loss, backward, Adam) of a reversible byte LM (d_model 256, 4 heads x 64,
d_ff 1024, chunk 64, buckets by transformers' rule) with full attention (SDPA) or LSH attention of 1,
2, 4 and 8 rounds, each point in a fresh process (so peak RSS is the point's own), after a warm-up step.
With batch = tokens / length the work of full attention grows with the length, LSH's stays nearly flat.

    python -m reformer.experiments.speed IMPL LENGTH BATCH N_HASHES N_LAYERS   # one point, JSON on stdout
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CHUNK = 64
REFORMER_IMPLEMENTATIONS = ("ours", "full")


def build_reformer(impl: str, length: int, n_hashes: int, n_layers: int = 6):
    """(model, loss of a batch): our LM with LSH ("ours") or full attention ("full") in every layer."""
    from ..config import ReformerConfig, transformers_n_buckets
    from ..nn.model import ReformerLM

    if impl not in REFORMER_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {REFORMER_IMPLEMENTATIONS}, got {impl!r}")
    cfg = ReformerConfig(d_model=256, n_heads=4, d_head=64, n_layers=n_layers, d_ff=1024,
                         attn_layers="lsh" if impl == "ours" else "full", n_hashes=n_hashes,
                         chunk_length=CHUNK, n_buckets=transformers_n_buckets(length, CHUNK), max_seq_len=length,
                         ff_chunk_size=4096)
    model = ReformerLM(cfg).train()
    return model, model.loss


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: the kernel's high-water mark of its own memory (VmHWM,
    Linux), else ru_maxrss. On Linux ru_maxrss carries a parent's peak into a child through exec (a child
    of a 400 MiB parent reports at least 400 MiB), which put a floor under every small point that a
    benchmark measured in a child process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_step(build: Callable[[int], tuple[Any, Callable]], length: int, batch: int) -> dict[str, float]:
    """Seconds and peak RSS (MiB) of one training step of build(length) on a random (batch, length) batch.

    A warm-up step on one short sequence comes first (lazy initialisation is not the step's cost).
    """
    import torch

    torch.manual_seed(0)
    for n, b in ((min(length, 512), 1), (length, batch)):
        model, loss_of = build(n)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 256, (b, n))
        start = time.perf_counter()
        loss_of(ids).backward()
        optimizer.step()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def measure(command: list[str], point: dict[str, Any], repeats: int, timeout: float,
            keys: tuple[str, ...] = ("seconds", "peak_rss_mib"), env: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """Run ``command`` (which prints one JSON object last) ``repeats`` times, each in a fresh process.

    Returns ``point`` with the first run's fields and the median of each of ``keys`` over the runs, or
    ``point`` with an "error" (a timeout or the child's last line of stderr).
    """
    runs = []
    for _ in range(repeats):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {**point, "error": f"over {timeout} s"}
        if out.returncode != 0:
            return {**point, "error": " ".join(out.stderr.strip().splitlines()[-1:])}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**runs[0], **point, "repeats": repeats, **{k: statistics.median(r[k] for r in runs) for k in keys}}


def measure_reformer(impl: str, length: int, batch: int, n_hashes: int, n_layers: int, repeats: int,
                     timeout: float) -> dict[str, Any]:
    point = {"implementation": impl, "length": length, "batch": batch, "n_hashes": n_hashes,
             "n_layers": n_layers}
    command = [sys.executable, "-m", __name__, impl, str(length), str(batch), str(n_hashes), str(n_layers)]
    return measure(command, point, repeats, timeout)


# -- the experiment ------------------------------------------------------------------------------------
@dataclass
class SpeedSettings:
    tokens: int = 16384
    lengths: tuple = (1024, 2048, 4096, 8192, 16384)
    rounds: tuple = (1, 2, 4, 8)
    n_layers: int = 2
    repeats: int = 1
    timeout: float = 900

    def __post_init__(self) -> None:
        bad = [n for n in self.lengths if n > self.tokens or n % CHUNK]
        if bad:
            raise ValueError(f"lengths must be multiples of {CHUNK} and at most tokens ({self.tokens}), got {bad}")


QUICK = SpeedSettings(tokens=1024, lengths=(256, 1024), rounds=(1, 2), n_layers=1, timeout=110)


def mode_name(impl: str, n_hashes: int) -> str:
    return "full attention" if impl == "full" else f"LSH-{n_hashes}"


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: SpeedSettings | None = None) -> dict[str, Any]:
    from ..plotting import pyplot, save_figure
    from .report import Report, markdown_table

    settings = settings or (QUICK if quick else SpeedSettings())
    report = Report("speed", out_dir, seed, quick, dataclasses.asdict(settings))
    modes = [("full", 1)] + [("ours", r) for r in settings.rounds]
    points = []
    for length in settings.lengths:
        for impl, n_hashes in modes:
            point = measure_reformer(impl, length, settings.tokens // length, n_hashes, settings.n_layers,
                                     settings.repeats, settings.timeout)
            points.append(point)
            log(f"  {mode_name(impl, n_hashes)} at {length} x {point['batch']}: "
                + (f"{point['seconds']:.2f} s, {point['peak_rss_mib']:.0f} MiB" if "seconds" in point
                   else point["error"]))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, n_hashes in modes:
        rows = [(p["length"], p["seconds"]) for p in points
                if p["implementation"] == impl and p["n_hashes"] == n_hashes and "seconds" in p]
        if rows:
            ax.plot(*zip(*rows, strict=True), "o-", label=mode_name(impl, n_hashes))
    # Lengths in powers of two; seconds in decades, numbered as seconds (not as powers of two).
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel(f"sequence length (tokens; batch = {settings.tokens} tokens / length)")
    ax.set_ylabel("seconds per training step (s)")
    ax.set_title(f"speed: one training step{' (--quick)' if quick else ''}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, report.path("speed.png"))

    def cell(length, impl, n_hashes):
        p = next(p for p in points if p["length"] == length and p["implementation"] == impl
                 and p["n_hashes"] == n_hashes)
        return f"{p['seconds']:.2f} s / {p['peak_rss_mib'] / 1024:.2f} GB" if "seconds" in p else p["error"]

    rows = [[f"{length} x {settings.tokens // length}", *(cell(length, *m) for m in modes)]
            for length in settings.lengths]
    body = (f"One training step (forward, loss, backward, Adam) of a {settings.n_layers}-layer reversible byte "
            f"LM (d_model 256, 4 heads x 64, d_ff 1024, chunk {CHUNK}) on {settings.tokens} tokens per batch, "
            f"each point in a fresh process after a warm-up step, median of {settings.repeats}. "
            "Seconds / peak RSS:\n\n"
            + markdown_table(["length x batch", *(mode_name(*m) for m in modes)], rows)
            + "\n\n![seconds per step against length](speed.png)\n")
    return report.write({"points": points}, "Speed against length", body)


if __name__ == "__main__":
    impl, length, batch, n_hashes, n_layers = sys.argv[1:6]
    result = time_step(lambda n: build_reformer(impl, n, int(n_hashes), int(n_layers)), int(length), int(batch))
    print(json.dumps({"implementation": impl, "length": int(length), "batch": int(batch),
                      "n_hashes": int(n_hashes), **result}))
