"""Associative recall far back: key-value pairs spread through a long sequence, queried at its end.

A sequence of ``length`` tokens is filler with ``n_pairs`` pair tokens (each holds one key and its value)
spread through it, one per stretch of the context, and ends in a query block that names every key once
more, in a random order, each followed by its value: "k v k v ...". The model is scored on the value after
each key of the query block; its pair token sits up to the whole sequence back. Keys are distinct within a
sequence; values are uniform (chance is 1 / n_values).

The model has no position embeddings and two layers: a local one, then the retrieving one. With no
positions, what the retrieving layer can use is content: the query's key must find the pair token that
holds it. Nothing in the model depends on the length, so a model trained at ``train_length`` runs at any
length; LSH gets buckets in proportion to the length (2 * length / lsh_chunk_length), which keeps every
bucket as full as in training. The local baseline (two local layers) sees 2 * chunk_length positions back:
only the pairs that lie that close to their query.

Training runs through a curriculum (curriculum.py): at lengths 64 and 128 the pair is one of a few dozen
earlier positions and the match between a key and its pair token can be found; from scratch at 256 it is
not. With one or two LSH rounds whether it is found is fragile: rounding differences (another CPU, another
torch thread count) can decide it, since a query meets its pair only when they share a bucket. The LSH
chunk is longer than the local one because a query sees only the lsh_chunk_length items before it in its
bucket's sorted run, and the query block's own 2 * n_pairs tokens come last in every bucket: with a
window of 16 they crowd out the pairs.

Modes: FULL (the LSH layer with one bucket and one chunk over the sequence: shared-QK full attention with
the same weights, quadratic in the length), LOCAL, or a number of LSH rounds. A model trained in FULL or
LSH is evaluated in FULL and with each of ``eval_rounds``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ReformerConfig
from ..nn.head import token_loss
from ..nn.model import ReformerLM
from ..ops.hashing import derive_seed
from ..plotting import pyplot, save_figure
from .curriculum import check_curriculum, train_stages
from .report import Report, check_positive_ints, full_attention_overrides, is_positive_int, markdown_table, same_weights

FULL, LOCAL = "full", "local"


@dataclass
class LongRangeSettings:
    """The task, the model and the budget. ``train_modes``: FULL, LOCAL or a number of LSH rounds; models
    not trained LOCAL are evaluated with full attention and with each of ``eval_rounds``. ``curriculum``:
    (length, steps) stages trained before the ``steps`` at ``train_length``."""

    train_length: int = 256
    eval_lengths: tuple = (256, 1024, 4096, 16384)
    n_pairs: int = 16
    n_keys: int = 16
    n_values: int = 4
    n_filler: int = 16
    chunk_length: int = 16
    lsh_chunk_length: int = 64
    d_model: int = 64
    curriculum: tuple = ((64, 1200), (128, 300))
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    eval_sequences: int = 32
    eval_batch: int = 8
    train_modes: tuple = (FULL, 1, 2, 4, LOCAL)
    eval_rounds: tuple = (1, 2, 4, 8)
    distance_bins: int = 8

    def __post_init__(self) -> None:
        check_positive_ints(self, ("train_length", "n_pairs", "n_keys", "n_values", "n_filler", "chunk_length",
                                   "lsh_chunk_length", "d_model", "steps", "batch_size", "eval_sequences", "eval_batch",
                                   "distance_bins"))
        if self.n_keys < self.n_pairs:
            raise ValueError(f"n_keys ({self.n_keys}) must be at least n_pairs ({self.n_pairs}): keys are distinct")
        for length in (self.train_length, *self.eval_lengths):
            if isinstance(length, bool) or not isinstance(length, int) or length % self.chunk_length:
                raise ValueError(f"train_length and eval_lengths must be multiples of chunk_length "
                                 f"({self.chunk_length}), got {length!r}")
            if context_slot(self, length) < 1:
                raise ValueError(f"length {length} leaves the {self.n_pairs} pairs fewer positions than "
                                 f"pairs before the query block of {2 * self.n_pairs}; use longer sequences "
                                 "or fewer pairs")
        check_curriculum(self.curriculum, lambda n: n % self.chunk_length == 0 and n <= self.train_length
                         and context_slot(self, n) >= 1,
                         f"a length that is a multiple of chunk_length ({self.chunk_length}), at most "
                         f"train_length ({self.train_length}) and at least {3 * self.n_pairs} (room for the pairs)")
        for mode in self.train_modes:
            if mode not in (LOCAL, FULL) and not is_positive_int(mode):
                raise ValueError(f"train_modes hold 'full', 'local' or a number of LSH rounds >= 1, got {mode!r}")
        for rounds in self.eval_rounds:
            if not is_positive_int(rounds):
                raise ValueError(f"eval_rounds hold positive ints, got {rounds!r}")

    @property
    def vocab_size(self) -> int:
        return self.n_filler + self.n_keys + self.n_values + self.n_keys * self.n_values


def context_slot(settings: "LongRangeSettings", length: int) -> int:
    """Positions per pair in the context (everything before the query block)."""
    return (length - 2 * settings.n_pairs) // settings.n_pairs


QUICK = LongRangeSettings(eval_lengths=(256, 1024), curriculum=((64, 100),), steps=60, batch_size=16, eval_sequences=8,
                          train_modes=(FULL, LOCAL), eval_rounds=(1, 2), distance_bins=4)


def recall_batch(n: int, length: int, settings: LongRangeSettings, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n sequences of ``length`` tokens.

    Returns ids (n, length) int64; query (n, n_pairs): the positions of the query block's keys, where the
    logits predict the value; answer (n, n_pairs): those values; distance (n, n_pairs): how far back from
    the query's key its pair token sits. Token ids: filler [0, n_filler), keys, values, then the pair
    tokens, one per (key, value): pair_token(settings, k, v).
    """
    s, pairs = settings, settings.n_pairs
    ids = torch.randint(0, s.n_filler, (n, length), generator=generator)
    keys = torch.argsort(torch.rand(n, s.n_keys, generator=generator), dim=1)[:, :pairs]   # distinct
    values = torch.randint(0, s.n_values, (n, pairs), generator=generator)
    # Pair i sits at a random place in stretch i of the context.
    slot = context_slot(s, length)
    pair_at = torch.arange(pairs) * slot + torch.randint(0, slot, (n, pairs), generator=generator)
    ids[torch.arange(n)[:, None], pair_at] = pair_token(s, keys, values)
    # The query block: every key once, in a random order, each followed by its value.
    order = torch.argsort(torch.rand(n, pairs, generator=generator), dim=1)
    query = length - 2 * pairs + 2 * torch.arange(pairs)
    ids[:, query] = s.n_filler + keys.gather(1, order)
    answer = s.n_filler + s.n_keys + values.gather(1, order)
    ids[:, query + 1] = answer
    distance = query - pair_at.gather(1, order)
    return ids, query.expand(n, pairs), answer, distance


