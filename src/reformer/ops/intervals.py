"""The fast compute core: each query attends to one interval of keys.

In our own bands (no wrap-around) every query's allowed keys form one contiguous interval:
- LSH with the "bucket" window, over the bucket-sorted sequence: the items of the query's own bucket from
  max(bucket start, i - before * c) up to i - 1 when causal (sorted by position inside a bucket, the
  earlier items are exactly the earlier positions), or up to min(bucket end - 1, i + after * c) without
  the query itself when not;
- local attention: the chunks k - before ... k + after of the query's chunk k, up to the query when causal.
So the masks are two integers per query (``Spans``) instead of the (n x W) boolean algebra of banded.py,
and a block's mask is one row lookup in a table of intervals. Arbitrary padding (local attention given
a key mask) is the only per-key mask left.

Layout: the sequences of every batch row and head are laid end to end, (N, d) rows, N a multiple of the
chunk length c; spans never cross from one sequence into the next. Keys and values are stored with
``before * c`` rows of zeros in front and ``after * c`` behind (``pad_keys``), so the window of chunk g
(keys (g - before) * c ... (g + after + 1) * c - 1) is a strided view, never a copy; gradients of the
windows fold back with two or three in-place batched products.

Like banded.py, forward keeps only outputs and the logsumexp; backward recomputes each block's scores.

This is the eager core, in batched products over whole windows with the spans as masks: any device, any
dtype, attention dropout, per-key padding. The compiled core (native/) takes the same spans and layout
and scores each query's span alone; which one runs is decided in backend.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .banded import BLOCK_ELEMENTS, dropout_keep
from .bands import Window


@dataclass
class Spans:
    """Allowed keys of each query, in window columns: lo <= column < hi, except column ``skip``.

    lo, hi, skip: (N,) int64; skip is -1 where nothing inside the interval is excluded. key_valid: (N,)
    bool per key, False for padding, or None. has_other: (N,) bool, whether the query has an allowed key
    other than itself before the self fallback (None when key_valid decides it, block by block).
    Rows with no allowed key attend to their own key alone (the self fallback), which keeps every
    output finite.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    skip: torch.Tensor
    key_valid: torch.Tensor | None
    has_other: torch.Tensor | None


