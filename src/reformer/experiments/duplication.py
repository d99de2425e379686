"""The paper's duplication task: sequences 0 w 0 w, scored on the second copy of w.

Section 5 of the Reformer paper trains a 1-layer model (d_model = d_ff = 256, 4 heads) on sequences
of length 1024 with w a random string of 511 symbols from 1..127, with full attention and with LSH
attention of 1, 2 and 4 rounds, and evaluates every trained model with full attention and with LSH
of 1, 2, 4 and 8 rounds. Predicting the second copy needs attention to exactly one far-away position
(token t of the second copy sits half a sequence back), which is what LSH has to find.

"Full attention" here is the LSH layer itself with one bucket and one chunk spanning the sequence:
shared-QK full attention with the same weights, so every model can be evaluated in every mode. "Local"
is the same layer with one bucket and the LSH chunk: each position sees the previous chunk_length to
2 * chunk_length positions, never the first copy, so a local model is the baseline that cannot solve
the task (chance is 1 / n_symbols).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ReformerConfig
from ..nn.head import next_token_loss
from ..nn.model import ReformerLM
from ..ops.hashing import derive_seed
from ..plotting import pyplot, save_figure
from .curriculum import check_curriculum, train_stages
from .report import Report, check_positive_ints, full_attention_overrides, is_positive_int, markdown_table, same_weights

FULL, LOCAL = "full", "local"
NAMED_MODES = (FULL, LOCAL)


@dataclass
class DuplicationSettings:
    """The task and the training budget. ``train_modes`` and ``eval_modes``: "full", "local" or LSH rounds.
    ``curriculum``: (length, steps) stages trained before the ``steps`` at ``length``, each with its own
    warmup and cosine schedule; the model is built for ``length`` throughout."""

    length: int = 1024
    n_symbols: int = 127
    chunk_length: int = 32
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 50
    eval_sequences: int = 256
    eval_batch: int = 32
    train_modes: tuple = (FULL, 4, 2, 1, LOCAL)
    eval_modes: tuple = (FULL, 8, 4, 2, 1)
    curriculum: tuple = ((256, 600), (512, 300))

    def __post_init__(self) -> None:
        check_positive_ints(self, ("length", "n_symbols", "chunk_length", "steps", "batch_size", "eval_sequences",
                                   "eval_batch"))
        if self.length < 4 or self.length % 2:
            raise ValueError(f"length must be an even int >= 4 (0 w 0 w), got {self.length!r}")
        if self.length % self.chunk_length:
            raise ValueError(f"length ({self.length}) must be a multiple of chunk_length ({self.chunk_length})")
        check_curriculum(self.curriculum, lambda n: n % 2 == 0 and 4 <= n <= self.length,
                         f"an even length in [4, length={self.length}]")
        for mode in (*self.train_modes, *self.eval_modes):
            if mode not in NAMED_MODES and not is_positive_int(mode):
                raise ValueError(f"train_modes and eval_modes hold 'full', 'local' or a number of rounds >= 1, "
                                 f"got {mode!r}")


QUICK = DuplicationSettings(length=64, chunk_length=8, steps=150, batch_size=16, lr=3e-3,
                            warmup=20, eval_sequences=64, train_modes=(FULL, 2), eval_modes=(FULL, 4, 1),
                            curriculum=((32, 50),))


def mode_name(mode) -> str:
    return {FULL: "Full", LOCAL: "Local"}.get(mode) or f"LSH-{mode}"


def duplication_batch(n: int, length: int, n_symbols: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) int64 sequences 0 w 0 w with w uniform over 1..n_symbols, of length length/2 - 1."""
    w = torch.randint(1, n_symbols + 1, (n, length // 2 - 1), generator=generator)
    zero = torch.zeros(n, 1, dtype=torch.long)
    return torch.cat([zero, w, zero, w], dim=1)


def model_config(settings: DuplicationSettings, mode, hash_seed: int = 0) -> ReformerConfig:
    """The paper's 1-layer model, with full attention (one bucket, one chunk), local attention (one
    bucket, the LSH chunk) or LSH of ``mode`` rounds."""
    if mode == FULL:
        attention = full_attention_overrides(settings.length)
    elif mode == LOCAL:
        attention = dict(chunk_length=settings.chunk_length, n_hashes=1, n_buckets=1)
    else:
        attention = dict(chunk_length=settings.chunk_length, n_hashes=mode)
    return ReformerConfig.preset("duplication", vocab_size=settings.n_symbols + 1, d_ff=256,
                                 max_seq_len=settings.length, hash_seed=hash_seed, **attention)


def with_attention(model: ReformerLM, settings: DuplicationSettings, mode, hash_seed: int = 0) -> ReformerLM:
    """The same weights attending in another mode (the attention kind changes no parameter)."""
    target = model_config(settings, mode, hash_seed)
    return same_weights(model, **{k: getattr(target, k) for k in
                                  ("n_buckets", "n_hashes", "chunk_length", "n_chunks_before", "hash_seed")})


def copy_loss(model: ReformerLM, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy on the second copy of w: targets at positions L/2 + 1 ... L - 1."""
    half = batch.shape[1] // 2
    logits = model(batch)[:, half:]
    loss = next_token_loss(logits, batch[:, half:])
    return loss, (logits[:, :-1].argmax(-1) == batch[:, half + 1:]).float().mean()


def train_model(settings: DuplicationSettings, mode, seed: int, log=print) -> tuple[ReformerLM, list, float]:
    """Train one model through the curriculum's stages, then ``steps`` at ``length``; returns it, its curve
    [(step, loss, accuracy)] (steps counted over all stages) and the seconds it took."""
    def model_at(length: int, previous: ReformerLM | None) -> ReformerLM:
        return previous or ReformerLM(model_config(settings, mode)).train()   # built for ``length`` throughout

    def batch_loss(model: ReformerLM, length: int, n: int, generator: torch.Generator):
        return copy_loss(model, duplication_batch(n, length, settings.n_symbols, generator))

    return train_stages([*settings.curriculum, (settings.length, settings.steps)], model_at, batch_loss,
                        name=mode_name(mode), lr=settings.lr, warmup=settings.warmup,
                        batch_size=settings.batch_size, seed=seed, log=log)


@torch.no_grad()
def evaluate(model: ReformerLM, settings: DuplicationSettings, mode, seed: int) -> float:
    """Accuracy on the second copy over held-out sequences; each batch hashes with fresh rotations."""
    correct = 0.0
    n_batches = math.ceil(settings.eval_sequences / settings.eval_batch)
    for i in range(n_batches):
        generator = torch.Generator().manual_seed(derive_seed(seed, 1, i))
        n = min(settings.eval_batch, settings.eval_sequences - i * settings.eval_batch)
        batch = duplication_batch(n, settings.length, settings.n_symbols, generator)
        _, accuracy = copy_loss(with_attention(model, settings, mode, hash_seed=derive_seed(seed, 2, i)), batch)
        correct += accuracy.item() * n
    return correct / settings.eval_sequences


def plot_training(curves: dict[str, list], settings: DuplicationSettings, quick: bool, path: Path) -> None:
    """Training accuracy against the optimiser step, one line per trained model (curves: name -> [(step,
    loss, accuracy), ...]), a dashed line where the curriculum doubles the length."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [100 * c[2] for c in curve], label=f"trained {name}")
    for boundary in itertools.accumulate(steps for _, steps in settings.curriculum):
        ax.axvline(boundary, color="grey", ls="--", lw=0.8)
    lengths = ", ".join(str(length) for length in [*(n for n, _ in settings.curriculum), settings.length])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("accuracy on the second copy (%, training batches)")
    ax.set_title(f"duplication: training at lengths {lengths}{' (--quick)' if quick else ''}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: DuplicationSettings | None = None) -> dict[str, Any]:
    settings = settings or (QUICK if quick else DuplicationSettings())
    report = Report("duplication", out_dir, seed, quick, dataclasses.asdict(settings))
    table, curves, seconds = {}, {}, {}
    for train_mode in settings.train_modes:
        model, curves[mode_name(train_mode)], seconds[mode_name(train_mode)] = \
            train_model(settings, train_mode, seed, log)
        table[mode_name(train_mode)] = {mode_name(m): evaluate(model, settings, m, seed + 1)
                                        for m in settings.eval_modes}
        log(f"  {mode_name(train_mode)}: " + ", ".join(f"{k} {v:.1%}" for k, v in table[mode_name(train_mode)].items()))

    plot_training(curves, settings, quick, report.path("training.png"))
    eval_names = [mode_name(m) for m in settings.eval_modes]
    stages = ", then ".join(f"{steps} at length {length}" for length, steps in
                            [*settings.curriculum, (settings.length, settings.steps)])
    rows = [[f"{name}", *(f"{100 * table[name][e]:.1f}" for e in eval_names)] for name in table]
    chance = 100 / settings.n_symbols
    body = (f"Accuracy (%) on the second copy of w, sequences 0 w 0 w of length {settings.length} "
            f"(symbols 1..{settings.n_symbols}, chance {chance:.1f}%), {settings.eval_sequences} held-out "
            f"sequences, fresh hashing rotations per batch. Rows: attention the model was trained with "
            f"({stages} steps of {settings.batch_size} sequences, each stage with its own warmup and "
            "cosine schedule); columns: attention at evaluation.\n\n"
            + markdown_table(["train \\ eval", *eval_names], rows)
            + "\n\nThe paper (length 1024, 150K steps): Full 100 / 94.8 / 92.5 / 76.9 / 52.5; "
              "LSH-4 0.8 / 100 / 99.9 / 99.4 / 91.9; LSH-2 0.8 / 100 / 99.9 / 98.1 / 86.8; "
              "LSH-1 0.8 / 99.9 / 99.6 / 94.8 / 77.9 (columns Full, LSH-8, LSH-4, LSH-2, LSH-1).\n\n"
              "![training accuracy](training.png)\n")
    return report.write({"accuracy": table, "train_seconds": seconds, "curves": curves},
                        "Duplication task", body)
