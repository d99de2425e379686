"""The training loop: optimisers, schedules, evaluation, checkpoints, exact resume, torch.distributed.

Reproducibility is built in rather than saved: the batch of step s comes from (seed, s) (data.py), and
the global torch RNG (dropout) is reseeded from (seed, s, rank) at the start of every step. Training-time hashing
rotations are drawn for call number ``step`` of each LSH layer. A resumed run therefore needs only the
weights, the optimiser and schedule state and the step to continue bit for bit. ``batch_size`` is the
global batch: under torchrun each of N ranks takes its slice of the same batch, so N processes compute
exactly what one process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ReformerConfig
from ..files import write_atomically
from ..nn.attention import LSHSelfAttention
from ..nn.model import ReformerLM, next_token_loss
from ..ops.hashing import derive_seed
from ..plotting import pyplot, save_figure
from . import checkpoint as ckpt
from .data import Corpus, DataError, eval_batches, window_batch

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")


def _option(default, help: str, choices: tuple[str, ...] | None = None):
    """A TrainConfig field with the help text (and choices) of its command-line flag (cli.py)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """How to train. ``batch_size`` sequences of ``seq_len`` bytes per optimiser step (global). Each field is
    also a flag of ``reformer train`` (--batch-size for batch_size), with the help text given here."""

    data: str = _option("stdlib", "'stdlib', a file, a folder, or enwik8.zip")
    glob: str = _option("**/*", "files of a --data folder to use (recursive pattern)")
    steps: int = _option(500, "optimiser steps")
    batch_size: int = _option(8, "sequences per step (global: split across torchrun's processes)")
    seq_len: int = _option(512, "bytes per training sequence")
    accum: int = _option(1, "micro-batches per step (gradient accumulation)")
    optimizer: str = _option("adam", "the optimiser", OPTIMIZERS)
    lr: float = _option(3e-3, "peak learning rate")
    weight_decay: float = _option(0.0, "weight decay")
    momentum: float = _option(0.9, "momentum of sgd and rmsprop")
    schedule: str = _option("cosine", "learning rate after warmup", SCHEDULES)
    warmup: int = _option(50, "linear warmup steps")
    clip: float = _option(1.0, "gradient norm clip (0 = off)")
    bf16: bool = _option(False, "bfloat16 autocast")
    eval_every: int = _option(100, "steps between validations")
    eval_batches: int = _option(8, "batches per validation")
    checkpoint_every: int = _option(100, "steps between checkpoints")
    seed: int = _option(0, "seed of weights, data order and dropout")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "accum", "eval_every", "eval_batches",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2 (next-byte targets), got {self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.clip < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("TrainConfig.clip and weight_decay must be >= 0 and momentum in [0, 1)")
        if self.batch_size % self.accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                             f"accum ({self.accum})")


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if not hasattr(torch.optim, "Adafactor"):
        raise ValueError(f"TrainConfig.optimizer 'adafactor' needs torch >= 2.5 (this is {torch.__version__})")
    return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "rsqrt":
        return math.sqrt(max(cfg.warmup, 1) / (step + 1))
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine down to 10%


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world


def lsh_layers(model: nn.Module) -> list[LSHSelfAttention]:
    return [m for m in model.modules() if isinstance(m, LSHSelfAttention)]


