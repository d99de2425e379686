"""What more hashing rounds buy: one trained LSH model, evaluated with 1 to 16 rounds and with full attention.

The model is lm-parity's LSH-2 byte LM (trained with 2 rounds on the stdlib corpus). When a full
lm-parity run left that model in runs/experiments/lm-parity/lsh-2 with the same settings, it is
reused; otherwise it is trained here. Evaluation changes no weight: more rounds give each query more
chances to meet the keys it should attend to, and "full" attends to every earlier position with the
same shared-QK weights (one bucket, one chunk).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save_figure
from ..training.checkpoint import load_model
from . import lm_parity
from .report import Report, full_attention_overrides, markdown_table, same_weights

VARIANT = "lsh-2"
ROUNDS = (1, 2, 4, 8, 16)


def run(out_dir: Path, quick: bool = False, seed: int = 0, log=print,
        settings: lm_parity.ParitySettings | None = None) -> dict[str, Any]:
    settings = settings or dataclasses.replace(lm_parity.QUICK if quick else lm_parity.ParitySettings(),
                                               variants=(VARIANT,))
    rounds = ROUNDS[:4] if quick else ROUNDS
    report = Report("hash-rounds", out_dir, seed, quick, {**dataclasses.asdict(settings), "rounds": rounds})
    shared = Path("runs/experiments/lm-parity") / VARIANT
    if not quick and lm_parity.finished(shared, settings, VARIANT, seed):
        run_dir = shared
        log(f"  reusing the trained model in {run_dir}")
    else:
        run_dir = report.work_dir / VARIANT
        log(f"  training {VARIANT} ({settings.steps} steps) into {run_dir}")
        lm_parity.train_variant(settings, VARIANT, run_dir, seed, progress=not quick)

    model = load_model(run_dir)
    bpb = {}
    for n in rounds:
        bpb[f"LSH-{n}"] = lm_parity.final_bpb(run_dir, settings, n_hashes=n, model=model)
        log(f"  LSH-{n}: {bpb[f'LSH-{n}']:.4f} bits/byte")
    bpb["full"] = lm_parity.final_bpb(run_dir, settings, model=same_weights(
        model, **full_attention_overrides(settings.seq_len)))
    log(f"  full: {bpb['full']:.4f} bits/byte")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [bpb[f"LSH-{n}"] for n in rounds], "o-", label="LSH, evaluated with n rounds")
    ax.axhline(bpb["full"], color="k", linestyle="--", label="full attention (same weights)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rounds, [str(n) for n in rounds])
    ax.set_xlabel("hashing rounds at evaluation (trained with 2)")
    ax.set_ylabel("valid bits per byte")
    ax.set_title(f"hash-rounds: one trained model evaluated with 1 to {max(rounds)} rounds")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, report.path("rounds.png"))

    rows = [[name, f"{value:.4f}", f"{value - bpb['full']:+.4f}"] for name, value in bpb.items()]
    body = (f"lm-parity's LSH-2 model ({settings.n_layers} layers of d_model {settings.d_model}, trained "
            f"{settings.steps} steps with 2 rounds, seed {seed}), valid bits/byte on "
            f"{settings.final_eval_batches * settings.batch_size} windows of {settings.seq_len} bytes of the "
            "stdlib corpus, evaluated with n rounds and with full attention.\n\n"
            + markdown_table(["evaluation", "valid bits/byte", "vs full"], rows)
            + "\n\n![bits/byte against rounds](rounds.png)\n")
    return report.write({"bpb": bpb, "model": str(run_dir)}, "Hashing rounds at evaluation", body)
