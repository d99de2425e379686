"""Drawing the next token from logits: temperature, top-k, top-p (nucleus), and a repetition penalty."""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
                   penalty_window: int) -> None:
    """ValueError naming the first setting out of range."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not math.isfinite(repetition_penalty) or repetition_penalty < 1:
        raise ValueError(f"repetition_penalty must be a finite number >= 1, got {repetition_penalty}")
    if penalty_window < 1:
        raise ValueError(f"penalty_window must be >= 1, got {penalty_window}")


def penalise_repeats(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al., 2019): the logit of every token among ``recent``
    (batch, n) ids divided by ``penalty`` where positive, multiplied where negative. logits (batch, vocab)."""
    if penalty == 1.0 or recent.shape[-1] == 0:
        return logits
    seen = logits.gather(-1, recent)
    return logits.scatter(-1, recent, torch.where(seen > 0, seen / penalty, seen * penalty))


def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Draw one token per row of logits (batch, vocab). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p   # keep the smallest set reaching p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
