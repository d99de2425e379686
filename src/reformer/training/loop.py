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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ReformerConfig
from ..files import FolderLock, write_atomically
from ..nn.attention import LSHSelfAttention
from ..nn.head import next_token_loss
from ..nn.model import ReformerLM
from ..ops.hashing import SEED_LIMIT, derive_seed
from . import checkpoint as ckpt
from .data import VOCAB_SIZE, Corpus, DataError, eval_batches, window_batch
from .metrics import MetricsLog, plot_curves
from .progress import Progress

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
    eval_batch_size: int = _option(8, "windows per validation batch (validation never depends on --accum or "
                                      "the number of processes)")
    checkpoint_every: int = _option(100, "steps between checkpoints")
    seed: int = _option(0, "seed of weights, data order and dropout")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "accum", "eval_every", "eval_batches", "eval_batch_size",
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
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"TrainConfig.seed must be below 2^63, got {self.seed}")
        for name in ("lr", "weight_decay", "momentum", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig.clip and weight_decay must be >= 0, got {self.clip!r} and "
                             f"{self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.batch_size % self.accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                             f"accum ({self.accum})")


# Each model preset's training defaults (fields not named take TrainConfig's): what makes the preset
# train as it is with no other flag.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, steps=300, eval_every=50, checkpoint_every=50),
    "small": {},
    "enwik8": dict(seq_len=65536, batch_size=1, eval_batch_size=1, eval_batches=2, lr=2e-4, warmup=1000,
                   steps=100_000, eval_every=1000, checkpoint_every=250),
}


def preset_training(preset: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a model preset's defaults, with ``overrides``."""
    return TrainConfig(**{**PRESET_TRAINING.get(preset, {}), **overrides})


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
    def from_environment(cls, device: str = "auto") -> "Distributed":
        """``device``: "auto" (CUDA where there is one), "cpu", "cuda" or "cuda:N" (one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=resolve_device(device))
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


def resolve_device(name: str) -> torch.device:
    """torch.device of "auto", "cpu", "cuda" or "cuda:N"; ValueError for one this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def lsh_layers(model: nn.Module) -> list[LSHSelfAttention]:
    return [m for m in model.modules() if isinstance(m, LSHSelfAttention)]


@torch.no_grad()
def evaluate(model: ReformerLM, corpus: Corpus, split: str, seq_len: int, batch_size: int, n_batches: int,
             device: torch.device, n_hashes: int | None = None) -> dict[str, float]:
    """Mean next-byte loss (nats), bits per byte and the number of windows scored: fixed windows from the
    start of a split, in batches of ``batch_size`` (the same batches give the same number, bit for bit)."""
    was_training = model.training
    model.eval()
    total, count, windows = 0.0, 0, 0
    for batch in eval_batches(corpus.split(split), batch_size, seq_len, n_batches):
        batch = batch.to(device)
        total += next_token_loss(model(batch, n_hashes=n_hashes), batch, reduction="sum").item()
        count += batch[:, 1:].numel()
        windows += batch.shape[0]
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2), "windows": windows}


RESUMABLE = ("steps", "eval_every", "checkpoint_every")   # what a resume may change


def flag_name(field_name: str) -> str:
    """The command-line flag of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + field_name.replace("_", "-")


class TrainingStopped(RuntimeError):
    """Training stopped before its last step; ``step`` is the last step whose checkpoint holds."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Diverged(TrainingStopped):
    """The loss or the gradient norm stopped being finite; the run's model is its last checkpoint."""


class Interrupted(TrainingStopped):
    """Ctrl-C (SIGINT): stopped after a complete step, with a checkpoint of it."""


class _StopRequest:
    """SIGINT asks the loop to stop after the step in progress (a second one stops at once). Installed only
    where it can be (the main thread)."""

    def __init__(self, say):
        self.requested, self._say, self._previous = False, say, None

    def __enter__(self) -> "_StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._say("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            import signal
            signal.signal(signal.SIGINT, self._previous)


def _resumed_configs(run_dir: Path, changes: dict[str, Any]):
    """The run's configs, weights and training state, with ``changes`` (fields in RESUMABLE) applied."""
    model_config = ckpt.read_config(run_dir, ckpt.CheckpointError)
    recorded = ckpt.read_run_json(run_dir / "train.json")
    try:
        cfg = TrainConfig(**recorded)
    except (TypeError, ValueError) as error:
        raise ckpt.CheckpointError(f"{run_dir / 'train.json'} is not a valid TrainConfig ({error})") from error
    weights, state = ckpt.load_checkpoint(run_dir)
    saved = state.get("train_config")
    if saved is not None:
        differ = [name for name in saved if name not in RESUMABLE and saved[name] != recorded.get(name)]
        if differ:
            raise ckpt.CheckpointError(f"{run_dir / 'train.json'} does not match the checkpoint's training "
                                       f"configuration ({', '.join(differ)} differ): it was edited")
    refused = [f"{flag_name(k)} {v} (the run's: {recorded.get(k)})" for k, v in changes.items()
               if k not in RESUMABLE and v != recorded.get(k)]
    if refused:
        raise ValueError(f"a resume may change only {', '.join(map(flag_name, RESUMABLE))}; not {'; '.join(refused)}. "
                         "Start a new run to train otherwise")
    changes = {k: v for k, v in changes.items() if k in RESUMABLE}
    done = int(state["step"])
    new_steps = changes.get("steps", cfg.steps)
    if new_steps < done:
        raise ValueError(f"steps={new_steps} is below the {done} steps this run has done already")
    if new_steps == done:
        raise ValueError(f"the run has done all its {done} steps: pass more steps (--steps N, N > {done}) to "
                         "extend it")
    return model_config, dataclasses.replace(cfg, **changes), weights, state, changes


