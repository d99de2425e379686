"""LSH attention straight from the layer's normalised input: the projections happen inside.

This is the "bucket" window layer's path (attention.py). Its autograd function stores the input h
(batch, length, d_model) and the output, never the projected queries and values of all heads: backward
projects one head group at a time again (two small matrix products per group) and turns that group's
gradients into those of h and of the two weights at once. At 64K tokens, 4 heads of 64, this holds
128 MiB fewer through backward (the projections) and allocates 128 MiB fewer (their gradients), for
about 3% more work.
"""

from __future__ import annotations

import math

import torch

from . import memory
from .banded import Band, dropout_seed
from .intervals import native_core
from .rounds import RoundBuffers, head_groups, heads_backward, heads_forward, heads_last, heads_rows


def key_scale(qk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) -> the factor that turns queries into shared-QK keys, s = rsqrt(m) / sqrt(d), and
    m = mean(x^2) + 1e-6, each (...). (Through the norm: no temporary the size of qk.)"""
    mean_square = torch.linalg.vector_norm(qk, dim=-1).square_() / qk.shape[-1] + 1e-6
    return torch.rsqrt(mean_square) / math.sqrt(qk.shape[-1]), mean_square


def project_qk_v(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, heads: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """h's queries and values, (batch, heads, length, d) each (no autograd: forward's, for hashing and the
    rounds), from one product whose rows hold each head's query next to its value: one product of twice
    the width costs less than two, and the rounds read a head's query and value rows as one piece."""
    d_model = h.shape[-1]
    w = torch.stack([w_qk.view(heads, -1, d_model), w_v.view(heads, -1, d_model)], dim=1).flatten(0, 2)
    with torch.no_grad():
        rows = memory.linear(h, w)                                   # (B, L, heads * 2 d)
    pairs = rows.view(*h.shape[:2], heads, 2, -1).transpose(1, 2)   # (B, heads, L, 2, d)
    return pairs[..., 0, :], pairs[..., 1, :]


KEEP_ROUNDS_BYTES = 128 << 20   # forward keeps the rounds' sorted rows and probabilities up to this


def _keep_rounds(qk: torch.Tensor, rounds: int, band: Band) -> bool:
    """Whether forward keeps every round's sorted rows and probabilities for backward: a speed for
    memory trade that pays at short lengths (at 4K tokens, 4 heads x 64, 4 rounds: 72 MiB kept, a layer
    step 4-7% faster), and that the round-by-round design exists to avoid at long ones."""
    batch, heads, length, d = qk.shape
    window = band.chunk_length * (band.before + 1 + band.after)   # at least the core's window
    per_row = 3 * d + window + 8          # sorted q, padded k and v, probabilities, spans and orders
    return rounds * batch * heads * length * per_row * qk.element_size() <= KEEP_ROUNDS_BYTES


def _group_buffers(buffers: RoundBuffers | None, band: Band, part: slice, like: torch.Tensor,
                   kind: str, fused: bool) -> RoundBuffers:
    """Round buffers for head group ``part`` of like (B, H, L, d): the last group's, unless its size
    differs (only the last group can be smaller)."""
    n = like.shape[0] * (part.stop - part.start) * like.shape[2]
    if buffers is None or buffers.n != n:
        buffers = RoundBuffers(band, n, like.shape[-1], like.shape[-1], like, kind, fused)
    return buffers


