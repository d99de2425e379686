"""Run folders and checkpoints, written atomically so that a kill at any moment loses nothing.

A run folder holds:
    config.json          the model's ReformerConfig
    train.json           the TrainConfig it was trained with
    model.safetensors    the latest weights (what ``generate`` and ``eval`` read)
    checkpoints/step-N/  model.safetensors + state.pt (optimiser, schedule, step)
    latest               the name of the newest complete checkpoint
    metrics.jsonl        one JSON object per step and per evaluation; curves.png, their plot

Every file is written to a temporary name and renamed into place; a checkpoint directory is filled
under a temporary name and renamed whole; ``latest`` changes only after that. A killed run therefore
always leaves its previous checkpoint complete and readable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import ReformerConfig
from ..files import write_atomically
from ..nn.model import ReformerLM

STATE_FORMAT = "reformer-train-state-1"


class CheckpointError(ValueError):
    """A run folder or checkpoint file that cannot be read; the message names the file."""


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, save(tensors, metadata={"format": "pt"}))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: one clear message
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error


def read_json(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The ReformerLM of a run folder (its latest weights), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no config.json in it)")
    try:
        config = ReformerConfig.from_dict(read_json(run_dir / "config.json"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{run_dir / 'config.json'} is not a valid ReformerConfig ({error})") from error
    model = ReformerLM(config)
    weights = load_weights(run_dir / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{run_dir / 'model.safetensors'} does not fit config.json ({error})") from error
    return model.to(device).eval()


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically, point ``latest`` at it, refresh model.safetensors."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}-"))
    save_weights(model, tmp / "model.safetensors")
    with open(tmp / "state.pt", "wb") as f:
        torch.save({"format": STATE_FORMAT, "step": step, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"step-{step:08d}"
    if final.exists():  # re-reached after a resume: the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomically(run_dir / "latest", f"checkpoints/{final.name}\n")
    save_weights(model, run_dir / "model.safetensors")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of killed runs
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of the run's latest checkpoint."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder (no config.json in it)")
    latest = run_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{latest} is missing: the run has no complete checkpoint to resume from")
    folder = run_dir / latest.read_text().strip()
    weights = load_weights(folder / "model.safetensors")
    state_path = folder / "state.pt"
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing")
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
