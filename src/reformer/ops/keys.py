"""Shared query-key attention's keys: the queries scaled to unit mean square, divided by sqrt(d).

k = q * rsqrt(mean(q^2) + 1e-6) / sqrt(d), trax's and transformers' convention; logits are q . k with no
further scaling. Two roundings of the same keys:
- ``normalize_keys`` multiplies and then divides, in transformers' order of operations, so that the
  anchors' window (checkpoint parity) gives bit-identical logits;
- ``key_scale`` gives the factor alone (through the norm, without a temporary the size of q), for the
  bucket window's cores, which multiply each row by it where they read it, and for cached decoding.
"""

from __future__ import annotations

import math

import torch

EPSILON = 1e-6


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """(..., d) queries -> (..., d) keys, in transformers' order of operations."""
    return qk * torch.rsqrt(qk.pow(2).mean(dim=-1, keepdim=True) + EPSILON) / math.sqrt(qk.shape[-1])


def key_scale(qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) queries -> the factor s with keys = qk * s, s = rsqrt(m) / sqrt(d), and m = mean(qk^2) + eps,
    each (...)."""
    mean_square = torch.linalg.vector_norm(qk, dim=-1).square_() / qk.shape[-1] + EPSILON
    return torch.rsqrt(mean_square) / math.sqrt(qk.shape[-1]), mean_square
