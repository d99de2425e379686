"""Run folders and checkpoints: written atomically, verified when read, one writer at a time.

A run folder holds:
    config.json          the model's ReformerConfig
    train.json           the TrainConfig it was trained with
    model.safetensors    the latest weights (what ``generate`` and ``eval`` read)
    checkpoints/step-N/  model.safetensors + state.pt (optimiser, schedule, step, TrainConfig) +
                         checksums.json (the sha256 of both)
    latest               the name of the newest complete checkpoint
    metrics.jsonl        one JSON object per step and per evaluation; curves.png, their plot
    .lock                held (flock) by the one process that trains the run

Every file is written to a temporary name and renamed into place; a checkpoint directory is filled
under a temporary name and renamed whole; the run's model.safetensors then becomes a copy of that
checkpoint's, and only then does ``latest`` change. A killed run therefore always leaves its previous
checkpoint complete, and a model at least as new as ``latest``. Weights carry digests of their tensors
and of their config (weights.py), the training state a sha256 in checksums.json: a corrupted file, or a
config.json edited into another model, is an error naming the file rather than different numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomically
from ..weights import WEIGHTS_FILE, WeightsError, load_weights, read_config, read_json, save_weights

STATE_FORMAT = "reformer-train-state-1"
CHECKSUMS = "checksums.json"
LATEST = re.compile(r"checkpoints/step-\d{8}")


class CheckpointError(WeightsError):
    """A run folder or checkpoint file that cannot be read or written; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_run_json(path: Path) -> dict[str, Any]:
    return read_json(path, CheckpointError)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``latest`` names, or None when the run has no complete checkpoint yet."""
    latest = run_dir / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text(errors="replace").strip()
    if not LATEST.fullmatch(name) or not (run_dir / name).is_dir():
        raise CheckpointError(f"{latest} names {name[:80]!r}, which is not a checkpoint of this run")
    return run_dir / name


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The ReformerLM of a run folder (its latest weights), in eval mode."""
    from ..nn.model import ReformerLM

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no config.json in it)")
    try:
        return ReformerLM.from_pretrained(run_dir, device)
    except CheckpointError:
        raise
    except WeightsError as error:
        raise CheckpointError(str(error)) from error


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically, make it the run's model, point ``latest`` at it.

    A failed write (a full disk) removes what it wrote and raises CheckpointError; the previous
    checkpoint, the run's model and ``latest`` are then as they were."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}-"))
        save_weights(model, tmp / WEIGHTS_FILE)
        with open(tmp / "state.pt", "wb") as f:
            torch.save({"format": STATE_FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        write_atomically(tmp / CHECKSUMS, json.dumps({name: sha256_file(tmp / name)
                                                      for name in (WEIGHTS_FILE, "state.pt")}, indent=1))
        if final.exists():  # re-reached after a resume: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        tmp = None
        _replace_with_copy(final / WEIGHTS_FILE, run_dir / WEIGHTS_FILE)
        write_atomically(run_dir / "latest", f"checkpoints/{final.name}\n")
    except OSError as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = run_dir / "latest"
        kept = previous.read_text().strip() if previous.is_file() else "none"
        raise CheckpointError(f"could not write the checkpoint of step {step} in {root} "
                              f"({error.strerror or error}); the previous checkpoint ({kept}) is intact") from error
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _replace_with_copy(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source``, atomically. A copy, not a link: damage to one (an edit in
    place) leaves the other whole."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temporaries(run_dir: Path) -> None:
    """Remove what killed writers left behind: temporary files and half-filled checkpoint folders. Call
    only while holding the run's lock (nobody else is writing)."""
    for stale in list(run_dir.glob(".*.tmp")) + list((run_dir / "checkpoints").glob(".*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of the run's latest checkpoint, verified against their checksums and
    the run's config.json."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no config.json in it)")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise CheckpointError(f"{run_dir / 'latest'} is missing: the run has no complete checkpoint to resume from")
    sums = read_json(folder / CHECKSUMS, CheckpointError)
    state_path = folder / "state.pt"
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing")
    if sums.get("state.pt") != sha256_file(state_path):
        raise CheckpointError(f"{state_path} is corrupted: it does not match its checksum in {folder / CHECKSUMS}")
    weights = load_weights(folder / WEIGHTS_FILE, read_config(run_dir, CheckpointError))
    try:
        with warnings.catch_warnings():   # a foreign pickle may warn before it fails; the error says it
            warnings.simplefilter("ignore")
            state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - never surface a pickle traceback
        raise CheckpointError(f"{state_path} is not a readable training state ({type(error).__name__})") \
            from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_path} is not a reformer training state")
    return weights, state
