"""Does an LSH byte LM use context that local attention cannot see? Trained on long windows, scored by position.

Byte LMs of one size are trained on windows of ``seq_len`` bytes (8192) of the stdlib corpus with
lm-parity's machinery (the same data order, steps and seed), differing only in their attention:

    lsh-2   LSH attention in every layer, 2 rounds, the causal "bucket" window
    local   local attention in every layer: a chunk and the one before it, so that n layers see at
            most n * (2 * chunk_length - 1) bytes back (252 for 4 layers of chunk 32)

Both are scored on the held-out split in windows of 512 to ``seq_len`` bytes: bits/byte of each whole
window, and bits/byte against the position in the window (bins of powers of two). The byte at position
p is predicted from p bytes of context, and windows start at arbitrary places of the text, so a curve
that keeps falling past the local model's reach is context being used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..nn.head import next_token_loss
from ..plotting import pyplot, save_figure
from ..training.checkpoint import load_model
from ..training.data import eval_batches
from . import lm_parity
from .report import Report, check_positive_ints, is_positive_int, markdown_table, same_weights

TRAINING = lm_parity.ParitySettings(seq_len=8192, batch_size=1, steps=600, warmup=60, eval_every=150,
                                    eval_batches=1, final_eval_batches=1, variants=("lsh-2", "local"))
QUICK_TRAINING = dataclasses.replace(lm_parity.QUICK, seq_len=512, steps=20, variants=("lsh-2", "local"))


@dataclass
class ContextSettings:
    """The models and their training (``training``: lm-parity's settings), the window lengths scored, the
    held-out bytes scored per window length, and extra rounds the LSH models are scored with at the
    longest window."""

    training: lm_parity.ParitySettings = field(default_factory=lambda: TRAINING)
    windows: tuple = (512, 1024, 2048, 4096, 8192)
    eval_bytes: int = 524288
    eval_batch: int = 4
    extra_rounds: tuple = (8,)

    def __post_init__(self) -> None:
        longest = self.training.seq_len
        bad = [w for w in self.windows if not is_positive_int(w) or not 2 <= w <= longest]
        if bad or not self.windows:
            raise ValueError(f"windows must be ints in [2, training.seq_len={longest}], got {self.windows!r}")
        check_positive_ints(self, ("eval_bytes", "eval_batch"))
        if self.eval_bytes < max(self.windows):
            raise ValueError(f"eval_bytes ({self.eval_bytes}) must hold at least one window of "
                             f"{max(self.windows)} bytes")
        if not all(is_positive_int(r) for r in self.extra_rounds):
            raise ValueError(f"extra_rounds hold positive ints, got {self.extra_rounds!r}")


QUICK = ContextSettings(training=QUICK_TRAINING, windows=(128, 512), eval_bytes=2048, extra_rounds=(4,))


def position_edges(longest: int) -> list[int]:
    """Bins of context length [1, 32), [32, 64), [64, 128), ... up to ``longest`` (the last bin ends there)."""
    edges = [1] + [2 ** k for k in range(5, max(5, (longest - 1).bit_length()) + 1) if 2 ** k < longest]
    return edges + [longest]


@torch.no_grad()
def score_windows(model: torch.nn.Module, data, window: int, settings: ContextSettings,
                  n_hashes: int | None = None) -> dict[str, Any]:
    """Bits/byte of ``model`` on eval_bytes // window fixed held-out windows of ``window`` bytes: the mean,
    and the mean at each context length p (the byte at position p of a window, predicted from p bytes):
    "by_context" lists bits/byte for p = 1 .. window - 1."""
    wanted = settings.eval_bytes // window
    total, n_windows = torch.zeros(window - 1, dtype=torch.float64), 0
    for batch in eval_batches(data, settings.eval_batch, window, math.ceil(wanted / settings.eval_batch)):
        batch = batch[:wanted - n_windows]
        logits = model(batch, n_hashes=n_hashes)
        total += next_token_loss(logits, batch, reduction="none").view(batch.shape[0], -1).double().sum(0)
        n_windows += batch.shape[0]
    if n_windows < wanted:   # the split is shorter than eval_bytes: say so rather than score fewer bytes
        raise ValueError(f"eval_bytes ({settings.eval_bytes}) asks for {wanted} windows of {window} bytes; "
                         f"the split holds {n_windows}")
    by_context = total / n_windows / math.log(2)
    return {"window": window, "windows": n_windows, "bpb": by_context.mean().item(),
            "by_context": by_context.tolist()}


def binned(by_context: list[float], edges: list[int]) -> list[float | None]:
    """Mean bits/byte of context lengths p in each [edges[i], edges[i + 1]) (by_context[p - 1] is p's)."""
    out = []
    for low, high in itertools.pairwise(edges):
        inside = by_context[low - 1:high - 1]
        out.append(sum(inside) / len(inside) if inside else None)
    return out


def local_reach(settings: ContextSettings) -> int:
    """How far back the local model sees: per layer a chunk and the one before it."""
    return settings.training.n_layers * (2 * settings.training.chunk_length - 1)


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: ContextSettings | None = None) -> dict[str, Any]:
    settings = settings or (QUICK if quick else ContextSettings())
    training = settings.training
    report = Report("context", out_dir, seed, quick, dataclasses.asdict(settings))
    valid = lm_parity._stdlib().split("valid")
    scores, seconds = [], {}
    for variant in training.variants:
        run_dir = report.work_dir / variant
        done = lm_parity.finished(run_dir, training, variant, seed)
        log(f"  {'reusing the finished run of' if done else 'training'} {variant} ({training.steps} steps of "
            f"{training.batch_size} x {training.seq_len} bytes)")
        records = lm_parity.train_variant(training, variant, run_dir, seed, progress=not quick)
        seconds[variant] = max(r["elapsed"] for r in records if "elapsed" in r)
        model = load_model(run_dir).eval()
        lsh = model.config.n_hashes if "lsh" in model.config.attn_layers else None
        evaluations = [(w, lsh) for w in settings.windows]
        if lsh is not None:
            evaluations += [(training.seq_len, r) for r in settings.extra_rounds if r != lsh]
        for window, rounds in evaluations:
            scored = model if rounds == lsh else same_weights(model, n_hashes=rounds)
            point = {"model": variant, "rounds": rounds, **score_windows(scored, valid, window, settings)}
            scores.append(point)
            log(f"  {label(point)}, windows of {window}: {point['bpb']:.4f} bits/byte")
    return _write(report, settings, scores, seconds, quick)


def label(point: dict[str, Any]) -> str:
    return point["model"] if point["rounds"] is None else f"{point['model']} (evaluated with {point['rounds']} rounds)"


def _write(report: Report, settings: ContextSettings, scores: list, seconds: dict, quick: bool) -> dict[str, Any]:
    training, longest = settings.training, settings.training.seq_len
    edges = position_edges(longest)
    reach = local_reach(settings)
    full_window = [p for p in scores if p["window"] == longest]

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    centres = [math.sqrt(low * high) for low, high in itertools.pairwise(edges)]
    for point in full_window:
        ax.plot(centres, binned(point["by_context"], edges), "o-", label=label(point))
    ax.axvline(reach, color="grey", ls="--", lw=0.8, label=f"local model's reach ({reach} bytes)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"context: position of the byte in a window of {longest} (bytes)")
    ax.set_ylabel("valid bits per byte")
    ax.set_title(f"context: bits/byte against position{' (--quick)' if quick else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, report.path("position.png"))

    rows_of = list(dict.fromkeys((p["model"], p["rounds"]) for p in scores))

    def cell(model, rounds, window):
        p = next((p for p in scores if (p["model"], p["rounds"], p["window"]) == (model, rounds, window)), None)
        return "" if p is None else f"{p['bpb']:.4f}"

    windows = list(settings.windows)
    window_rows = [[label({"model": m, "rounds": r}), *(cell(m, r, w) for w in windows)] for m, r in rows_of]
    bin_names = [f"{low}-{high - 1}" for low, high in itertools.pairwise(edges)]
    position_rows = [[label(p), *("" if b is None else f"{b:.3f}" for b in binned(p["by_context"], edges))]
                     for p in full_window]
    # Every bin holds different text, so a bin's bits/byte is mostly how hard that text is; the gap to the
    # local model, scored on the same bytes, is what context adds.
    local = next((p for p in full_window if p["model"] == "local"), None)
    if local is not None:
        position_rows += [[f"{label(p)} minus local", *(f"{a - b:+.3f}" for a, b in zip(
            binned(p["by_context"], edges), binned(local["by_context"], edges), strict=True))]
            for p in full_window if p is not local]
    t = training
    body = (f"Byte LMs on the `stdlib` corpus: {t.n_layers} layers of d_model {t.d_model} ({t.n_heads} heads x "
            f"{t.d_head}, d_ff {t.d_ff}, chunk {t.chunk_length}), trained {t.steps} steps of {t.batch_size} x "
            f"{t.seq_len} bytes (lr {t.lr}, warmup {t.warmup}), the same data order and seed. Training "
            "seconds: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f". Scored on "
            f"{settings.eval_bytes} held-out bytes per window length, cut into fixed windows.\n\n"
            "Valid bits/byte by window length:\n\n"
            + markdown_table(["model", *windows], window_rows)
            + f"\n\nValid bits/byte against context (the byte's position in a window of {longest}), "
              f"the local model seeing at most {reach} bytes back:\n\n"
            + markdown_table(["model", *bin_names], position_rows)
            + "\n\nWithin one window length every model scores the same bytes, so the rows \"minus local\" "
              "show what context the local model cannot see is worth, bin by bin."
            + "\n\n![bits/byte against position](position.png)\n")
    return report.write({"scores": scores, "train_seconds": seconds, "position_edges": edges,
                         "local_reach": reach}, "Context on real text", body)