def make_spans(window: Window, lo: torch.Tensor, hi: torch.Tensor, exclude_self: bool,
               key_valid: torch.Tensor | None = None) -> Spans:
    """Spans from flat key indices: query i may see keys lo[i] <= j < hi[i] (and not j = i when
    ``exclude_self``); where that leaves nothing, the query sees itself.

    lo, hi: (N,) int64 flat indices into the same rows as the queries. Raises ValueError if an interval
    leaves the query's window.
    """
    c, n = window.chunk_length, lo.shape[0]
    index = torch.arange(n, device=lo.device)
    first = (index // c - window.before) * c                        # flat index of window column 0
    lo, hi = lo - first, (hi - first).clamp_min(lo - first)         # empty intervals stay empty
    own = index - first
    if bool(((lo < 0) | (hi > window.width)).any()):
        raise ValueError("make_spans: an interval reaches beyond the query's window of chunks")
    self_inside = exclude_self & (lo <= own) & (own < hi)
    skip = torch.where(self_inside, own, -1)
    has_other = None
    if key_valid is None:
        has_other = hi - lo - self_inside.long() > 0
        # The self fallback: a query with no other key sees exactly itself.
        lo, hi = torch.where(has_other, lo, own), torch.where(has_other, hi, own + 1)
        skip = torch.where(has_other, skip, -1)
    return Spans(lo, hi, skip, key_valid, has_other)


def pad_keys(x: torch.Tensor, window: Window) -> torch.Tensor:
    """(N, d) -> (before * c + N + after * c, d): zeros around, so that every window is a view."""
    c = window.chunk_length
    return torch.nn.functional.pad(x, (0, 0, window.before * c, window.after * c))


def _windows(padded: torch.Tensor, window: Window, start: int, stop: int) -> torch.Tensor:
    """Keys (or values) of chunks start ... stop - 1: a (stop - start, W, d) view of the padded rows."""
    c = window.chunk_length
    rows = padded.narrow(0, start * c, (stop - start - 1) * c + window.width)
    return rows.unfold(0, window.width, c).transpose(1, 2)


def _fold(grad: torch.Tensor, window: Window, start: int, parts: torch.Tensor, rhs: torch.Tensor) -> None:
    """grad (padded rows, d) += parts^T @ rhs, slot by slot: the adjoint of ``_windows``, in place.

    parts: (m, c, W) block of scores; rhs: (m, c, d).
    """
    c, m = window.chunk_length, parts.shape[0]
    chunks = grad.view(-1, c, grad.shape[-1])
    for slot in range(window.before + 1 + window.after):
        chunks[start + slot:start + slot + m].baddbmm_(parts[..., slot * c:(slot + 1) * c].transpose(1, 2), rhs)


@functools.lru_cache(maxsize=8)
def _interval_table(width: int, device: torch.device) -> torch.Tensor:
    """Row lo * (width + 1) + hi marks the columns outside lo <= j < hi: ((width + 1)^2, width) bool."""
    cols = torch.arange(width, device=device)
    bounds = torch.arange(width + 1, device=device)
    return ((cols < bounds[:, None, None]) | (cols >= bounds[None, :, None])).view(-1, width)


TABLE_WIDTH = 256   # widest window whose interval masks come from a table (16 MiB of bools)


def _block_blocked(spans: Spans, window: Window, start: int, stop: int, key_valid_padded):
    """Columns (m, c, W) bool a query of chunks start ... stop - 1 may not see, self fallback applied,
    and has_other (m, c): whether a query had an allowed key (other than itself) before the fallback.

    The blocked columns rather than the allowed ones, so that the logits are masked in place."""
    c, width, m = window.chunk_length, window.width, stop - start
    rows = slice(start * c, stop * c)
    lo, hi, skip = spans.lo[rows], spans.hi[rows], spans.skip[rows]
    if width <= TABLE_WIDTH:   # one row copy per query instead of two comparisons and an or
        blocked = _interval_table(width, lo.device).index_select(0, lo * (width + 1) + hi)
    else:
        cols = torch.arange(width, device=lo.device)
        blocked = (cols < lo[:, None]) | (cols >= hi[:, None])
    flat = blocked.view(-1)
    offsets = torch.arange(0, m * c * width, width, device=lo.device)
    excluded = skip >= 0
    if bool(excluded.any()):
        flat[(offsets + skip)[excluded]] = True
    blocked = blocked.view(m, c, width)
    if key_valid_padded is None:
        return blocked, spans.has_other[rows].view(m, c)
    blocked |= ~_windows(key_valid_padded[:, None], window, start, stop)[..., 0][:, None, :]
    has_other = ~blocked.all(dim=-1)
    # The self fallback, per row: a query with no allowed key left sees itself alone.
    own = offsets + window.before * c + torch.arange(c, device=lo.device).repeat(m)
    flat[own[~has_other.view(-1)]] = False
    return blocked, has_other


def _block_probs(q, k_padded, spans: Spans, window: Window, start: int, stop: int, key_valid_padded):
    """Masked logits and probabilities (m, c, W), and whether each query saw another key (m, c)."""
    c = window.chunk_length
    q_block = q[start * c:stop * c].view(stop - start, c, -1)
    logits = torch.bmm(q_block, _windows(k_padded, window, start, stop).transpose(1, 2))
    blocked, has_other = _block_blocked(spans, window, start, stop, key_valid_padded)
    logits.masked_fill_(blocked, float("-inf"))
    return logits, torch.softmax(logits, dim=-1), has_other


def _blocks(n_chunks: int, window: Window):
    size = max(1, BLOCK_ELEMENTS // (window.chunk_length * window.width))
    return [(a, min(a + size, n_chunks)) for a in range(0, n_chunks, size)]


def _valid_padded(spans: Spans, window: Window) -> torch.Tensor | None:
    if spans.key_valid is None:
        return None
    c = window.chunk_length
    return torch.nn.functional.pad(spans.key_valid, (window.before * c, window.after * c), value=False)


def _dropped(probs, dropout: float, seed: int, start: int):
    """Probabilities after dropout and the keep mask (None without dropout), regenerated per block."""
    if not dropout:
        return probs, None
    keep = dropout_keep(probs.shape, dropout, seed, start, probs.device)
    return probs * keep / (1 - dropout), keep


def interval_forward(q: torch.Tensor, k_padded: torch.Tensor, v_padded: torch.Tensor, spans: Spans,
                     window: Window, dropout: float = 0.0, seed: int = 0, out: torch.Tensor | None = None,
                     probs_out: torch.Tensor | None = None):
    """Attention of each query to its span. q: (N, d); k_padded, v_padded: ``pad_keys`` of (N, d).

    Returns out (N, d_v) (written into ``out`` if given), the logsumexp of each query's allowed logits
    (N,) and has_other (N,) bool. ``probs_out`` (N / c, c, W), if given, receives the probabilities
    (before dropout) for ``interval_backward`` to reuse instead of recomputing them (eager core only).
    """
    c, n = window.chunk_length, q.shape[0]
    out = q.new_empty(n, v_padded.shape[-1]) if out is None else out
    lse = q.new_empty(n // c, c)
    has_other = torch.empty(n // c, c, dtype=torch.bool, device=q.device)
    valid = _valid_padded(spans, window)
    for start, stop in _blocks(n // c, window):
        logits, probs, has_other[start:stop] = _block_probs(q, k_padded, spans, window, start, stop, valid)
        if probs_out is not None:
            probs_out[start:stop] = probs
        # The normaliser (forward only): p_max = exp(x_max - lse), and p_max >= 1 / W keeps the log accurate.
        lse[start:stop] = logits.amax(dim=-1) - torch.log(probs.amax(dim=-1))
        dropped, _ = _dropped(probs, dropout, seed, start)
        torch.bmm(dropped, _windows(v_padded, window, start, stop),
                  out=out[start * c:stop * c].view(stop - start, c, -1))
    return out, lse.view(-1), has_other.view(-1)


def interval_backward(q: torch.Tensor, k_padded: torch.Tensor, v_padded: torch.Tensor, spans: Spans,
                      window: Window, d_out: torch.Tensor, row: torch.Tensor, dropout: float = 0.0,
                      seed: int = 0, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      probs: torch.Tensor | None = None):
    """Gradients (dq (N, d), dk_padded, dv_padded) given d_out (N, d_v) and ``row`` (N,).

    d logits = P * (dP - row), dP = d_out . v: with row = sum(d_out * out) - d_lse this is the
    gradient of (out, lse); LSH passes its own row to fold in the combination of rounds (rounds.py).
    ``grads``: tensors shaped like q, k_padded and v_padded to write the gradients into (reused rows).
    ``probs``: the probabilities forward kept (``probs_out``), or None to recompute them block by block.
    """
    c, n = window.chunk_length, q.shape[0]
    if grads is None:
        grads = torch.empty_like(q), torch.empty_like(k_padded), torch.empty_like(v_padded)
    d_q, d_k, d_v = grads
    d_k.zero_()
    d_v.zero_()
    valid = _valid_padded(spans, window)
    for start, stop in _blocks(n // c, window):
        rows = slice(start * c, stop * c)
        if probs is None:
            _, block_probs, _ = _block_probs(q, k_padded, spans, window, start, stop, valid)
        else:
            block_probs = probs[start:stop]
        dropped, keep = _dropped(block_probs, dropout, seed, start)
        d_out_block = d_out[rows].view(stop - start, c, -1)
        _fold(d_v, window, start, dropped, d_out_block)
        d_probs = torch.bmm(d_out_block, _windows(v_padded, window, start, stop).transpose(1, 2))
        if keep is not None:
            d_probs = d_probs * keep / (1 - dropout)
        d_logits = d_probs.sub_(row[rows].view(stop - start, c, 1)).mul_(block_probs)
        torch.bmm(d_logits, _windows(k_padded, window, start, stop), out=d_q[rows].view(stop - start, c, -1))
        _fold(d_k, window, start, d_logits, q[rows].view(stop - start, c, -1))
    return d_q, d_k, d_v


def unpad_keys(padded: torch.Tensor, window: Window) -> torch.Tensor:
    """The inverse of ``pad_keys``: (before * c + N + after * c, d) -> (N, d) view."""
    c = window.chunk_length
    return padded[window.before * c:padded.shape[0] - window.after * c]


def bucket_spans(window: Window, buckets: torch.Tensor, length: int, causal: bool,
                 query_valid: torch.Tensor | None = None) -> Spans:
    """Spans of LSH's "bucket" window over bucket-sorted sequences laid end to end.

    buckets: (N,) bucket ids of the sorted items, sequences of ``length`` items, each sorted by
    (bucket, position). query_valid: (N,) bool or None; padding must have buckets of its own
    (``hash_with_padding``), and a padding query sees only itself.
    """
    c, n = window.chunk_length, buckets.shape[0]
    index = torch.arange(n, device=buckets.device)
    first = torch.ones(n, dtype=torch.bool, device=buckets.device)     # first item of its bucket
    first[1:] = buckets[1:] != buckets[:-1]
    first[::length] = True
    if query_valid is not None and bool(((query_valid[1:] != query_valid[:-1]) & ~first[1:]).any()):
        raise ValueError("bucket_spans: padding shares a bucket with real items; give it buckets of its own")
    bucket_start = torch.where(first, index, 0).cummax(dim=0).values
    lo = torch.maximum(bucket_start, index - window.before * c)
    if causal:   # inside a bucket the sorted order is the positional order: earlier items only
        hi = index
    else:
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        bucket_end = torch.where(last, index + 1, n).flip(0).cummin(dim=0).values.flip(0)
        hi = torch.minimum(bucket_end, index + window.after * c + 1)
    if query_valid is not None:
        hi = torch.where(query_valid, hi, lo)
    return make_spans(window, lo, hi, exclude_self=True)


def local_spans(window: Window, n: int, length: int, causal: bool,
                key_valid: torch.Tensor | None = None, device=None) -> Spans:
    """Spans of local attention: chunks k - before ... k + after of sequences of ``length`` items laid
    end to end (N = n items in all), up to the query itself when causal. key_valid: (N,) bool or None."""
    c = window.chunk_length
    index = torch.arange(n, device=device)
    position = index % length
    sequence_start = index - position
    chunk = position // c
    lo = sequence_start + ((chunk - window.before) * c).clamp_min(0)
    if causal:
        hi = index + 1
    else:
        hi = sequence_start + ((chunk + window.after + 1) * c).clamp_max(length)
    return make_spans(window, lo, hi, exclude_self=False, key_valid=key_valid)


class _IntervalAttention(torch.autograd.Function):
    """Interval attention that stores q, the padded keys and values and the output, never the scores."""

    @staticmethod
    def forward(ctx, q, k, v, spans, window, dropout, seed):
        k_padded, v_padded = pad_keys(k, window), pad_keys(v, window)
        out, lse, has_other = interval_forward(q, k_padded, v_padded, spans, window, dropout, seed)
        ctx.save_for_backward(q, k_padded, v_padded, out)
        ctx.spans, ctx.window, ctx.dropout, ctx.seed = spans, window, dropout, seed
        ctx.mark_non_differentiable(has_other)
        return out, lse, has_other

    @staticmethod
    def backward(ctx, d_out, d_lse, _):
        q, k_padded, v_padded, out = ctx.saved_tensors
        row = (d_out * out).sum(dim=-1)
        if d_lse is not None:
            row = row - d_lse
        d_q, d_k, d_v = interval_backward(q, k_padded, v_padded, ctx.spans, ctx.window, d_out.contiguous(),
                                          row.contiguous(), ctx.dropout, ctx.seed)
        return d_q, unpad_keys(d_k, ctx.window), unpad_keys(d_v, ctx.window), None, None, None, None


def interval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans, window: Window,
                       dropout: float = 0.0, seed: int = 0):
    """Attention of each query to its span of keys on the eager core, differentiable in q, k and v.

    q, k, v: (N, d) flat rows (N a multiple of the chunk length); logits are q . k (scale the keys
    beforehand). dropout: the attention dropout in force, its masks drawn from ``seed``. Returns out
    (N, d_v), lse (N,) and has_other (N,) bool.
    """
    return _IntervalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), spans, window, dropout,
                                    seed)
