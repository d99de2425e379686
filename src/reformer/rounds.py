"""Sorting by bucket, and LSH attention one hashing round at a time.

In the "bucket" window no query ever sees an item of another round, so the rounds can be attended
one after the other and combined on the fly: an online softmax over rounds (as flash attention does
over key blocks) keeps one round's sorted copies in memory instead of n_hashes of them, and backward
recomputes each round instead of storing it.
"""

from __future__ import annotations

import torch

from .banded import Band, Items, banded_backward, banded_forward, dropout_seed


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


def _row_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, heads, m) positions -> flat row numbers of a (batch * heads * length, d) view."""
    offsets = torch.arange(index.shape[0] * index.shape[1], device=index.device) * length
    return (index + offsets.view(index.shape[0], index.shape[1], 1)).flatten()


def gather_items(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, length, d) at index (batch, heads, m) -> (batch, heads, m, d).

    A row copy (index_select on the flattened rows): several times faster on the CPU than gather with
    an index expanded over d. Reads x in place when it is contiguous, or a head-split view of a
    contiguous (batch, length, heads, d) projection; any other layout (a slice of a cache, say) is
    gathered without copying it whole.
    """
    batch, heads, length, d = x.shape
    if x.is_contiguous():
        rows, flat = _row_index(index, length), x.view(-1, d)
    elif x.transpose(1, 2).is_contiguous():        # (B, L, H, d) memory, as split_heads leaves it
        rows = index * heads + torch.arange(heads, device=index.device)[None, :, None]
        rows = rows + (torch.arange(batch, device=index.device) * length * heads)[:, None, None]
        flat = x.transpose(1, 2).reshape(-1, d)
    else:
        return x.gather(2, index[..., None].expand(*index.shape, d))
    return flat.index_select(0, rows.flatten()).view(*index.shape, d)


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


def _sorted_round(band: Band, q, k, v, buckets: torch.Tensor, valid: torch.Tensor | None):
    """One round's items in bucket order, chunked, and the positions they came from (B, H, L)."""
    _, positions, sorted_buckets = sort_by_bucket(buckets[:, :, None])
    items = Items.chunked(band, gather_items(q, positions), gather_items(k, positions),
                          gather_items(v, positions), positions, sorted_buckets,
                          sorted_validity(valid, positions))
    return items, positions


