"""The masked reference core: attention of each query to a band of neighbours in a sequence (bands.py).

It serves the anchors' wrap-around bands (checkpoint parity with transformers) and is the reference the
tests hold the interval core (intervals.py) to. Masks are booleans and hidden logits become -inf, so a
row's softmax covers exactly its allowed keys: no -1e9 constants whose rounding leaks into the result. A
row that would be empty (a padding query) falls back to its own key, which keeps every output finite.

The anchor rules instead reproduce transformers bit for bit: hidden logits are replaced by -1e9 and every
self logit by -1e5 (-1e4 and -1e3 in float16). Where a row's only keys are copies of itself (wrap-around
duplicates), the rounding of log(copies) next to -1e5 then costs up to 0.4% of the output: the anchors'
defect, kept only for checkpoint parity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import Band


def look_around(x: torch.Tensor, before: int, after: int, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
    """Each chunk with its neighbours, for chunks ``start`` to ``stop``, wrapping around at the ends.

    x: (batch, heads, n_chunks, chunk_length, *rest)
    -> (batch, heads, stop - start, (before + 1 + after) * chunk_length, *rest),
    the neighbours in the order k - before, ..., k, ..., k + after.
    """
    n_chunks = x.shape[2]
    stop = n_chunks if stop is None else stop
    index = torch.arange(start - before, stop + after, device=x.device) % n_chunks
    extended = x.index_select(2, index)
    return torch.cat([extended.narrow(2, i, stop - start) for i in range(before + 1 + after)], dim=3)


def fold_around(window: torch.Tensor, before: int, after: int, start: int, n_chunks: int,
                out: torch.Tensor) -> None:
    """The adjoint of ``look_around``: add window slots back onto the chunks they came from, in place.

    window: (batch, heads, m, (before + 1 + after) * c, *rest) for chunks start ... start + m - 1;
    out: (batch, heads, n_chunks, c, *rest).
    """
    m = window.shape[2]
    for i, part in enumerate(window.chunk(before + 1 + after, dim=3)):
        index = torch.arange(start - before + i, start - before + i + m, device=window.device) % n_chunks
        out.index_add_(2, index, part)


def band_structure_mask(band: Band, start: int, stop: int, n_chunks: int,
                        device: torch.device) -> torch.Tensor | None:
    """Mask of the key slots that queries of chunks start ... stop - 1 may see by the band's shape alone.

    Returns (stop - start, chunk_length, width) bool, or None if every slot is visible: without
    wrap-around, slots of chunks beyond the sequence's ends are hidden; with ``same_bucket``, slots
    further than before/after * chunk_length items from the query are hidden.
    """
    c = band.chunk_length
    offsets = torch.arange(-band.before, band.after + 1, device=device).repeat_interleave(c)  # (width,)
    mask = None
    if not band.wrap:
        key_chunk = torch.arange(start, stop, device=device)[:, None] + offsets
        mask = ((key_chunk >= 0) & (key_chunk < n_chunks))[:, None, :].expand(stop - start, c, band.width)
    if band.same_bucket:
        key_slot = offsets * c + torch.arange(c, device=device).repeat(band.before + 1 + band.after)
        distance = key_slot[None, :] - torch.arange(c, device=device)[:, None]  # (c, width)
        near = (distance >= -band.before * c) & (distance <= band.after * c)
        mask = near if mask is None else mask & near
    return mask


def _chunk(x: torch.Tensor, c: int) -> torch.Tensor:
    """(B, H, N, *rest) -> (B, H, N / c, c, *rest)."""
    return x.reshape(*x.shape[:2], x.shape[2] // c, c, *x.shape[3:])


@dataclass
class Items:
    """The sequence the core attends over, chunked: (batch, heads, n_chunks, chunk_length[, d_head]).

    positions: original positions (causal and self masks); buckets: bucket ids or None; valid: False
    for padding keys, or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    buckets: torch.Tensor | None
    valid: torch.Tensor | None

    @classmethod
    def chunked(cls, band: Band, q, k, v, positions, buckets, valid) -> "Items":
        c = band.chunk_length
        return cls(*(None if t is None else _chunk(t, c) for t in (q, k, v, positions, buckets, valid)))

    @property
    def n_chunks(self) -> int:
        return self.q.shape[2]