def _absolute_data(cfg: TrainConfig) -> TrainConfig:
    """A path given as --data, made absolute: eval and --resume then work from any directory."""
    if cfg.data == "stdlib" or not Path(cfg.data).expanduser().exists():
        return cfg
    return dataclasses.replace(cfg, data=str(Path(cfg.data).expanduser().resolve()))


def _clear_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir`` empty (save for the lock) for a new run; refuse to unless ``overwrite``."""
    present = [p for p in run_dir.iterdir() if p.name != ".lock"]
    if present and not overwrite:
        raise ValueError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, --overwrite "
                         "to replace it, or another --run-dir")
    for path in present:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _check_corpus(corpus: Corpus, cfg: TrainConfig) -> None:
    for split in ("train", "valid"):
        size = len(corpus.split(split))
        if size < cfg.seq_len:
            raise DataError(f"the {split} split of {cfg.data!r} has {size} bytes, fewer than one window of "
                            f"seq_len={cfg.seq_len}")


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(run_dir: str | os.PathLike, model_config: ReformerConfig | None = None,
          train_config: TrainConfig | None = None, resume: bool = False, progress: str | bool = "auto",
          changes: dict[str, Any] | None = None, overwrite: bool = False, device: str = "auto",
          log=None, tensorboard: bool = False) -> list[dict[str, Any]]:
    """Train (or resume) the run in ``run_dir``; return its metrics records.

    New run: ``model_config`` and ``train_config`` are required and written to the folder, which must be
    empty unless ``overwrite``. Resume: both are read from the folder; ``changes`` may set the fields in
    RESUMABLE (more steps, other cadences), recorded in train.json and metrics.jsonl. One process trains a
    folder at a time (files.FolderLock). ``progress``: "auto", "bar", "plain", "quiet" (or True / False).
    Raises Diverged when the loss or gradient norm stops being finite, Interrupted after Ctrl-C; both
    leave a checkpoint to resume from. ``tensorboard``: also write the metrics as TensorBoard scalars to
    RUN/tensorboard (needs the tensorboard package).
    """
    run_dir = Path(run_dir).absolute()
    env = Distributed.from_environment(device)
    changes = dict(changes or {})
    mode = {True: "auto", False: "quiet"}.get(progress, progress) if env.main else "quiet"
    lock = FolderLock(run_dir).acquire() if env.main else None
    try:
        if resume:
            if env.main:
                ckpt.sweep_temporaries(run_dir)
            model_config, cfg, weights, state, changes = _resumed_configs(run_dir, changes)
        else:
            if env.main:
                _clear_run_dir(run_dir, overwrite)
            cfg, weights, state = _absolute_data(train_config), None, None
        return _train(run_dir, model_config, cfg, weights, state, changes, env, mode, log, tensorboard)
    finally:
        if lock is not None:
            lock.release()


def _train(run_dir: Path, model_config: ReformerConfig, cfg: TrainConfig, weights, state, changes, env: Distributed,
           mode: str, log, tensorboard: bool) -> list[dict[str, Any]]:
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len ({cfg.seq_len}) exceeds the model's max_seq_len "
                         f"({model_config.max_seq_len})")
    if cfg.batch_size % (env.world * cfg.accum):
        raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) must be a multiple of "
                         f"world size x accum ({env.world} x {cfg.accum})")
    if model_config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"the model's vocab_size ({model_config.vocab_size}) does not cover the corpus's "
                         f"{VOCAB_SIZE} byte values")
    corpus = Corpus.open(cfg.data, cfg.glob)
    _check_corpus(corpus, cfg)
    train_split = corpus.split("train")

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
    metrics = None
    if env.main:
        if state is None:
            write_atomically(run_dir / "config.json", model_config.to_json())
        write_atomically(run_dir / "train.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        metrics = MetricsLog(run_dir / "metrics.jsonl", start if state is not None else None,
                             run_dir / "tensorboard" if tensorboard else None)
        if state is not None:
            metrics.write({"step": start, "event": "resume", "changed": changes})
    ddp = nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
    env.barrier()

    report = Progress(cfg.steps, start, mode)
    say = log or report.say
    for line in summary(run_dir, corpus, model, cfg, env, start):
        say(line)
    per_rank = cfg.batch_size // env.world
    micro = per_rank // cfg.accum
    last_saved = start if state is not None else None

    def checkpoint(done: int) -> None:
        nonlocal last_saved
        if env.main:
            ckpt.save_checkpoint(run_dir, done, model, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "train_config": dataclasses.asdict(cfg)})
        last_saved = done
        env.barrier()

    model.train()
    began = time.perf_counter()
    with _StopRequest(say) as stop:
        try:
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
                        loss = ddp(part, labels=part) / cfg.accum
                    loss.backward()
                    loss_sum += loss.item()
                # The norm is needed to see a diverging run even when nothing is clipped (inf: no clip).
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or math.inf))
                loss_value = env.mean(loss_sum)
                done = step + 1
                if not (math.isfinite(loss_value) and math.isfinite(env.mean(grad_norm))):
                    _diverged(metrics, done, loss_value, grad_norm, last_saved, run_dir)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - tick
                if env.main:
                    metrics.write({"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                   "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
                                   "elapsed": time.perf_counter() - began})
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    if env.main:
                        result = evaluate(model, corpus, "valid", cfg.seq_len, cfg.eval_batch_size,
                                          cfg.eval_batches, env.device)
                        metrics.write({"step": done, "valid_loss": result["loss"], "valid_bpb": result["bpb"]})
                        plot_curves(metrics.records(), run_dir / "curves.png", f"run {run_dir.name}")
                        report.validated(done, result["bpb"])
                    env.barrier()
                interrupted = env.mean(float(stop.requested)) > 0   # every rank stops at the same step
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or interrupted:
                    if not _all_finite(model):
                        _diverged(metrics, done, loss_value, grad_norm, last_saved, run_dir, "weights")
                    checkpoint(done)
                report.step(done, loss_value, cfg.batch_size * cfg.seq_len / seconds)
                if interrupted and done < cfg.steps:
                    if env.main:
                        metrics.write({"step": done, "event": "interrupted"})
                    raise Interrupted(f"interrupted at step {done}; resume with: reformer train --resume "
                                      f"{run_dir}", done)
        finally:
            report.close()
            if metrics is not None:
                metrics.close()
    return metrics.records() if metrics is not None else []


def _diverged(metrics: MetricsLog | None, done: int, loss: float, grad_norm: float, last_saved: int | None,
              run_dir: Path, what: str = "loss") -> None:
    if metrics is not None:
        metrics.write({"step": done, "event": "diverged", "loss": repr(loss), "grad_norm": repr(grad_norm)})
    kept = (f"the run's model is the checkpoint of step {last_saved}" if last_saved is not None
            else "no checkpoint was written")
    raise Diverged(f"training diverged at step {done}: {'non-finite weights, ' if what == 'weights' else ''}"
                   f"loss {loss:.4g}, gradient norm {grad_norm:.4g}; stopped, {kept} ({run_dir}); lower --lr "
                   "or raise --warmup and train again", last_saved or 0)


def summary(run_dir: Path, corpus: Corpus, model: ReformerLM, cfg: TrainConfig, env: Distributed,
            start: int) -> list[str]:
    """The start-up lines: what trains on what, where and how."""
    mc = model.config
    sizes = {split: len(corpus.split(split)) for split in ("train", "valid")}
    kinds = ", ".join(mc.attn_layers)
    cores, threads = sorted(core_names(model, env.device, cfg.bf16)), torch.get_num_threads()
    return [
        f"run      {run_dir} ({'resumed at step ' + str(start) if start else 'new'}; {cfg.steps} steps)",
        f"data     {corpus.name}: {sizes['train'] / 1e6:.1f} MB train, {sizes['valid'] / 1e6:.2f} MB valid "
        f"({corpus.path})",
        f"model    {mc.n_layers} layers ({kinds}), d_model {mc.d_model}, {mc.n_heads} heads x {mc.d_head}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters, {'reversible' if mc.reversible else 'plain'}",
        f"training batch {cfg.batch_size} x {cfg.seq_len} bytes (accum {cfg.accum}, {env.world} process"
        f"{'es' if env.world > 1 else ''}), {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}, seed {cfg.seed}",
        f"device   {env.device}, {'bfloat16 autocast' if cfg.bf16 else 'float32'}, {threads} thread"
        f"{'s' if threads > 1 else ''} (OMP_NUM_THREADS sets it), attention core {', '.join(cores) or 'sdpa'}",
    ]


def core_names(model: nn.Module, device: torch.device, bf16: bool) -> set[str]:
    """Which attention cores the model's chunked layers run on when training on ``device``."""
    from ..ops.backend import choose_core

    names = set()
    for layer in model.modules():
        band = getattr(layer, "band", None)
        if band is None:
            continue
        probe = torch.empty(1, band.chunk_length, 1, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            names.add(choose_core(layer.backend, probe, band, layer.dropout, training=True))
    return names
