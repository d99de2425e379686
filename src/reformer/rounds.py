"""Sorting by bucket, and LSH attention one hashing round at a time.

In the "bucket" window no query ever sees an item of another round, so the rounds can be attended
one after the other and combined on the fly: an online softmax over rounds (as flash attention does
over key blocks) keeps one round's sorted copies in memory instead of n_hashes of them, and backward
recomputes each round instead of storing it. Each round runs on the interval core (intervals.py): in a
sorted sequence a query's bucket window is one interval of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import memory, native
from .banded import Band
from .intervals import Spans, Window, bucket_spans, interval_backward, interval_forward, unpad_keys


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


def _storage_view(x: torch.Tensor) -> torch.Tensor | None:
    """x (batch, heads, length, d) as a (rows, d) view of the rows of its storage it spans, or None when
    its items are not whole rows."""
    d = x.shape[-1]
    if x.numel() == 0 or x.stride(-1) != 1 or x.storage_offset() % d or any(s % d for s in x.stride()[:3]):
        return None
    # The rows x spans, and no more: a view of the whole storage would overlap other tensors carved
    # from it (RoundBuffers), and index_select refuses to write into memory its input overlaps.
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape[:3], x.stride()[:3])) // d
    return x.as_strided((span, d), (d, 1), x.storage_offset())


def storage_rows(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x (batch, heads, length, d) as rows of its storage: a (rows, d) view, and the row numbers of the
    items at ``index`` (batch, heads, m) positions, (batch, heads, m); None when x's items are not
    whole rows (then copy or gather instead).

    Covers contiguous tensors, split_heads' (batch, length, heads, d) layout and head slices or narrowed
    lengths of either, so that rows can be read from, and gradients written into, memory in place.
    """
    flat = _storage_view(x)
    if flat is None:
        return None
    return flat, _item_offsets(x, index, x.shape[-1])