def pair_token(settings: LongRangeSettings, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The token that holds key ``key`` (0-based) with value ``value`` (0-based)."""
    return settings.n_filler + settings.n_keys + settings.n_values + key * settings.n_values + value


def model_config(settings: LongRangeSettings, mode, length: int, hash_seed: int = 0) -> ReformerConfig:
    """Two layers, a local one and then the retrieving one, no position embeddings. ``mode``: an LSH layer
    with ``mode`` rounds, chunks of lsh_chunk_length and 2 * length / lsh_chunk_length buckets (at least
    2); FULL: the same layer with one bucket
    and one chunk over the sequence (shared-QK full attention, the same weights); LOCAL: a second local
    layer."""
    c = settings.chunk_length
    if mode == FULL:
        attention = full_attention_overrides(length)
    elif mode == LOCAL:
        attention = dict(chunk_length=c)
    else:
        lc = settings.lsh_chunk_length
        attention = dict(n_hashes=mode, n_buckets=max(2, 2 * length // lc), chunk_length=lc)
    return ReformerConfig(vocab_size=settings.vocab_size, d_model=settings.d_model, n_heads=2,
                          d_head=settings.d_model // 2, n_layers=2, d_ff=2 * settings.d_model,
                          attn_layers=(LOCAL, LOCAL if mode == LOCAL else "lsh"), local_chunk_length=c,
                          local_n_chunks_before=1, position_embedding="none", max_seq_len=length,
                          hash_seed=hash_seed, **attention)


def at_length(model: ReformerLM, settings: LongRangeSettings, mode, length: int, hash_seed: int) -> ReformerLM:
    """The same weights attending in ``mode`` at ``length`` (attention settings change no parameter)."""
    target = model_config(settings, mode, length, hash_seed)
    return same_weights(model, **{k: getattr(target, k) for k in ("n_buckets", "n_hashes", "chunk_length",
                                                                  "n_chunks_before", "max_seq_len", "hash_seed")})


def recall_logits(model: ReformerLM, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The logits at the query block's keys: (n, n_pairs, vocab)."""
    logits = model(ids)
    return logits.gather(1, query[..., None].expand(-1, -1, logits.shape[-1]))


def train_model(settings: LongRangeSettings, mode, seed: int, log=print) -> tuple[ReformerLM, list, float]:
    """Train one model through the curriculum, then ``steps`` at train_length; returns it (eval mode), its
    curve [(step, loss, accuracy)] and the seconds it took."""
    def model_at(length: int, previous: ReformerLM | None) -> ReformerLM:
        model = ReformerLM(model_config(settings, mode, length)).train()   # attention sized for the stage
        if previous is not None:
            model.load_state_dict(previous.state_dict())
        return model

    def batch_loss(model: ReformerLM, length: int, n: int, generator: torch.Generator):
        ids, query, answer, _ = recall_batch(n, length, settings, generator)
        logits = recall_logits(model, ids, query)
        return token_loss(logits, answer), (logits.argmax(-1) == answer).float().mean()

    return train_stages([*settings.curriculum, (settings.train_length, settings.steps)], model_at, batch_loss,
                        name=mode_name(mode), lr=settings.lr, warmup=settings.warmup,
                        batch_size=settings.batch_size, seed=seed, log=log)


def mode_name(mode) -> str:
    return {FULL: "Full", LOCAL: "Local"}.get(mode) or f"LSH-{mode}"


@torch.no_grad()
def evaluate(model: ReformerLM, settings: LongRangeSettings, mode, length: int, seed: int) -> dict[str, Any]:
    """Accuracy at ``length`` over eval_sequences held-out sequences (fresh rotations per batch): overall
    and per pair, with each pair's distance; and seconds per sequence."""
    correct, distances, seconds = [], [], 0.0
    n_batches = math.ceil(settings.eval_sequences / settings.eval_batch)
    for i in range(n_batches):
        generator = torch.Generator().manual_seed(derive_seed(seed, length, i))
        n = min(settings.eval_batch, settings.eval_sequences - i * settings.eval_batch)
        ids, query, answer, distance = recall_batch(n, length, settings, generator)
        attending = at_length(model, settings, mode, length, derive_seed(seed, 2, length, i))
        tick = time.perf_counter()
        predicted = recall_logits(attending, ids, query).argmax(-1)
        seconds += time.perf_counter() - tick
        correct.append(predicted == answer)
        distances.append(distance)
    correct, distances = torch.cat(correct).flatten(), torch.cat(distances).flatten()
    return {"length": length, "mode": mode_name(mode), "accuracy": correct.float().mean().item(),
            "seconds_per_sequence": seconds / settings.eval_sequences,
            "pairs": [[int(d), bool(c)] for d, c in zip(distances, correct, strict=True)]}


def by_distance(pairs: list, edges: list[float]) -> list[float | None]:
    """Accuracy of [distance, correct] pairs in each bin [edges[i], edges[i + 1]) (None where empty)."""
    out = []
    for low, high in itertools.pairwise(edges):
        inside = [c for d, c in pairs if low <= d < high]
        out.append(sum(inside) / len(inside) if inside else None)
    return out


def time_step(settings: LongRangeSettings, mode, length: int, timeout: float = 600) -> dict[str, Any]:
    """Seconds and peak RSS (MiB) of one training step of one sequence of ``length`` tokens in ``mode``, in
    a fresh process (speed.measure), or the point with an "error"."""
    import sys

    from . import speed

    command = [sys.executable, "-m", __name__, str(mode), str(length), str(settings.chunk_length),
               str(settings.lsh_chunk_length), str(settings.d_model), str(settings.n_pairs)]
    return speed.measure(command, {"mode": mode_name(mode), "length": length, "batch": 1}, 1, timeout)


def eval_modes(settings: LongRangeSettings, trained) -> tuple:
    """The modes a model trained in ``trained`` is evaluated in: a local model as itself; the others with
    full attention and each of eval_rounds."""
    return (LOCAL,) if trained == LOCAL else (FULL, *settings.eval_rounds)


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: LongRangeSettings | None = None) -> dict[str, Any]:
    settings = settings or (QUICK if quick else LongRangeSettings())
    report = Report("long-range", out_dir, seed, quick, dataclasses.asdict(settings))
    points, curves, train_seconds = [], {}, {}
    for trained in settings.train_modes:
        model, curve, seconds = train_model(settings, trained, seed, log)
        curves[mode_name(trained)], train_seconds[mode_name(trained)] = curve, seconds
        for mode in eval_modes(settings, trained):
            for length in settings.eval_lengths:
                point = {"trained": mode_name(trained), **evaluate(model, settings, mode, length, seed + 1)}
                points.append(point)
                log(f"  trained {mode_name(trained)}, evaluated {point['mode']} at {length}: {point['accuracy']:.1%}")
    longest = max(settings.eval_lengths)
    steps = []
    for mode in dict.fromkeys(m for t in settings.train_modes for m in eval_modes(settings, t)):
        steps.append(time_step(settings, mode, longest))
        log(f"  a training step of {mode_name(mode)} at {longest}: " + (
            f"{steps[-1]['seconds']:.2f} s, {steps[-1]['peak_rss_mib']:.0f} MiB" if "seconds" in steps[-1]
            else steps[-1]["error"]))
    return _write(report, settings, points, curves, train_seconds, steps, quick)


