"""Does LSH attention learn as well as full attention? Byte LMs on real text, same size, steps and seed.

Models of one size are trained on the Python standard library's source (the ``stdlib`` corpus, which
is on every machine) with the same data order, steps and seed, differing only in their attention
(every layer of a kind) and in the residual stack:

    full          full attention (SDPA), reversible
    lsh-2, lsh-4  LSH attention, 2 and 4 rounds, our default causal window ("bucket")
    lsh-4-chunk   LSH attention, 4 rounds, the anchors' chunk window (trax, transformers)
    local         local attention (a chunk and the one before it)
    full-plain, lsh-4-plain   the same without reversible layers (plain residuals)

Valid bits/byte is recorded during training (curves against steps and against wall time) and measured
once more at the end on a larger held-out sample.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ReformerConfig
from ..plotting import pyplot, save_figure
from ..training.checkpoint import load_checkpoint, load_model
from ..training.data import Corpus
from ..training.loop import TrainConfig, evaluate, train
from .report import Report, markdown_table

# name -> config overrides of the shared base model
VARIANTS = {
    "full": dict(attn_layers="full"),
    "lsh-2": dict(attn_layers="lsh", n_hashes=2),
    "lsh-4": dict(attn_layers="lsh", n_hashes=4),
    "lsh-4-chunk": dict(attn_layers="lsh", n_hashes=4, lsh_window="chunk"),
    "local": dict(attn_layers="local"),
    "full-plain": dict(attn_layers="full", reversible=False),
    "lsh-4-plain": dict(attn_layers="lsh", n_hashes=4, reversible=False),
}


@dataclass
class ParitySettings:
    """The shared model, the training budget and the variants to train."""

    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    n_layers: int = 4
    d_ff: int = 512
    chunk_length: int = 32
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 50
    eval_every: int = 50
    eval_batches: int = 4
    final_eval_batches: int = 32
    variants: tuple = tuple(VARIANTS)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants must be names from {sorted(VARIANTS)}, got {unknown}")


QUICK = ParitySettings(d_model=32, n_heads=2, d_head=16, n_layers=2, d_ff=64, chunk_length=16, seq_len=128,
                       batch_size=4, steps=20, warmup=5, eval_every=10, eval_batches=2, final_eval_batches=4,
                       variants=("full", "lsh-2", "lsh-4-chunk", "local", "lsh-4-plain"))


def model_config(settings: ParitySettings, variant: str) -> ReformerConfig:
    base = dict(vocab_size=256, d_model=settings.d_model, n_heads=settings.n_heads, d_head=settings.d_head,
                n_layers=settings.n_layers, d_ff=settings.d_ff, chunk_length=settings.chunk_length,
                max_seq_len=settings.seq_len)
    return ReformerConfig(**{**base, **VARIANTS[variant]})


def train_config(settings: ParitySettings, seed: int) -> TrainConfig:
    return TrainConfig(data="stdlib", steps=settings.steps, batch_size=settings.batch_size,
                       seq_len=settings.seq_len, lr=settings.lr, warmup=settings.warmup,
                       eval_every=settings.eval_every, eval_batches=settings.eval_batches,
                       checkpoint_every=settings.steps, seed=seed)


def valid_curve(records: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """[(step, seconds of training so far, valid bits/byte)] from a run's metrics records."""
    elapsed = {r["step"]: r["elapsed"] for r in records if "elapsed" in r}
    return [(r["step"], elapsed.get(r["step"], math.nan), r["valid_bpb"]) for r in records if "valid_bpb" in r]