def _item_offsets(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Where the items at ``index`` (batch, heads, m) positions of x start in the view of its storage
    (``_storage_view``), in units of ``unit`` elements (which divides x's first three strides): one pass
    over the items."""
    batch, heads = (torch.arange(size, device=x.device) * (stride // unit)
                    for size, stride in zip(x.shape[:2], x.stride()[:2]))
    return torch.add(batch[:, None, None] + heads[None, :, None], index, alpha=x.stride(2) // unit)


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


def carve(like: torch.Tensor, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Contiguous tensors of the given shapes (like's dtype and device), views of one fresh allocation
    (on huge pages where offered: the compiled core reads and writes these rows in bucket order).

    Blocks above glibc's mmap threshold (at most 32 MiB) come from the system and go back to it whole;
    smaller ones land in the heap, where the holes they leave between longer-lived tensors stay
    resident. A head group's 16 MiB rows, allocated one by one, kept ~100 MiB of freed memory resident
    at the peak of the 64K layer step; carved from one block per call they keep none.
    """
    sizes = [math.prod(shape) for shape in shapes]
    flat = memory.empty((sum(sizes),), like)
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


class RoundBuffers:
    """Rows that every round of every head group of one call reuses, carved from one allocation.

    Eager rounds (all calls): sorted queries, padded keys and values (for the interval core). Forward:
    the core's output, the same in position order, and the accumulator of the rounds. Backward: the
    core's gradients (dq, padded dk and dv), a round's scaled d_out, and for the caller the group's
    projected qk and v side by side and their gradients (rows of (batch, length, 2 heads d) memory).
    ``fused`` rounds (the compiled core reads and writes rows in position order itself): forward the
    accumulator only, backward the core's gradients and the caller's rows.
    ``n`` rows: batch x heads x length of one group. Allocated once per call (not per group or per
    round): fresh 16-64 MiB blocks cost page faults on every touch, more than the copies themselves.
    """

    KINDS = ("forward", "backward", "kept")   # "kept": one round's sorted rows only (heads_forward's keep)

    def __init__(self, band: Band, n: int, d_qk: int, d_v: int, like: torch.Tensor, kind: str,
                 fused: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        window = self.window = _window(band)
        c = window.chunk_length
        padded = window.before * c + n + window.after * c
        self.n, self.fused = n, fused
        sorted_rows = not fused
        shapes = [(n, d_qk), (padded, d_qk), (padded, d_v)] if sorted_rows else []   # q, k_padded, v_padded
        if kind == "forward":
            shapes += [(n, d_v)] * 3 if sorted_rows else [(n, d_v)]                  # (out, rows,) acc
        elif kind == "backward":
            shapes += [(n, d_qk), (padded, d_qk), (padded, d_v)]                     # core grads
            shapes += [(n, d_v)] if sorted_rows else []                              # d_round
            shapes += [(n, d_qk + d_v)] * 2                                          # qk|v, d_qk|d_v
        parts = carve(like, *shapes)
        if sorted_rows:
            self.q, self.k_padded, self.v_padded = parts[:3]
            parts = parts[3:]
            for padded_rows in (self.k_padded, self.v_padded):   # the padding rows stay zero
                padded_rows[:window.before * c].zero_()
                padded_rows[padded - window.after * c:].zero_()
        if kind == "forward":
            *rows, self.acc = parts
            if sorted_rows:
                self.out, self.rows = rows
        elif kind == "backward":
            self.core_grads, parts = tuple(parts[:3]), parts[3:]
            if sorted_rows:
                self.d_round, parts = parts[0], parts[1:]
            self.qkv, self.d_qkv = parts


def heads_rows(rows: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(batch * length, heads * d) rows, or (batch, length, heads * d) -> (batch, heads, length, d) view
    (split_heads' layout)."""
    return rows.view(batch, -1, heads, rows.shape[-1] // heads).transpose(1, 2)


@dataclass
class SortedRound:
    """One round's items in bucket order, the sequences of every batch row and head laid end to end.

    q: sorted queries (N, d); k_padded, v_padded: sorted keys (queries times their key scale) and
    values in the interval core's padded layout; key_scale: (N,) sorted; spans: what each query sees;
    positions: (B, H, L) the position of each sorted item; order: its index in (B * H * L) position
    order, and unsorted the inverse.
    """

    q: torch.Tensor
    k_padded: torch.Tensor
    v_padded: torch.Tensor
    key_scale: torch.Tensor
    spans: Spans
    positions: torch.Tensor
    order: torch.Tensor
    unsorted: torch.Tensor


def sorted_round(buffers: RoundBuffers, causal: bool, qk, key_scale, v, buckets: torch.Tensor,
                 positions: torch.Tensor, valid: torch.Tensor | None) -> SortedRound:
    """Gather one round's items into ``buffers``.

    qk, v: (B, H, L, d); key_scale: (B, H, L); buckets: (B, H, L) of the round; positions: (B, H, L)
    its sort order (``sort_by_bucket``)."""
    window = buffers.window
    order = _row_index(positions, positions.shape[2])
    unsorted = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
    query_valid = sorted_validity(valid, positions)
    spans = bucket_spans(window, buckets.gather(2, positions).flatten(), positions.shape[2], causal,
                         None if query_valid is None else query_valid.flatten())
    scale = key_scale.reshape(-1).index_select(0, order)
    _gather_rows(qk, positions, buffers.q)
    torch.mul(buffers.q, scale[:, None], out=unpad_keys(buffers.k_padded, window))
    _gather_rows(v, positions, unpad_keys(buffers.v_padded, window))
    return SortedRound(buffers.q, buffers.k_padded, buffers.v_padded, scale, spans, positions, order, unsorted)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
    """x (B, H, L, d) at positions (B, H, L) -> out (N, d) rows (contiguous), read in place."""
    flat, numbers = storage_rows(x, positions) or storage_rows(x.contiguous(), positions)
    torch.index_select(flat, 0, numbers.flatten(), out=out)


def _window(band: Band) -> Window:
    """The interval core's window for a bucket band.

    What a query sees depends only on the reach, before * c items back and after * c ahead, not on
    where chunk boundaries fall, so the core may cut half chunks: one causal query then scores
    (2 before + 1) * c / 2 keys instead of (before + 1) * c, 25% less work (measured: a layer step at
    16K tokens 1.06 s instead of 1.23 s).
    """
    c = band.chunk_length
    if c % 2:
        return Window(c, band.before, band.after)
    return Window(c // 2, 2 * band.before, 2 * band.after)


def heads_forward(qk, key_scale, v, buckets, valid, band: Band, dropout: float, seed: int,
                  buffers: RoundBuffers, out: torch.Tensor, keep: bool = False):
    """Rounds one after the other, combined by an online softmax; the result written into ``out``
    (B, H, L, d), any layout. ``buffers``: a forward RoundBuffers for B * H * L rows.

    Returns the total normaliser and any_other (B, H, L), each round's score (its normaliser, -inf
    where the query saw only itself) (rounds, B * H * L), each round's sort order (rounds, B, H, L; None
    with ``fused`` buffers: that backward sorts again), each round's logsumexp in sorted order
    (rounds, B * H * L), and with ``keep`` each round's sorted rows and probabilities (else None), all
    for backward (which must use buffers of the same kind).
    """
    if buffers.fused:
        return _fused_forward(qk, key_scale, v, buckets, valid, band, buffers, out)
    rounds, n, d = buckets.shape[2], v.shape[0] * v.shape[1] * v.shape[2], v.shape[-1]
    window = buffers.window
    acc = buffers.acc.zero_()
    best = qk.new_full((n,), float("-inf"))
    norm = qk.new_zeros(n)
    scores, lses = qk.new_empty(rounds, n), qk.new_empty(rounds, n)
    orders, kept = [], [] if keep else None
    for r in range(rounds):
        _, positions, _ = sort_by_bucket(buckets[:, :, r, None])
        orders.append(positions)
        sorted_rows = RoundBuffers(band, n, qk.shape[-1], d, v, "kept") if keep else buffers
        items = sorted_round(sorted_rows, band.causal, qk, key_scale, v, buckets[:, :, r], positions, valid)
        probs = qk.new_empty(n // window.chunk_length, window.chunk_length, window.width) if keep else None
        core_out, lse, has_other = interval_forward(items.q, items.k_padded, items.v_padded, items.spans,
                                                    window, dropout, seed + r, out=buffers.out, probs_out=probs)
        lses[r] = lse
        if keep:
            kept.append((items, probs))
        # back to (batch, head, position) order
        core_out = torch.index_select(core_out, 0, items.unsorted, out=buffers.rows)
        torch.index_select(lse.masked_fill(~has_other, float("-inf")), 0, items.unsorted, out=scores[r])
        new_best = torch.maximum(best, scores[r])
        seen = torch.isfinite(new_best)
        rescale = torch.where(seen, torch.exp(best - new_best), 1.0)
        weight = torch.where(seen, torch.exp(scores[r] - new_best), 0.0)
        acc.mul_(rescale[:, None]).addcmul_(weight[:, None], core_out)
        norm, best = norm * rescale + weight, new_best
    total, any_other = _finish_rounds(acc, best, norm, v, out)
    return total, any_other, scores, torch.stack(orders), lses, kept


def _finish_rounds(acc, best, norm, v, out):
    """out = acc / norm, or v where no round saw another key; the total normaliser and any_other."""
    any_other = (norm > 0).view(*v.shape[:3], 1)
    # A query that saw only itself in every round returns its own value, exactly.
    torch.where(any_other, acc.div_(norm.clamp_min(1e-30)[:, None]).view(v.shape), v, out=out)
    total = best + torch.log(norm)
    return total.view(v.shape[:3]), any_other.view(v.shape[:3])


@dataclass
class FusedRound:
    """One round as the compiled core reads it: items in bucket order, their rows read in place.

    positions: (B, H, L) each sorted item's position; order: (N,) its index in (B * H * L) position
    order; spans: what each query sees; scale: (N,) the sorted items' key scales; q, v: their rows of qk
    and v (native.Rows)."""

    positions: torch.Tensor
    order: torch.Tensor
    spans: Spans
    scale: torch.Tensor
    q: native.Rows
    v: native.Rows


def item_rows(x: torch.Tensor, positions: torch.Tensor, written: bool = False,
              like: tuple[torch.Tensor, native.Rows] | None = None) -> native.Rows:
    """The rows of x (B, H, L, d) at positions (B, H, L), in place where ``storage_rows`` covers x's layout
    (else in a copy, unless the rows are ``written``: then x must be covered). ``like`` = (y, y's rows at
    the same positions): where x and y are laid out alike (shape and strides) and both in place, their
    rows lie at the same offsets, and y's index serves x (no index arithmetic over every item again)."""
    flat = _storage_view(x)
    if (flat is not None and like is not None and x.shape == like[0].shape and x.stride() == like[0].stride()
            and _storage_view(like[0]) is not None):
        return native.Rows(flat, like[1].index, x.shape[-1])
    if flat is None:
        if written:
            raise ValueError("item_rows: rows to write must lie whole in x's storage (see storage_rows)")
        x = x.contiguous()
        flat = _storage_view(x)
    return native.Rows(flat, _item_offsets(x, positions, 1).flatten(), x.shape[-1])


def _fused_round(window: Window, causal: bool, qk, key_scale, v, buckets, valid) -> FusedRound:
    """One round's items for the compiled core: buckets (B, H, L) of the round -> its sort, spans and rows,
    the sort and spans in one compiled pass (a counting sort by bucket)."""
    positions, order, lo, hi, skip, has_other = native.round_spans(buckets, valid, window.chunk_length,
                                                                   window.before, window.after, causal)
    q_rows = item_rows(qk, positions)
    return FusedRound(positions, order, Spans(lo, hi, skip, None, has_other),
                      key_scale.reshape(-1).index_select(0, order), q_rows, item_rows(v, positions, like=(qk, q_rows)))


def _fused_forward(qk, key_scale, v, buckets, valid, band: Band, buffers: RoundBuffers, out):
    """heads_forward on the compiled core: it gathers each round's rows itself and adds the round to the
    online softmax in position order, so no sorted copy is made."""
    rounds, n = buckets.shape[2], v.shape[0] * v.shape[1] * v.shape[2]
    window, c = buffers.window, buffers.window.chunk_length
    acc = buffers.acc.zero_()
    best, norm = qk.new_full((n,), float("-inf")), qk.new_zeros(n)
    scores, lses = qk.new_empty(rounds, n), qk.new_empty(rounds, n)
    total, any_other = qk.new_empty(n), torch.empty(n, dtype=torch.bool, device=qk.device)
    # The last round finishes the softmax as it goes (_finish_rounds' result, written into out's rows).
    by_position = torch.arange(v.shape[2], device=v.device).expand(v.shape[:3])
    finish = (item_rows(out, by_position, written=True), total, any_other)
    for r in range(rounds):
        items = _fused_round(window, band.causal, qk, key_scale, v, buckets[:, :, r], valid)
        native.forward(items.q, None, items.v, items.spans, c, window.width, window.before * c, lses[r],
                       k_scale=items.scale, combine=(items.order, items.spans.has_other, acc, best, norm, scores[r]),
                       finish=finish if r == rounds - 1 else None)
    # (backward sorts again: no orders kept)
    return total.view(v.shape[:3]), any_other.view(v.shape[:3]), scores, None, lses, None


def heads_backward(qk, key_scale, v, buckets, valid, out, total, any_other, scores, orders, lses, d_out,
                    band: Band, dropout: float, seed: int, buffers: RoundBuffers, d_qk: torch.Tensor,
                    d_scale: torch.Tensor, d_v: torch.Tensor, kept: list | None = None):
    """Gradients of ``heads_forward``, recomputing each round's scores (or reading what forward
    ``kept``), written into d_qk, d_scale and d_v ((B, H, L, d) and (B, H, L), any layout).
    ``buffers``: a backward RoundBuffers for B * H * L rows.

    With o = sum_r w_r o_r and w_r = exp(l_r - total), the gradient of round r's logit x_j is
    w_r P_j (g . v_j - g . o) (the paths through o_r and through l_r together), so a round needs only
    its weight and the final output: d_out scaled by w_r, and row = w_r (g . o). Keys are qk * scale:
    their gradient goes to qk (times the scale) and to the scale (dotted with qk).
    """
    # g . o through d_v's rows, overwritten next (vecdot's own product would be a fresh block of pages).
    g_dot_o = torch.mul(d_out, out, out=d_v).sum(-1).flatten()
    any_other, total = any_other.flatten(), total.flatten()
    d_qk.zero_()
    torch.mul(d_out, (~any_other).view(*d_out.shape[:3], 1), out=d_v)   # queries that returned their own value
    scale_grad = torch.zeros_like(total)
    # Every round's weight w_r and row w_r (g . o) by position at once: per round only their gathers into
    # bucket order.
    weights = torch.sub(scores, total).exp_().masked_fill_(~any_other, 0.0)
    rows = weights * g_dot_o
    if buffers.fused:
        _fused_backward(qk, key_scale, v, buckets, valid, weights, rows, lses, d_out, band, buffers, d_qk,
                        scale_grad, d_v)
        d_scale.copy_(scale_grad.view(d_scale.shape))
        return
    for r in range(buckets.shape[2]):
        if kept is None:
            items, probs = sorted_round(buffers, band.causal, qk, key_scale, v, buckets[:, :, r], orders[r],
                                        valid), None
        else:
            items, probs = kept[r]
        weight = weights[r].index_select(0, items.order)
        d_round = buffers.d_round
        _gather_rows(d_out, items.positions, d_round)
        d_round.mul_(weight[:, None])
        d_q, d_k, d_v_round = interval_backward(items.q, items.k_padded, items.v_padded, items.spans,
                                                buffers.window, d_round,
                                                rows[r].index_select(0, items.order), dropout,
                                                seed + r, grads=buffers.core_grads, probs=probs, lse=lses[r])
        d_k = unpad_keys(d_k, buffers.window)
        scale_grad += torch.linalg.vecdot(d_k, items.q).index_select(0, items.unsorted)
        # Back to position order through the d_round rows, free once the core is done with them.
        d_qk += torch.index_select(d_q.addcmul_(d_k, items.key_scale[:, None]), 0, items.unsorted,
                                   out=d_round).view(d_qk.shape)
        d_v += torch.index_select(unpad_keys(d_v_round, buffers.window), 0, items.unsorted,
                                  out=d_round).view(d_v.shape)
    d_scale.copy_(scale_grad.view(d_scale.shape))


def _fused_backward(qk, key_scale, v, buckets, valid, weights, rows, lses, d_out, band: Band,
                    buffers: RoundBuffers, d_qk, scale_grad, d_v) -> None:
    """heads_backward's rounds on the compiled core: it reads the rows of qk, v and d_out in place and
    adds each round's gradients to d_qk, scale_grad (flat, position order) and d_v in position order.
    weights, rows: (rounds, B * H * L) each round's weight and row w_r (g . o) by position."""
    window, c = buffers.window, buffers.window.chunk_length
    grads = buffers.core_grads
    for r in range(buckets.shape[2]):
        items = _fused_round(window, band.causal, qk, key_scale, v, buckets[:, :, r], valid)
        positions = items.positions
        weight, row = weights[r].index_select(0, items.order), rows[r].index_select(0, items.order)
        native.backward(items.q, None, items.v, item_rows(d_out, positions), items.spans, c, window.width,
                        window.before * c, lses[r], row, *grads, k_scale=items.scale, g_scale=weight)
        native.scatter_gradients(items.q, items.scale, items.order, window.before * c, *grads,
                                 item_rows(d_qk, positions, written=True, like=(qk, items.q)),
                                 item_rows(d_v, positions, written=True, like=(v, items.v)),
                                 scale_grad)


HEAD_GROUP_ELEMENTS = 1 << 20   # q values of the heads attended together (4 MiB in float32)


def head_groups(q: torch.Tensor) -> list[slice]:
    """Heads in groups small enough that one group's sorted copies stay near HEAD_GROUP_ELEMENTS."""
    batch, heads, length, d = q.shape
    size = max(1, HEAD_GROUP_ELEMENTS // (batch * length * d))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, L, d) tensor like x, stored as (B, L, H, d) (split_heads' layout), on huge pages
    where offered (a fresh 64 MiB output on ordinary pages cost ~20 ms of page faults at 64K tokens)."""
    batch, heads, length, d = x.shape
    return memory.empty((batch, length, heads, d), x).transpose(1, 2)
