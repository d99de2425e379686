"""Sorting items by bucket and undoing it; reading the rows of items in any order without copies.

LSH attention orders each round's items by (bucket, position), attends over the sorted sequence, then puts
the results back in position order. The row helpers read and write the rows of (batch, heads, length, d)
tensors where they lie in memory (contiguous, or split_heads' (batch, length, heads, d) layout), so that a
round's sorted rows are gathered once, or not at all (the compiled core reads them by index).
"""

from __future__ import annotations

import torch


def sort_by_bucket(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order items by (round, bucket, position).

    buckets: (batch, heads, rounds, length). Returns, each (batch, heads, rounds * length):
    order (index r * length + position of each sorted item), the sorted items' positions and their
    bucket ids.
    """
    length = buckets.shape[-1]
    positions = torch.arange(length, device=buckets.device)
    keys = (buckets * length + positions).flatten(2)   # unique, so the sort is deterministic
    sorted_keys, order = torch.sort(keys, dim=-1)
    return order, sorted_keys % length, sorted_keys // length


def unsort(order: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Undo ``sort_by_bucket``: put sorted items (batch, heads, rounds * length, ...) back in place."""
    undo = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return [t.gather(2, undo) if t.dim() == 3 else gather_items(t, undo) for t in tensors]


def sorted_validity(valid: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """Validity (batch, length) of the items at positions (batch, heads, m) -> (batch, heads, m)."""
    if valid is None:
        return None
    return valid[:, None, :].expand(-1, positions.shape[1], -1).gather(2, positions)


def row_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, heads, m) positions -> flat row numbers of a (batch * heads * length, d) view."""
    offsets = torch.arange(index.shape[0] * index.shape[1], device=index.device) * length
    return (index + offsets.view(index.shape[0], index.shape[1], 1)).flatten()


def storage_view(x: torch.Tensor) -> torch.Tensor | None:
    """x (batch, heads, length, d) as a (rows, d) view of the rows of its storage it spans, or None when
    its items are not whole rows."""
    d = x.shape[-1]
    if x.numel() == 0 or x.stride(-1) != 1 or x.storage_offset() % d or any(s % d for s in x.stride()[:3]):
        return None
    # The rows x spans, and no more: a view of the whole storage would overlap other tensors carved
    # from it (RoundBuffers), and index_select refuses to write into memory its input overlaps.
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape[:3], x.stride()[:3], strict=True)) // d
    return x.as_strided((span, d), (d, 1), x.storage_offset())


def item_offsets(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Where the items at ``index`` (batch, heads, m) positions of x start in the view of its storage
    (``storage_view``), in units of ``unit`` elements (which divides x's first three strides): one pass
    over the items."""
    batch, heads = (torch.arange(size, device=x.device) * (stride // unit)
                    for size, stride in zip(x.shape[:2], x.stride()[:2], strict=True))
    return torch.add(batch[:, None, None] + heads[None, :, None], index, alpha=x.stride(2) // unit)


def storage_rows(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (batch, heads, length, d) as rows of its storage: a (rows, d) view, and the row numbers of the
    items at ``index`` (batch, heads, m) positions, (batch, heads, m); None when x's items are not
    whole rows (then copy or gather instead).

    Covers contiguous tensors, split_heads' (batch, length, heads, d) layout and head slices or narrowed
    lengths of either, so that rows can be read from, and gradients written into, memory in place.
    """
    flat = storage_view(x)
    if flat is None:
        return None
    return flat, item_offsets(x, index, x.shape[-1])


def gather_items(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, length, d) at index (batch, heads, m) -> (batch, heads, m, d).

    A row copy (index_select on the storage's rows): several times faster on the CPU than gather with
    an index expanded over d, and it reads x in place in any layout ``storage_rows`` covers; any other
    layout is gathered without copying it whole.
    """
    rows = storage_rows(x, index)
    if rows is None:
        return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))
    flat, numbers = rows
    return flat.index_select(0, numbers.flatten()).view(*index.shape, x.shape[-1])


def gather_rows(x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
    """x (B, H, L, d) at positions (B, H, L) -> out (N, d) rows (contiguous), read in place."""
    flat, numbers = storage_rows(x, positions) or storage_rows(x.contiguous(), positions)
    torch.index_select(flat, 0, numbers.flatten(), out=out)
