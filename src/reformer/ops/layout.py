"""How attention tensors are laid out: heads split and merged, rows of several heads, padding to a chunk
multiple. (batch, length, heads * d) is the projections' layout; (batch, heads, length, d) the cores'."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import memory


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(batch, length, heads * d_head) -> (batch, heads, length, d_head), a view."""
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, d_head) -> (batch, length, heads * d_head)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def heads_rows(rows: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(batch * length, heads * d) rows, or (batch, length, heads * d) -> (batch, heads, length, d) view
    (split_heads' layout)."""
    return rows.view(batch, -1, heads, rows.shape[-1] // heads).transpose(1, 2)


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, L, d) tensor like x, stored as (B, L, H, d) (split_heads' layout, so that merging the
    heads is a view), on huge pages where offered."""
    batch, heads, length, d = x.shape
    return memory.empty((batch, length, heads, d), x).transpose(1, 2)


def pad_to_multiple(x: torch.Tensor, key_valid: torch.Tensor | None,
                    multiple: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad (batch, length, d) with zeros to a multiple of ``multiple``; mark the padding invalid."""
    length = x.shape[1]
    extra = -length % multiple
    if not extra:
        return x, key_valid
    if key_valid is None:
        key_valid = torch.ones(x.shape[0], length, dtype=torch.bool, device=x.device)
    x = F.pad(x, (0, 0, 0, extra))
    return x, F.pad(key_valid, (0, extra), value=False)