def finished(run_dir: Path, settings: ParitySettings, variant: str, seed: int) -> bool:
    """Whether ``run_dir`` holds a complete run of ``variant`` with exactly these settings and seed."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        trained = json.loads((run_dir / "train.json").read_text())
        _, state = load_checkpoint(run_dir)
    except (OSError, ValueError):   # missing or unreadable files (CheckpointError is a ValueError)
        return False
    return (config == model_config(settings, variant).to_dict()
            and trained == dataclasses.asdict(train_config(settings, seed))
            and state["step"] == settings.steps)


def train_variant(settings: ParitySettings, variant: str, run_dir: Path, seed: int, progress: bool):
    """Train one variant into ``run_dir``; returns its metrics records.

    A complete run of the same settings already there is kept (so an interrupted experiment resumes
    where it stopped); anything else there is replaced.
    """
    if finished(run_dir, settings, variant, seed):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return train(run_dir, model_config(settings, variant), train_config(settings, seed), progress=progress)


@functools.lru_cache(maxsize=1)
def _stdlib() -> Corpus:
    """The stdlib corpus, opened once (opening checks every source file's size and time)."""
    return Corpus.open("stdlib")


def final_bpb(run_dir: Path, settings: ParitySettings, n_hashes: int | None = None,
              model: torch.nn.Module | None = None) -> float:
    """Valid bits/byte of a trained run on ``final_eval_batches`` fixed windows."""
    model = model if model is not None else load_model(run_dir)
    result = evaluate(model, _stdlib(), "valid", settings.seq_len, settings.batch_size,
                      settings.final_eval_batches, torch.device("cpu"), n_hashes=n_hashes)
    return result["bpb"]


def gap_sentence(final: dict[str, float], steps: int) -> str:
    """How far each LSH variant ends from full attention, in words."""
    if "full" not in final:
        return ""
    parts = [f"{name} ends {final[name] - final['full']:+.3f} bits/byte "
             f"({100 * (final[name] / final['full'] - 1):+.1f}%) from full attention"
             for name in final if name.startswith("lsh")]
    return f"After {steps} steps: " + "; ".join(parts) + "." if parts else ""


def plot(curves: dict[str, list], path: Path, settings: ParitySettings) -> None:
    """The validation curves (each point on ``eval_batches`` batches; the table's numbers are a larger
    evaluation of the final weights, so the curves' end points differ from it: the labels say so)."""
    plt = pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, curve in curves.items():
        style = "--" if name.endswith("plain") else "-"
        by_step.plot([c[0] for c in curve], [c[2] for c in curve], style, marker=".", label=name)
        by_time.plot([c[1] for c in curve], [c[2] for c in curve], style, marker=".", label=name)
    by_step.set_xlabel("optimiser step")
    by_time.set_xlabel("training seconds (s, wall clock, this machine)")
    by_step.set_ylabel(f"valid bits per byte ({settings.eval_batches} batches of {settings.batch_size})")
    fig.suptitle(f"lm-parity: validation during training; the table scores the final weights on "
                 f"{settings.final_eval_batches} batches")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend()
    save_figure(fig, path)


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: ParitySettings | None = None) -> dict[str, Any]:
    settings = settings or (QUICK if quick else ParitySettings())
    report = Report("lm-parity", out_dir, seed, quick, dataclasses.asdict(settings))
    runs_root = report.work_dir
    curves, final, seconds = {}, {}, {}
    for variant in settings.variants:
        done = finished(runs_root / variant, settings, variant, seed)
        log(f"  {'reusing the finished run of' if done else 'training'} {variant} ({settings.steps} steps)")
        records = train_variant(settings, variant, runs_root / variant, seed, progress=not quick)
        curves[variant] = valid_curve(records)
        seconds[variant] = max(r["elapsed"] for r in records if "elapsed" in r)
        final[variant] = final_bpb(runs_root / variant, settings)
        log(f"  {variant}: valid {final[variant]:.4f} bits/byte, {seconds[variant]:.0f} s")
    plot(curves, report.path("curves.png"), settings)

    reference = final.get("full")
    rows = [[name, f"{final[name]:.4f}", "" if reference is None else f"{final[name] - reference:+.4f}",
             f"{seconds[name]:.0f}"] for name in settings.variants]
    body = (f"Byte-level LMs on the `stdlib` corpus (held-out valid split), {settings.n_layers} layers of "
            f"d_model {settings.d_model}, {settings.steps} steps of {settings.batch_size} x {settings.seq_len} "
            f"bytes, chunk {settings.chunk_length}, seed {seed}. Final valid bits/byte on "
            f"{settings.final_eval_batches * settings.batch_size} windows of {settings.seq_len} bytes.\n\n"
            + markdown_table(["model", "valid bits/byte", "vs full", "training seconds"], rows)
            + "\n\n" + gap_sentence(final, settings.steps)
            + "\n\n![valid bits/byte against steps and wall time](curves.png)\n")
    return report.write({"final_bpb": final, "train_seconds": seconds, "curves": curves}, "LM parity", body)