def band_mask(band: Band, items: Items, start: int, stop: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Who may attend to whom, for the queries of chunks start ... stop - 1.

    Returns ``allowed`` (B, H, m, c, W) bool before the self fallback, ``is_self`` of the same shape,
    ``other``: the allowed keys other than the query itself (``allowed`` when not ``band.mask_self``),
    and ``has_other`` (B, H, m, c): whether a query has any such key.
    """
    def window(x):
        return look_around(x, band.before, band.after, start, stop)[..., None, :]

    q_pos = items.positions[:, :, start:stop, :, None]                  # (B, H, m, c, 1)
    k_pos = window(items.positions)                                     # (B, H, m, 1, W)
    is_self = k_pos == q_pos
    allowed = band_structure_mask(band, start, stop, items.n_chunks, q_pos.device)
    if band.causal:
        allowed = _and(allowed, k_pos <= q_pos)
    if items.valid is not None:
        allowed = _and(allowed, window(items.valid))
    if band.same_bucket:
        if items.buckets is None:
            raise ValueError("banded_attention: same_bucket=True needs the buckets argument")
        allowed = _and(allowed, window(items.buckets) == items.buckets[:, :, start:stop, :, None])
    allowed = torch.ones_like(is_self) if allowed is None else allowed.expand_as(is_self)
    other = allowed > is_self if band.mask_self else allowed   # on bools, a > b is a & ~b in one pass
    return allowed, is_self, other, other.any(dim=-1)


def _probabilities(band: Band, logits: torch.Tensor, allowed: torch.Tensor, is_self: torch.Tensor,
                   other: torch.Tensor, has_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, H, m, c, W) and their normaliser, the logsumexp (B, H, m, c)."""
    if band.anchor_masks:
        hidden, self_value = (-1e4, -1e3) if logits.dtype == torch.float16 else (-1e9, -1e5)
        logits = logits.masked_fill(~allowed, hidden)
        if band.mask_self:
            logits = logits.masked_fill(is_self, self_value)
        lse = torch.logsumexp(logits, dim=-1)   # transformers' formulas, for bit-identical logits
        return torch.exp(logits - lse[..., None]), lse
    # The other allowed keys, and the query itself where there are none (the self fallback).
    attended = other | (is_self & ~has_other[..., None])
    logits = torch.where(attended, logits, float("-inf"))
    # softmax is several times faster than exp on masked rows (torch.exp takes a slow path for -inf
    # and for underflowing arguments). The normaliser follows from the largest probability:
    # p_max = exp(x_max - lse), and p_max >= 1 / width keeps the logarithm accurate.
    probs = torch.softmax(logits, dim=-1)
    return probs, logits.amax(dim=-1) - torch.log(probs.amax(dim=-1))


BLOCK_ELEMENTS = 1 << 20   # scores computed at once: bounds the core's working memory (4 MiB each)


def _blocks(band: Band, items: Items):
    """Ranges of chunks small enough that one block's scores hold about BLOCK_ELEMENTS numbers."""
    batch, heads, n_chunks, c = items.q.shape[:4]
    size = max(1, BLOCK_ELEMENTS // (batch * heads * c * band.width))
    return [(a, min(a + size, n_chunks)) for a in range(0, n_chunks, size)]


def dropout_keep(shape, dropout: float, seed: int, start: int, device) -> torch.Tensor:
    """The dropout mask of one block, regenerated identically in backward from (seed, block start)."""
    generator = torch.Generator(device=device).manual_seed(seed + start)
    return torch.rand(shape, generator=generator, device=device) >= dropout


def _block_probs(band: Band, items: Items, start: int, stop: int, dropout: float, seed: int):
    """Probabilities, the same dropped out, the dropout's keep mask (or None), the normaliser, has_other,
    the key and value windows and the masks of one block."""
    k_window = look_around(items.k, band.before, band.after, start, stop)
    v_window = look_around(items.v, band.before, band.after, start, stop)
    allowed, is_self, other, has_other = band_mask(band, items, start, stop)
    logits = items.q[:, :, start:stop] @ k_window.transpose(-1, -2)
    probs, lse = _probabilities(band, logits, allowed, is_self, other, has_other)
    dropped, keep = probs, None
    if dropout:
        keep = dropout_keep(probs.shape, dropout, seed, start, probs.device)
        dropped = probs * keep / (1 - dropout)
    return probs, dropped, keep, lse, has_other, k_window, v_window, allowed, is_self


def banded_forward(band: Band, items: Items, dropout: float = 0.0, seed: int = 0):
    """out (B, H, nc, c, d), lse and has_other (B, H, nc, c), one block of chunks at a time."""
    out = items.q.new_empty(*items.q.shape[:4], items.v.shape[-1])
    lse = items.q.new_empty(items.q.shape[:4])
    has_other = torch.empty(items.q.shape[:4], dtype=torch.bool, device=items.q.device)
    for start, stop in _blocks(band, items):
        _, dropped, _, lse[:, :, start:stop], has_other[:, :, start:stop], _, v_window, _, _ = \
            _block_probs(band, items, start, stop, dropout, seed)
        out[:, :, start:stop] = dropped @ v_window
    return out, lse, has_other


def banded_backward(band: Band, items: Items, out: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor,
                    dropout: float = 0.0, seed: int = 0):
    """Gradients (dq, dk, dv), chunked like q, from the output's and the normaliser's gradients.

    d logits = P * (dP - sum(P * dP)) + P * d_lse, with sum(P * dP) = sum(d_out * out) per query.
    """
    d_q, d_k, d_v = torch.zeros_like(items.q), torch.zeros_like(items.k), torch.zeros_like(items.v)
    n_chunks = items.n_chunks
    row = (d_out * out).sum(dim=-1) - d_lse                              # (B, H, nc, c)
    for start, stop in _blocks(band, items):
        probs, dropped, keep, _, _, k_window, v_window, allowed, is_self = \
            _block_probs(band, items, start, stop, dropout, seed)
        d_out_block = d_out[:, :, start:stop]
        fold_around(dropped.transpose(-1, -2) @ d_out_block, band.before, band.after, start, n_chunks, d_v)
        d_probs = d_out_block @ v_window.transpose(-1, -2)
        if keep is not None:
            d_probs = d_probs * keep / (1 - dropout)
        d_logits = probs * (d_probs - row[:, :, start:stop, :, None])
        if band.anchor_masks:   # replaced logits are constants: no gradient flows through them
            d_logits = d_logits.masked_fill(~allowed | is_self if band.mask_self else ~allowed, 0.0)
        d_q[:, :, start:stop] = d_logits @ k_window
        fold_around(d_logits.transpose(-1, -2) @ items.q[:, :, start:stop], band.before, band.after, start,
                    n_chunks, d_k)
    return d_q, d_k, d_v


class _BandedAttention(torch.autograd.Function):
    """Banded attention that stores q, k, v, the output and the normaliser, never the (n x W) scores.

    Backward recomputes scores and probabilities block by block, as flash attention does: memory stays
    O(n * d) per layer, plus one block of scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, positions, buckets, valid, band, dropout, seed):
        items = Items.chunked(band, q, k, v, positions, buckets, valid)
        out, lse, has_other = banded_forward(band, items, dropout, seed)
        ctx.save_for_backward(q, k, v, positions, buckets, valid, out)
        ctx.band, ctx.dropout, ctx.seed = band, dropout, seed
        return out.flatten(2, 3), lse.flatten(2), has_other.flatten(2)

    @staticmethod
    def backward(ctx, d_out, d_lse, _):
        q, k, v, positions, buckets, valid, out = ctx.saved_tensors
        band = ctx.band
        items = Items.chunked(band, q, k, v, positions, buckets, valid)
        c = band.chunk_length
        d_q, d_k, d_v = banded_backward(band, items, out, _chunk(d_out, c), _chunk(d_lse, c), ctx.dropout,
                                        ctx.seed)
        return d_q.flatten(2, 3), d_k.flatten(2, 3), d_v.flatten(2, 3), None, None, None, None, None, None


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
    dropout = dropout if training else 0.0
    seed = dropout_seed() if dropout else 0
    return _BandedAttention.apply(q, k, v, positions, buckets, key_valid, band, dropout, seed)


def dropout_seed() -> int:
    """A seed for the dropout masks of one call, drawn from the global RNG (so reversible replays it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _and(mask: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    return other if mask is None else mask & other


def local_banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band,
                           key_valid: torch.Tensor | None, dropout: float = 0.0,
                           training: bool = False) -> torch.Tensor:
    """Local attention on the masked core, over the unsorted sequence (the anchors' wrap-around band).
    q, k, v: (batch, heads, length, d), keys scaled beforehand; key_valid (batch, length) or None."""
    positions = torch.arange(q.shape[2], device=q.device)[None, None, :]
    valid = None if key_valid is None else key_valid[:, None, :]
    out, _, _ = banded_attention(q, k, v, positions, band, key_valid=valid, dropout=dropout, training=training)
    return out
