"""Training through a curriculum of lengths: the loop the synthetic tasks (duplication, long-range) share.

A curriculum is a list of (length, steps) stages. Attention that must learn to find one far position gets
almost no gradient at the target length, where the position is one among thousands; at a short length it
is one among dozens, and the match learnt there carries over. Every stage starts its own warmup and cosine
schedule from the peak learning rate; Adam's moments carry over. Batches come from (seed, step counted over
all stages) and each step hashes with fresh rotations, so a run is reproducible from its seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from ..nn.model import ReformerLM
from ..ops.hashing import derive_seed
from ..training.loop import TrainConfig, build_optimizer, lr_factor, lsh_layers
from .report import is_positive_int

# model_at(length, previous) -> the model to train at ``length``: ``previous`` itself, or a new model that
# holds its weights (previous is None for the first stage).
ModelAt = Callable[[int, "ReformerLM | None"], ReformerLM]
# batch_loss(model, length, n, generator) -> (loss, accuracy), both 0-dim tensors.
BatchLoss = Callable[[ReformerLM, int, int, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


def check_curriculum(curriculum: Sequence, fits: Callable[[int], bool], rule: str) -> None:
    """ValueError unless every stage is a (length, steps) pair of positive ints whose length ``fits``;
    ``rule`` says in words which lengths fit."""
    for stage in curriculum:
        if (not isinstance(stage, (tuple, list)) or len(stage) != 2 or not all(map(is_positive_int, stage))
                or not fits(stage[0])):
            raise ValueError(f"curriculum holds (length, steps) pairs of positive ints with {rule}, got {stage!r}")


def train_stages(stages: Sequence[tuple[int, int]], model_at: ModelAt, batch_loss: BatchLoss, *, name: str,
                 lr: float, warmup: int, batch_size: int, seed: int, log=print
                 ) -> tuple[ReformerLM, list, float]:
    """Train through ``stages``; returns the last stage's model (eval mode), its curve [(step, loss,
    accuracy)] with steps counted over all stages, and the seconds it took. ``name`` labels the log and
    errors. Raises FloatingPointError when the loss stops being finite."""
    torch.manual_seed(seed)
    total = sum(steps for _, steps in stages)
    model, optimizer = None, None
    curve, began, done = [], time.perf_counter(), 0
    every = max(1, total // 10)
    for length, steps in stages:
        previous, model = model, model_at(length, model)
        if model is not previous:
            moments = optimizer.state_dict() if optimizer is not None else None
            optimizer = build_optimizer(model.parameters(), TrainConfig(lr=lr))
            if moments is not None:
                optimizer.load_state_dict(moments)   # the same parameters, in the same order
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(warmup, steps - 1), seed=seed)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr   # each stage schedules from the peak again
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s, cfg=cfg: lr_factor(s, cfg))
        for _ in range(steps):
            generator = torch.Generator().manual_seed(derive_seed(seed, done))
            for layer in lsh_layers(model):
                layer.hash_calls.fill_(done)   # fresh rotations each step, reproducible from the seed
            loss, accuracy = batch_loss(model, length, batch_size, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            done += 1
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training {name} diverged at step {done} at length {length} "
                                         f"(loss {loss.item()}); lower the learning rate")
            if done % every == 0 or done == total:
                curve.append((done, loss.item(), accuracy.item()))
                log(f"  train {name} at {length}: step {done}/{total} loss {loss.item():.3f} "
                    f"accuracy {accuracy.item():.3f} ({time.perf_counter() - began:.0f} s)")
    return model.eval(), curve, time.perf_counter() - began