@torch.no_grad()
def evaluate(model: ReformerLM, corpus: Corpus, split: str, seq_len: int, batch_size: int, n_batches: int,
             device: torch.device, n_hashes: int | None = None) -> dict[str, float]:
    """Mean next-byte loss (nats) and bits per byte on fixed windows of a split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(corpus.split(split), batch_size, seq_len, n_batches):
        batch = batch.to(device)
        total += next_token_loss(model(batch, n_hashes=n_hashes), batch, reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2)}


class MetricsLog:
    """metrics.jsonl: one JSON object a line, flushed as written; truncated to the checkpoint on resume."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            write_atomically(path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Train and valid bits/byte against steps, as a PNG."""
    train = [(r["step"], r["loss"] / math.log(2)) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_bpb"]) for r in records if "valid_bpb" in r]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.6)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def train(run_dir: str | os.PathLike, model_config: ReformerConfig | None = None,
          train_config: TrainConfig | None = None, resume: bool = False, progress: bool = True,
          steps: int | None = None) -> list[dict[str, Any]]:
    """Train (or resume) the run in ``run_dir``; return its metrics records.

    New run: ``model_config`` and ``train_config`` are required and written to the folder. Resume:
    both are read from the folder, ``steps`` may extend the run.
    """
    run_dir = Path(run_dir)
    env = Distributed.from_environment()
    if resume:
        model_config = ReformerConfig.from_dict(ckpt.read_json(run_dir / "config.json"))
        train_config = TrainConfig(**ckpt.read_json(run_dir / "train.json"))
        weights, state = ckpt.load_checkpoint(run_dir)
    else:
        weights, state = None, None
    if steps is not None:
        train_config = dataclasses.replace(train_config, steps=steps)
    cfg = train_config
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len ({cfg.seq_len}) exceeds the model's max_seq_len "
                         f"({model_config.max_seq_len})")
    if cfg.batch_size % (env.world * cfg.accum):
        raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) must be a multiple of "
                         f"world size x accum ({env.world} x {cfg.accum})")
    corpus = Corpus.open(cfg.data, cfg.glob)
    train_split = corpus.split("train")
    if len(train_split) < cfg.seq_len:
        raise DataError(f"the train split of {cfg.data!r} has {len(train_split)} bytes, fewer than "
                        f"seq_len={cfg.seq_len}")

    torch.manual_seed(cfg.seed)
    model = ReformerLM(model_config).to(env.device)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = 0
    if state is not None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
    elif env.main:
        write_atomically(run_dir / "config.json", model_config.to_json())
    if env.main:   # a resume may have extended the steps
        write_atomically(run_dir / "train.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    ddp = nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
    metrics = MetricsLog(run_dir / "metrics.jsonl", start if resume else None) if env.main else None
    env.barrier()

    per_rank = cfg.batch_size // env.world
    micro = per_rank // cfg.accum
    bar = None
    if progress and env.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    began, last_bpb = time.perf_counter(), float("nan")
    for step in range(start, cfg.steps):
        tick = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, env.rank, step))   # dropout: a function of the step
        batch = window_batch(train_split, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        batch = batch[env.rank * per_rank:(env.rank + 1) * per_rank].to(env.device)
        loss_sum = 0.0
        for i, part in enumerate(batch.split(micro)):
            for layer in lsh_layers(model):
                # Rotations are a function of the step: micro-batches (and ranks) of one step hash
                # alike, as the one big batch they stand for would.
                layer.hash_calls.fill_(step)
            sync = i == cfg.accum - 1 or env.world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()), \
                    torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                # Through the (possibly DDP-wrapped) model's forward, so that DDP's hooks see the call.
                loss = next_token_loss(ddp(part), part) / cfg.accum
            loss.backward()
            loss_sum += loss.item()
        if cfg.clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = env.mean(loss_sum)
        done = step + 1
        if env.main:
            seconds = time.perf_counter() - tick
            metrics.write({"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
                           "elapsed": time.perf_counter() - began})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            if env.main:
                result = evaluate(model, corpus, "valid", cfg.seq_len, micro, cfg.eval_batches, env.device)
                last_bpb = result["bpb"]
                metrics.write({"step": done, "valid_loss": result["loss"], "valid_bpb": result["bpb"]})
                plot_curves(metrics.records(), run_dir / "curves.png")
            env.barrier()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if env.main:
                ckpt.save_checkpoint(run_dir, done, model, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
            env.barrier()
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{loss_value / math.log(2):.3f}",
                            valid_bpb=f"{last_bpb:.3f}",
                            tok_s=f"{cfg.batch_size * cfg.seq_len / (time.perf_counter() - tick):.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return metrics.records() if metrics is not None else []
