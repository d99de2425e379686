"""Model folders: config.json and model.safetensors, each file verified when it is read.

A weights file written here carries two digests in its safetensors metadata:
    tensors_sha256   of every tensor's name, dtype, shape and bytes: a garbled byte anywhere in the data
                     fails the load instead of loading quietly as different weights;
    config_sha256    of the model configuration the weights were saved with: a config.json edited into
                     another model that happens to fit the same shapes (another chunk length, another
                     window) is refused instead of silently computing something else.
``attention_backend`` is left out of the config digest: it chooses which core computes the same function.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ReformerConfig
from .files import write_atomically

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
RUNTIME_FIELDS = ("attention_backend", "head_chunk_size")   # how it runs, not what it computes


class WeightsError(ValueError):
    """A model folder or weights file that cannot be trusted or read; the message names the file."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each one's name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def config_digest(config: ReformerConfig) -> str:
    """sha256 of the configuration's fields that decide what the model computes."""
    fields = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def save_weights(model: torch.nn.Module, path: str | os.PathLike, config: ReformerConfig | None = None) -> None:
    """Write the model's state dict to ``path`` atomically, with the digests above (the config's when the
    model has one or ``config`` is given)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "tensors_sha256": tensors_digest(tensors)}
    config = config if config is not None else getattr(model, "config", None)
    if isinstance(config, ReformerConfig):
        metadata["config_sha256"] = config_digest(config)
    write_atomically(Path(path), save(tensors, metadata=metadata))


def load_weights(path: str | os.PathLike, config: ReformerConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file written by ``save_weights``, after checking its digests (and, given
    ``config``, that they were saved for that configuration)."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    data = path.read_bytes()
    try:
        tensors = load(data)
        # The header: its length (8 bytes, little-endian), then JSON with the metadata.
        metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: one clear message
        raise WeightsError(f"{path} is not a readable safetensors file ({error})") from error
    expected = metadata.get("tensors_sha256")
    if expected is None:
        raise WeightsError(f"{path} carries no checksum (not written by reformer): import foreign "
                           "checkpoints with 'reformer convert'")
    if tensors_digest(tensors) != expected:
        raise WeightsError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    if config is not None and metadata.get("config_sha256") != config_digest(config):
        raise WeightsError(f"{path} was saved for another configuration than the one given (was "
                           f"{CONFIG_FILE} edited?): the weights and the config no longer belong together")
    return tensors


def read_json(path: str | os.PathLike, error=WeightsError) -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` (naming the file) when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as failure:
        raise error(f"{path} is not valid JSON ({failure})") from failure
    if not isinstance(value, dict):
        raise error(f"{path} does not hold a JSON object")
    return value


def read_config(folder: str | os.PathLike, error=WeightsError) -> ReformerConfig:
    """The ReformerConfig in ``folder``/config.json."""
    path = Path(folder) / CONFIG_FILE
    try:
        return ReformerConfig.from_dict(read_json(path, error))
    except (TypeError, ValueError) as failure:
        if isinstance(failure, error):
            raise
        raise error(f"{path} is not a valid ReformerConfig ({failure})") from failure


def save_folder(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """config.json and model.safetensors of a model with a ``config`` (ReformerLM.save_pretrained)."""
    folder = Path(folder)
    write_atomically(folder / CONFIG_FILE, model.config.to_json())
    save_weights(model, folder / WEIGHTS_FILE)


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path, error=WeightsError) -> None:
    """Load ``tensors`` (read from ``path``) into ``model``, naming the file when they do not fit."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as failure:
        raise error(f"{path} does not fit {CONFIG_FILE} ({failure})") from failure