def _write(report: Report, settings: LongRangeSettings, points: list, curves: dict, train_seconds: dict,
           steps: list, quick: bool) -> dict[str, Any]:
    rows_of = list(dict.fromkeys((p["trained"], p["mode"]) for p in points))   # (trained, evaluated)
    lengths = list(settings.eval_lengths)
    longest = max(lengths)
    edges = [0.0] + [longest * 2.0 ** (k - settings.distance_bins + 1) for k in range(settings.distance_bins)]
    edges[-1] = float(longest + 1)

    def pooled(trained, mode):
        return [pr for p in points if (p["trained"], p["mode"]) == (trained, mode) for pr in p["pairs"]]

    plot_distance(points, settings, edges, quick, report.path("distance.png"))

    def cell(trained, mode, length):
        p = next((p for p in points if (p["trained"], p["mode"], p["length"]) == (trained, mode, length)), None)
        return "" if p is None else f"{100 * p['accuracy']:.1f}"

    rows = [[trained, mode, *(cell(trained, mode, n) for n in lengths)] for trained, mode in rows_of]
    bin_names = [f"{int(low)}-{int(high) - 1}" for low, high in itertools.pairwise(edges)]
    dist_rows = [[trained, mode, *("" if a is None else f"{100 * a:.1f}" for a in by_distance(pooled(trained, mode),
                                                                                             edges))]
                 for trained, mode in rows_of]
    step_rows = [[s["mode"], f"{s['seconds']:.2f} s" if "seconds" in s else s["error"],
                  f"{s['peak_rss_mib'] / 1024:.2f} GiB" if "peak_rss_mib" in s else ""] for s in steps]
    s = settings
    stages = ", then ".join(f"{steps} steps at length {length}" for length, steps in
                            [*s.curriculum, (s.train_length, s.steps)])
    body = (f"Associative recall: {s.n_pairs} pair tokens (each holds a key and its value) spread through "
            f"filler, then a query block naming every key again; accuracy (%) on the value after each queried "
            f"key (chance {100 / s.n_values:.1f}%). Models: 2 layers (local, then the retrieving layer), "
            f"d_model {s.d_model}, no position embeddings, local chunk {s.chunk_length}, LSH chunk "
            f"{s.lsh_chunk_length}; trained for {stages}, batches of {s.batch_size} sequences (each stage with "
            f"its own warmup and cosine schedule), evaluated on {s.eval_sequences} held-out sequences "
            f"({s.eval_sequences * s.n_pairs} queries) per length with fresh hashing rotations per batch. "
            "Full is the LSH layer with one bucket over the whole sequence (the same weights); LSH-r has "
            "2 * length / LSH chunk buckets. Training seconds: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in train_seconds.items()) + ".\n\n"
            "By sequence length:\n\n" + markdown_table(["trained", "evaluated", *lengths], rows)
            + "\n\nBy distance back to the pair (tokens), all lengths pooled:\n\n"
            + markdown_table(["trained", "evaluated", *bin_names], dist_rows)
            + f"\n\n![accuracy against distance](distance.png)\n\nA training step on one sequence of "
              f"{longest} tokens (forward, loss, backward, Adam; a fresh process each):\n\n"
            + markdown_table(["attention", "seconds", "peak RSS"], step_rows) + "\n")
    results = {"points": points, "curves": curves, "train_seconds": train_seconds, "steps": steps,
               "distance_edges": edges}
    return report.write(results, "Long-range recall", body)


