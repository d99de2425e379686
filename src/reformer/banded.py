"""The compute core: attention of each query to a band of neighbours in a sequence.

LSH attention runs it on the bucket-sorted sequence, local attention on the sequence as it is. The
sequence is cut into chunks of ``chunk_length``; the queries of chunk k see the keys of chunks
k - before ... k + after. Inside that window, masks decide who may attend to whom:

- causal: a key at a later original position than the query is hidden;
- padding: keys marked invalid are hidden;
- same bucket (LSH "bucket" window): only keys of the query's own bucket, and only those within
  ``before * chunk_length`` items before (``after * chunk_length`` after) it in the sorted order;
- wrap-around ("chunk" window, as the anchors do): the window of the first chunk continues at the last
  chunk; without wrap-around, windows stop at the ends of the sequence;
- self (LSH): a query may attend to itself only when it has no other target.

Masks are booleans and hidden logits become -inf, so a row's softmax covers exactly its allowed keys:
no -1e9 constants whose rounding leaks into the result. A row that would be empty (a padding query)
falls back to its own key, which keeps every output finite.

``Band.anchor_masks`` instead reproduces transformers bit for bit: hidden logits are replaced by -1e9
and every self logit by -1e5 (-1e4 and -1e3 in float16). Where a row's only keys are copies of itself
(wrap-around duplicates), the rounding of log(copies) next to -1e5 then costs up to 0.4% of the output:
the anchors' defect, kept only for checkpoint parity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Band:
    """Shape of the attention band.

    chunk_length: items per chunk; before / after: neighbouring chunks seen on each side.
    wrap: the window of the first chunk wraps around to the last one (the anchors' behaviour).
    same_bucket: restrict to keys of the query's bucket within before/after * chunk_length items.
    causal: hide keys at later original positions.
    mask_self: a query attends to itself only when nothing else is allowed (shared query-key).
    anchor_masks: replace hidden and self logits by transformers' constants instead of masking exactly.
    """

    chunk_length: int
    before: int
    after: int
    causal: bool
    wrap: bool = False
    same_bucket: bool = False
    mask_self: bool = False
    anchor_masks: bool = False

    @property
    def width(self) -> int:
        return (self.before + 1 + self.after) * self.chunk_length


def look_around(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Concatenate each chunk with its neighbours, wrapping around at the ends.

    x: (batch, heads, n_chunks, chunk_length, *rest)
    -> (batch, heads, n_chunks, (before + 1 + after) * chunk_length, *rest),
    the neighbours in the order k - before, ..., k, ..., k + after.
    """
    parts = [x if i == 0 else torch.roll(x, shifts=-i, dims=2) for i in range(-before, after + 1)]
    return torch.cat(parts, dim=3)


def band_structure_mask(band: Band, n_chunks: int, device: torch.device) -> torch.Tensor | None:
    """Mask of the key slots a query may see from the band's shape alone, or None if all.

    Returns (n_chunks, chunk_length, width) bool: without wrap-around, slots of chunks beyond the
    sequence's ends are hidden; with ``same_bucket``, slots further than before/after * chunk_length
    items from the query are hidden.
    """
    c = band.chunk_length
    offsets = torch.arange(-band.before, band.after + 1, device=device).repeat_interleave(c)  # (width,)
    mask = None
    if not band.wrap:
        key_chunk = torch.arange(n_chunks, device=device)[:, None] + offsets  # (n_chunks, width)
        mask = ((key_chunk >= 0) & (key_chunk < n_chunks))[:, None, :].expand(n_chunks, c, band.width)
    if band.same_bucket:
        key_slot = offsets * c + torch.arange(c, device=device).repeat(band.before + 1 + band.after)
        distance = key_slot[None, :] - torch.arange(c, device=device)[:, None]  # (c, width)
        near = (distance >= -band.before * c) & (distance <= band.after * c)
        mask = near if mask is None else mask & near
    return mask


def _chunk(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, H, N, *rest) -> (B, H, N / c, c, *rest)."""
    return x.reshape(*x.shape[:2], x.shape[2] // c, c, *x.shape[3:])


def fold_around(window: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """The adjoint of ``look_around``: add each chunk's window slots back onto the chunks they came from.

    window: (batch, heads, n_chunks, (before + 1 + after) * c, *rest) -> (batch, heads, n_chunks, c, *rest).
    """
    parts = window.chunk(before + 1 + after, dim=3)
    total = None
    for i, part in zip(range(-before, after + 1), parts):
        part = part if i == 0 else torch.roll(part, shifts=i, dims=2)
        total = part if total is None else total + part
    return total


def band_mask(band: Band, positions: torch.Tensor, buckets: torch.Tensor | None,
              key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Who may attend to whom, chunk by chunk.

    positions, buckets, key_valid: (batch, heads, n) (key_valid may be None, buckets None unless
    ``band.same_bucket``). Returns ``allowed`` (B, H, nc, c, W) bool before the self fallback,
    ``is_self`` of the same shape, and ``has_other`` (B, H, nc, c): whether a query has an allowed key
    other than itself (any allowed key when not ``band.mask_self``).
    """
    c = band.chunk_length
    n_chunks = positions.shape[2] // c
    q_pos = _chunk(positions, c)[..., :, None]                                   # (B, H, nc, c, 1)
    k_pos = look_around(_chunk(positions, c), band.before, band.after)[..., None, :]  # (B, H, nc, 1, W)
    is_self = k_pos == q_pos
    allowed = band_structure_mask(band, n_chunks, positions.device)
    if band.causal:
        allowed = _and(allowed, k_pos <= q_pos)
    if key_valid is not None:
        valid = look_around(_chunk(key_valid, c), band.before, band.after)
        allowed = _and(allowed, valid[..., None, :])
    if band.same_bucket:
        if buckets is None:
            raise ValueError("banded_attention: same_bucket=True needs the buckets argument")
        q_bucket = _chunk(buckets, c)[..., :, None]
        k_bucket = look_around(_chunk(buckets, c), band.before, band.after)[..., None, :]
        allowed = _and(allowed, k_bucket == q_bucket)
    allowed = torch.ones_like(is_self) if allowed is None else allowed.expand_as(is_self)
    other = allowed & ~is_self if band.mask_self else allowed
    return allowed, is_self, other.any(dim=-1)


def _probabilities(band: Band, logits: torch.Tensor, allowed: torch.Tensor, is_self: torch.Tensor,
                   has_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, H, nc, c, W) and their normaliser, the logsumexp (B, H, nc, c)."""
    if band.anchor_masks:
        hidden, self_value = (-1e4, -1e3) if logits.dtype == torch.float16 else (-1e9, -1e5)
        logits = logits.masked_fill(~allowed, hidden)
        if band.mask_self:
            logits = logits.masked_fill(is_self, self_value)
        lse = torch.logsumexp(logits, dim=-1)   # transformers' formulas, for bit-identical logits
        return torch.exp(logits - lse[..., None]), lse
    if band.mask_self:
        allowed = (allowed & ~is_self) | (is_self & ~has_other[..., None])
    else:
        allowed = allowed | (is_self & ~has_other[..., None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    # softmax is several times faster than exp on masked rows (torch.exp takes a slow path for -inf
    # and for underflowing arguments). The normaliser follows from the largest probability:
    # p_max = exp(x_max - lse), and p_max >= 1 / width keeps the logarithm accurate.
    probs = torch.softmax(logits, dim=-1)
    return probs, logits.amax(dim=-1) - torch.log(probs.amax(dim=-1))


class _BandedAttention(torch.autograd.Function):
    """Banded attention that stores q, k, v, the output and the normaliser, never the (n x W) scores.

    Backward recomputes the scores and probabilities chunk-wise, as flash attention does: memory stays
    O(n * d) per layer instead of O(n * W).
    """

    @staticmethod
    def forward(ctx, q, k, v, positions, buckets, key_valid, band, dropout):
        c = band.chunk_length
        q_chunks = _chunk(q, c)
        k_window = look_around(_chunk(k, c), band.before, band.after)
        v_window = look_around(_chunk(v, c), band.before, band.after)
        allowed, is_self, has_other = band_mask(band, positions, buckets, key_valid)
        probs, lse = _probabilities(band, q_chunks @ k_window.transpose(-1, -2), allowed, is_self, has_other)
        keep = None
        if dropout:
            keep = torch.rand_like(probs) >= dropout
            probs = probs * keep / (1 - dropout)
        out = probs @ v_window                                          # (B, H, nc, c, d)
        ctx.save_for_backward(q, k, v, positions, buckets, key_valid, out, lse, keep)
        ctx.band, ctx.dropout = band, dropout
        return out.flatten(2, 3), lse.flatten(2), has_other.flatten(2)

    @staticmethod
    def backward(ctx, d_out, d_lse, _):
        q, k, v, positions, buckets, key_valid, out, lse, keep = ctx.saved_tensors
        band = ctx.band
        c = band.chunk_length
        q_chunks = _chunk(q, c)
        k_window = look_around(_chunk(k, c), band.before, band.after)
        v_window = look_around(_chunk(v, c), band.before, band.after)
        allowed, is_self, has_other = band_mask(band, positions, buckets, key_valid)
        probs, _ = _probabilities(band, q_chunks @ k_window.transpose(-1, -2), allowed, is_self, has_other)
        d_out = _chunk(d_out, c)
        d_probs = d_out @ v_window.transpose(-1, -2)                    # (B, H, nc, c, W)
        dropped = probs if keep is None else probs * keep / (1 - ctx.dropout)
        d_v = fold_around(dropped.transpose(-1, -2) @ d_out, band.before, band.after)
        if keep is not None:
            d_probs = d_probs * keep / (1 - ctx.dropout)
        # d logits = P * (dP - sum(P * dP)) + P * d_lse, with sum(P * dP) = sum(d_out * out)
        row = (d_out * out).sum(dim=-1, keepdim=True) - _chunk(d_lse, c)[..., None]
        d_logits = probs * (d_probs - row)
        if band.anchor_masks:   # replaced logits are constants: no gradient flows through them
            d_logits = d_logits.masked_fill(~allowed | is_self if band.mask_self else ~allowed, 0.0)
        d_q = d_logits @ k_window
        d_k = fold_around(d_logits.transpose(-1, -2) @ q_chunks, band.before, band.after)
        return (d_q.flatten(2, 3), d_k.flatten(2, 3), d_v.flatten(2, 3), None, None, None, None, None)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     band: Band, buckets: torch.Tensor | None = None,
                     key_valid: torch.Tensor | None = None, dropout: float = 0.0,
                     training: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of every query to its band of keys.

    q, k, v: (batch, heads, n, d_head), n a multiple of ``band.chunk_length``; logits are q . k
    (scale the keys beforehand). positions: (batch | 1, heads | 1, n) original positions of the items
    (for the causal and self masks). buckets: (batch, heads, n) bucket ids, required for ``same_bucket``.
    key_valid: (batch | 1, heads | 1, n) bool, False for padding.

    Returns out (batch, heads, n, d_head), logsumexp of each query's allowed logits (batch, heads, n),
    and has_other (batch, heads, n) bool: whether the query had an allowed key (other than itself when
    ``band.mask_self``), before the fallback to its own key.
    """
    batch, heads, n, _ = q.shape
    positions = positions.expand(batch, heads, n)
    if key_valid is not None:
        key_valid = key_valid.expand(batch, heads, n)
    return _BandedAttention.apply(q, k, v, positions, buckets, key_valid, band,
                                  dropout if training else 0.0)


def _and(mask: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    return other if mask is None else mask & other
