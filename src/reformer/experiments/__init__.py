"""The paper's claims, reproduced with one command each: ``reformer experiment NAME [--quick]``.

Every experiment writes results.json, a README.md with its tables and its PNG plots to
``docs/results/NAME/`` (``--quick``: a smoke run of under two minutes, to ``runs/experiments/NAME-quick``).

    duplication   the synthetic copy task: accuracy of models trained and evaluated with full attention
                  and LSH of 1-8 rounds (the paper's table 2)
    lm-parity     byte LM on the stdlib corpus: full, LSH-2/4, chunk-window LSH, local; reversible and not
    hash-rounds   a trained model's bits/byte evaluated with 1-16 rounds and full attention
    speed         seconds per training step against length at a fixed number of tokens per batch
    long-range    associative recall up to 16K tokens back: LSH of 1-8 rounds against local and full
    context       byte LMs trained on 8K windows: bits/byte against position in the window, LSH and local
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

EXPERIMENTS = {"duplication": "duplication", "lm-parity": "lm_parity", "hash-rounds": "hash_rounds",
               "speed": "speed", "long-range": "long_range",
               "context": "context"}


def default_out_dir(name: str, quick: bool) -> Path:
    return Path("runs/experiments") / f"{name}-quick" if quick else Path("docs/results") / name


def run_experiment(name: str, out_dir: str | Path | None = None, quick: bool = False, seed: int = 0,
                   log=print) -> dict[str, Any]:
    """Run experiment ``name`` and write its report; returns the results record (also results.json)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    module = importlib.import_module(f".{EXPERIMENTS[name]}", __name__)
    out = Path(out_dir) if out_dir is not None else default_out_dir(name, quick)
    return module.run(out, quick=quick, seed=seed, log=log)