def plot_distance(points: list, settings: LongRangeSettings, edges: list[float], quick: bool, path: Path) -> None:
    """Accuracy against distance: one panel per trained model, one line per evaluated attention."""
    trained_names = list(dict.fromkeys(p["trained"] for p in points))
    eval_names = list(dict.fromkeys(p["mode"] for p in points))
    colour = {name: f"C{i}" for i, name in enumerate(eval_names)}
    centres = [math.sqrt(max(low, 1.0) * high) for low, high in itertools.pairwise(edges)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(trained_names), figsize=(2.6 * len(trained_names) + 1.6, 3.4), sharey=True,
                             squeeze=False)
    for ax, trained in zip(axes[0], trained_names, strict=True):
        for mode in eval_names:
            pairs = [pr for p in points if (p["trained"], p["mode"]) == (trained, mode) for pr in p["pairs"]]
            if not pairs:
                continue
            acc = by_distance(pairs, edges)
            xs = [x for x, a in zip(centres, acc, strict=True) if a is not None]
            ax.plot(xs, [100 * a for a in acc if a is not None], "o-", ms=3, color=colour[mode], label=mode)
        ax.axhline(100 / settings.n_values, color="grey", ls=":")
        ax.axvline(settings.train_length, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"trained {trained}", fontsize=9)
        ax.set_xlabel("distance back (tokens)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall accuracy (%)")
    handles = [plt.Line2D([], [], color=colour[m], marker="o", ms=3, label=f"eval {m}") for m in eval_names]
    handles += [plt.Line2D([], [], color="grey", ls=":", label="chance"),
                plt.Line2D([], [], color="grey", ls="--", lw=0.8, label="training length")]
    # Beside the last panel: tight_layout (in save_figure) then leaves room for it.
    axes[0][-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.03, 0.5), fontsize=8)
    fig.suptitle(f"long-range recall{' (--quick)' if quick else ''}", fontsize=10)
    save_figure(fig, path)


def _step_main() -> None:
    """One timed training step of a long-range model on one recall sequence, after a warm-up step; JSON on
    stdout (what time_step reads)."""
    import json
    import sys

    from .speed import peak_rss_mib

    mode, length, chunk, lsh_chunk, d_model, n_pairs = sys.argv[1:7]
    mode = mode if mode in (FULL, LOCAL) else int(mode)
    length = int(length)
    settings = LongRangeSettings(chunk_length=int(chunk), lsh_chunk_length=int(lsh_chunk), d_model=int(d_model),
                                 n_pairs=int(n_pairs), train_length=length, eval_lengths=(length,))
    torch.manual_seed(0)
    for _ in range(2):
        model = ReformerLM(model_config(settings, mode, length)).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        ids, query, answer, _ = recall_batch(1, length, settings, torch.Generator().manual_seed(0))
        start = time.perf_counter()
        token_loss(recall_logits(model, ids, query), answer).backward()
        optimizer.step()
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    _step_main()