def _scatter(positions: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """Sorted (B, H, L[, d]) values back to their positions."""
    flat = sorted_values.reshape(-1, *sorted_values.shape[3:])
    out = torch.empty_like(flat).index_copy_(0, _row_index(positions, positions.shape[2]), flat)
    return out.view_as(sorted_values)


def _scatter_add(total: torch.Tensor, positions: torch.Tensor, sorted_values: torch.Tensor) -> None:
    """total (B, H, L, d) += sorted values (B, H, L, d) at their positions, in place."""
    total.view(-1, total.shape[-1]).index_add_(0, _row_index(positions, total.shape[2]),
                                               sorted_values.reshape(-1, total.shape[-1]))


def _round_weights(lse: torch.Tensor, has_other: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Weight of a round in the combination: softmax over the rounds in which the query saw others."""
    return torch.exp(lse.masked_fill(~has_other, float("-inf")) - total)


def _heads_forward(q, k, v, buckets, valid, band: Band, dropout: float, seed: int):
    """Rounds one after the other, combined by an online softmax. Returns out, total lse, any_other."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()   # each round reads rows out of these
    batch, heads, rounds, length = buckets.shape
    acc = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    best = q.new_full((batch, heads, length), float("-inf"))
    norm = q.new_zeros((batch, heads, length))
    for r in range(rounds):
        items, positions = _sorted_round(band, q, k, v, buckets[:, :, r], valid)
        out, lse, has_other = banded_forward(band, items, dropout, seed + r)
        out, lse, has_other = (_scatter(positions, t.flatten(2, 3)) for t in (out, lse, has_other))
        score = lse.masked_fill(~has_other, float("-inf"))
        new_best = torch.maximum(best, score)
        seen = torch.isfinite(new_best)
        rescale = torch.where(seen, torch.exp(best - new_best), 1.0)
        weight = torch.where(seen, torch.exp(score - new_best), 0.0)
        acc = acc * rescale[..., None] + weight[..., None] * out
        norm, best = norm * rescale + weight, new_best
    any_other = norm > 0
    # A query that saw only itself in every round returns its own value, exactly.
    out = torch.where(any_other[..., None], acc / norm.clamp_min(1e-30)[..., None], v)
    return out, best + torch.log(norm), any_other


def _heads_backward(q, k, v, buckets, valid, out, total, any_other, d_out, band: Band, dropout: float,
                    seed: int):
    """Gradients (dq, dk, dv) of ``_heads_forward``, recomputing each round."""
    q, k, v, out, d_out = (t.contiguous() for t in (q, k, v, out, d_out))   # rows are read per round
    c = band.chunk_length
    d_q, d_k, d_v = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for r in range(buckets.shape[2]):
        items, positions = _sorted_round(band, q, k, v, buckets[:, :, r], valid)
        out_sorted, lse, has_other = banded_forward(band, items, dropout, seed + r)
        weight = _round_weights(lse.flatten(2, 3), has_other.flatten(2, 3), total.gather(2, positions))
        weight = weight.masked_fill(~any_other.gather(2, positions), 0.0)
        d_out_sorted = gather_items(d_out, positions)
        d_round = weight[..., None] * d_out_sorted
        d_lse = weight * ((out_sorted.flatten(2, 3) - gather_items(out, positions)) * d_out_sorted).sum(dim=-1)
        grads = banded_backward(band, items, out_sorted, d_round.unflatten(2, (-1, c)),
                                d_lse.unflatten(2, (-1, c)), dropout, seed + r)
        for total_grad, grad in zip((d_q, d_k, d_v), grads):
            _scatter_add(total_grad, positions, grad)
    d_v += torch.where(any_other[..., None], 0.0, d_out)
    return d_q, d_k, d_v


HEAD_GROUP_ELEMENTS = 1 << 20   # q values of the heads attended together (4 MiB in float32)


def _head_groups(q: torch.Tensor) -> list[slice]:
    """Heads in groups small enough that one group's sorted copies stay near HEAD_GROUP_ELEMENTS."""
    batch, heads, length, d = q.shape
    size = max(1, HEAD_GROUP_ELEMENTS // (batch * length * d))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


class _LSHByRound(torch.autograd.Function):
    """Heads a group at a time, rounds one at a time: memory holds one group's round of sorted copies."""

    @staticmethod
    def forward(ctx, q, k, v, buckets, valid, band, dropout, seed):
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        total = q.new_empty(buckets.shape[:2] + buckets.shape[3:])
        any_other = torch.empty(total.shape, dtype=torch.bool, device=q.device)
        for part in _head_groups(q):
            out[:, part], total[:, part], any_other[:, part] = _heads_forward(
                q[:, part], k[:, part], v[:, part], buckets[:, part], valid, band, dropout,
                seed + part.start * buckets.shape[2])
        ctx.save_for_backward(q, k, v, buckets, valid, out, total, any_other)
        ctx.band, ctx.dropout, ctx.seed = band, dropout, seed
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, buckets, valid, out, total, any_other = ctx.saved_tensors
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
        for part in _head_groups(q):
            for grad, head_grad in zip(grads, _heads_backward(
                    q[:, part], k[:, part], v[:, part], buckets[:, part], valid, out[:, part], total[:, part],
                    any_other[:, part], d_out[:, part], ctx.band, ctx.dropout,
                    ctx.seed + part.start * buckets.shape[2])):
                grad[:, part] = head_grad
        return (*grads, None, None, None, None, None)


def lsh_attention_by_round(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor,
                           band: Band, key_valid: torch.Tensor | None = None, dropout: float = 0.0,
                           training: bool = False) -> torch.Tensor:
    """LSH attention with a "bucket" window, rounds attended one at a time and combined.

    q, k, v: (batch, heads, length, d_head), length a multiple of the chunk; keys already normalised.
    buckets: (batch, heads, rounds, length) ids, unique across rounds (``hash_with_padding``).
    key_valid: (batch, length) bool or None. Returns (batch, heads, length, d_head).
    """
    if band.wrap or not band.same_bucket:
        raise ValueError("lsh_attention_by_round needs a band with same_bucket=True and no wrap-around")
    dropout = dropout if training else 0.0
    return _LSHByRound.apply(q, k, v, buckets, key_valid, band, dropout, dropout_seed() if dropout else 0)