class _ProjectedLSH(torch.autograd.Function):
    # Projections run in qk's dtype (bfloat16 under autocast, as the layer's own qk), in forward and
    # when backward projects again (autocast is off there); gradients go back in the inputs' dtypes.

    @staticmethod
    def forward(ctx, h, w_qk, w_v, qk, v, buckets, valid, band, dropout, seed, keep):
        heads = buckets.shape[1]
        if v is None:
            v = heads_rows(memory.linear(h.to(qk.dtype), w_v.to(qk.dtype)), h.shape[0], heads)
        scale, _ = key_scale(qk)
        out = heads_last(v)
        total = qk.new_empty(scale.shape)
        any_other = torch.empty(total.shape, dtype=torch.bool, device=qk.device)
        saved, buffers = [], None   # per head group: each round's scores, sort order (eager) and logsumexp
        ctx.kept = []               # per head group, with ``keep``: its rounds' sorted rows and probabilities
        # The compiled core gathers and combines the rounds itself (no sorted copies); keeping rounds is
        # the eager core's trade.
        fused = native_core(qk, dropout) and not keep
        for part in head_groups(qk):
            buffers = _group_buffers(buffers, band, part, v, "forward", fused)
            total[:, part], any_other[:, part], scores, orders, lses, kept = heads_forward(
                qk[:, part], scale[:, part], v[:, part], buckets[:, part], valid, band, dropout,
                seed + part.start * buckets.shape[2], buffers, out[:, part], keep)
            saved += [scores, orders, lses]
            ctx.kept.append(kept)
        del buffers
        ctx.save_for_backward(h, w_qk, w_v, buckets, valid, out, total, any_other, *saved)
        ctx.band, ctx.dropout, ctx.seed, ctx.fused = band, dropout, seed, fused
        return out

    @staticmethod
    def backward(ctx, d_out):
        h_in, w_qk_in, w_v_in, buckets, valid, out, total, any_other, *saved = ctx.saved_tensors
        h, w_qk, w_v = (t.to(out.dtype) for t in (h_in, w_qk_in, w_v_in))
        batch, d = h.shape[0], w_qk.shape[0] // buckets.shape[1]
        h_rows = h.reshape(-1, h.shape[-1])
        d_h = memory.empty(h_rows.shape, h_rows)   # written by the first group's product, added to by the rest
        d_w_qk, d_w_v = torch.empty_like(w_qk), torch.empty_like(w_v)
        d_out = d_out.to(out.dtype)
        buffers = None
        for i, part in enumerate(head_groups(out)):
            buffers = _group_buffers(buffers, ctx.band, part, out, "backward", ctx.fused)
            rows, width = slice(part.start * d, part.stop * d), part.stop - part.start
            # The group's qk and v side by side in (B L, 2 width d) rows of the buffers, and their gradients
            # alike: one product of twice the width costs ~3/4 of two (measured at 64K tokens).
            w_rows = torch.cat([w_qk[rows], w_v[rows]])
            qkv_rows, d_qkv_rows = (x.view(-1, 2 * width * d) for x in (buffers.qkv, buffers.d_qkv))
            qk_rows, v_rows = torch.mm(h_rows, w_rows.t(), out=qkv_rows).split(width * d, dim=1)
            qk, v = heads_rows(qk_rows, batch, width), heads_rows(v_rows, batch, width)
            scale, mean_square = key_scale(qk)
            d_qk, d_v = (heads_rows(x, batch, width) for x in d_qkv_rows.split(width * d, dim=1))
            d_scale = torch.empty_like(scale)
            heads_backward(qk, scale, v, buckets[:, part], valid, out[:, part], total[:, part],
                            any_other[:, part], *saved[3 * i:3 * i + 3], d_out[:, part], ctx.band,
                            ctx.dropout, ctx.seed + part.start * buckets.shape[2], buffers, d_qk, d_scale, d_v,
                            ctx.kept[i])
            ctx.kept[i] = None   # free this group's kept rounds now
            # The keys' scale depends on qk too: ds/dqk = -s qk / (d m).
            d_qk.addcmul_((d_scale * scale / (-d * mean_square))[..., None], qk)
            if i == 0:
                torch.mm(d_qkv_rows, w_rows, out=d_h)
            else:
                d_h.addmm_(d_qkv_rows, w_rows)
            d_w_rows = torch.mm(d_qkv_rows.t(), h_rows)
            d_w_qk[rows], d_w_v[rows] = d_w_rows.split(width * d)
        return (d_h.view(h.shape).to(h_in.dtype), d_w_qk.to(w_qk_in.dtype), d_w_v.to(w_v_in.dtype),
                None, None, None, None, None, None, None, None)


def lsh_attention_projected(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, qk: torch.Tensor,
                            buckets: torch.Tensor, band: Band, key_valid: torch.Tensor | None = None,
                            dropout: float = 0.0, training: bool = False, v: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Shared-QK LSH attention with a "bucket" window from the layer input, rounds one at a time.

    h: (batch, length, d_model), length a multiple of the chunk; w_qk, w_v: (heads * d_head, d_model)
    projection weights; qk: (batch, heads, length, d_head), h's queries as already projected for
    hashing (used in forward, not stored); v: the values as projected alike, or None (projected here).
    buckets: (batch, heads, rounds, length), unique across rounds, padding in buckets of its own
    (``hash_with_padding``). key_valid: (batch, length) or None.
    Returns (batch, heads, length, d_head), stored as (batch, length, heads, d_head).
    """
    if band.wrap or not band.same_bucket:
        raise ValueError("lsh_attention_projected needs a band with same_bucket=True and no wrap-around")
    dropout = dropout if training else 0.0
    # Keep the rounds only where a backward will read them (grad mode is off inside forward).
    differentiable = torch.is_grad_enabled() and (h.requires_grad or w_qk.requires_grad or w_v.requires_grad)
    # The compiled core recomputes a round's scores from its spans alone: keeping probabilities (an eager
    # core trade) is not worth their memory there.
    keep = differentiable and _keep_rounds(qk, buckets.shape[2], band) and not native_core(qk, dropout)
    return _ProjectedLSH.apply(h, w_qk, w_v, qk.detach(), None if v is None else v.detach(), buckets, key_valid,
                               band, dropout, dropout_seed() if dropout else 0, keep)
