"""LSH attention with the bucket window, from the layer's normalised input: the projections happen inside.

What forward stores is the input h (batch, length, d_model), the output and each round's normalisers,
never the projected queries and values of all heads: backward projects one head group at a time again
(one product of the group's query and value weights side by side) and turns that group's gradients into
those of h and of the two weights at once. The heads go in groups small enough that a group's rows stay
near HEAD_GROUP_ELEMENTS; within a group the rounds run one after the other (rounds.py on the eager core,
fused_rounds.py on the compiled one).

``heads_forward`` and ``heads_backward`` are the two halves; ``EagerLSH`` joins them as an autograd
function for the eager core, native/ops.py as a torch operator for the compiled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fused_rounds, memory, rounds
from .bands import Band
from .keys import key_scale
from .layout import heads_last, heads_rows
from .rounds import RoundBuffers, RoundGradients, RoundInputs, RoundsState

HEAD_GROUP_ELEMENTS = 1 << 20   # q values of the heads attended together (4 MiB in float32)
KEEP_ROUNDS_BYTES = 128 << 20   # the eager core keeps the rounds' sorted rows and probabilities up to this


def head_groups(q: torch.Tensor) -> list[slice]:
    """Heads in groups small enough that one group's sorted copies stay near HEAD_GROUP_ELEMENTS."""
    batch, heads, length, d = q.shape
    size = max(1, HEAD_GROUP_ELEMENTS // (batch * length * d))
    return [slice(h, min(h + size, heads)) for h in range(0, heads, size)]


def project_pairs(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, heads: int) -> torch.Tensor:
    """h's queries and values from one product (no autograd: forward's, for hashing and the rounds), whose
    rows hold each head's query next to its value: (batch, length, heads * 2 d). One product of twice the
    width costs less than two, and the rounds read a head's query and value rows as one piece."""
    d_model = h.shape[-1]
    w = torch.stack([w_qk.view(heads, -1, d_model), w_v.view(heads, -1, d_model)], dim=1).flatten(0, 2)
    with torch.no_grad():
        return memory.linear(h, w)


def split_pairs(rows: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``project_pairs``' rows -> qk and v (batch, heads, length, d), views."""
    pairs = rows.view(*rows.shape[:2], heads, 2, -1).transpose(1, 2)   # (B, heads, L, 2, d)
    return pairs[..., 0, :], pairs[..., 1, :]


def keep_rounds(qk: torch.Tensor, n_rounds: int, band: Band) -> bool:
    """Whether the eager core's forward keeps every round's sorted rows and probabilities for backward: a
    speed for memory trade that pays at short lengths, and that the round-by-round design exists to avoid
    at long ones."""
    return rounds.kept_bytes(tuple(qk.shape), n_rounds, band.window, qk.element_size()) <= KEEP_ROUNDS_BYTES


def _group_buffers(buffers: RoundBuffers | None, band: Band, part: slice, like: torch.Tensor,
                   kind: str, fused: bool) -> RoundBuffers:
    """Round buffers for head group ``part`` of like (B, H, L, d): the last group's, unless its size
    differs (only the last group can be smaller)."""
    n = like.shape[0] * (part.stop - part.start) * like.shape[2]
    if buffers is None or buffers.n != n:
        buffers = RoundBuffers(band, n, like.shape[-1], like.shape[-1], like, kind, fused)
    return buffers


@dataclass
class HeadsState:
    """What ``heads_forward`` keeps for ``heads_backward``, for all heads: total, any_other (B, H, L);
    scores, lses (rounds, B, H, L) (lses by sorted item within each sequence); orders (rounds, B, H, L) or
    None (the compiled core sorts again); kept: per head group, the eager core's kept rounds or None."""

    total: torch.Tensor
    any_other: torch.Tensor
    scores: torch.Tensor
    lses: torch.Tensor
    orders: torch.Tensor | None
    kept: list

    def group(self, part: slice, i: int) -> RoundsState:
        """Head group i's (heads ``part``) RoundsState."""
        n_rounds = self.scores.shape[0]
        return RoundsState(self.total[:, part], self.any_other[:, part],
                           self.scores[:, :, part].reshape(n_rounds, -1), self.lses[:, :, part].reshape(n_rounds, -1),
                           None if self.orders is None else self.orders[:, :, part], self.kept[i])


def heads_forward(h: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor,
                  valid: torch.Tensor | None, band: Band, dropout: float, seed: int, keep: bool,
                  fused: bool) -> tuple[torch.Tensor, HeadsState]:
    """The attention of every head group, rounds one at a time. qk, v (B, H, L, d): h's projections (not
    stored); buckets (B, H, rounds, L). Returns the output (B, H, L, d), stored as (B, L, H, d), and the
    state for backward. ``fused``: on the compiled core (then ``keep`` must be False)."""
    scale, _ = key_scale(qk)
    out = heads_last(v)
    batch, heads, n_rounds, length = buckets.shape
    total = qk.new_empty(scale.shape)
    any_other = torch.empty(total.shape, dtype=torch.bool, device=qk.device)
    scores, lses = (qk.new_empty(n_rounds, batch, heads, length) for _ in range(2))
    orders = None if fused else torch.empty(n_rounds, batch, heads, length, dtype=torch.long, device=qk.device)
    kept, buffers = [], None
    for part in head_groups(qk):
        buffers = _group_buffers(buffers, band, part, v, "forward", fused)
        inputs = RoundInputs(qk[:, part], scale[:, part], v[:, part], buckets[:, part], valid)
        group_seed = seed + part.start * n_rounds
        if fused:
            state = fused_rounds.forward(inputs, band, buffers, out[:, part])
        else:
            state = rounds.forward(inputs, band, dropout, group_seed, buffers, out[:, part], keep)
            orders[:, :, part] = state.orders
        total[:, part], any_other[:, part] = state.total, state.any_other
        group_shape = (n_rounds, batch, part.stop - part.start, length)
        scores[:, :, part], lses[:, :, part] = state.scores.view(group_shape), state.lses.view(group_shape)
        kept.append(state.kept)
    return out, HeadsState(total, any_other, scores, lses, orders, kept)


def heads_backward(d_out: torch.Tensor, h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor,
                   buckets: torch.Tensor, valid: torch.Tensor | None, out: torch.Tensor, state: HeadsState,
                   band: Band, dropout: float, seed: int, fused: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of h (B, L, d_model), w_qk and w_v given d_out (B, H, L, d), head group by head group,
    each group projected again. All in out's dtype."""
    batch, d = h.shape[0], w_qk.shape[0] // buckets.shape[1]
    n_rounds = buckets.shape[2]
    h_rows = h.reshape(-1, h.shape[-1])
    d_h = memory.empty(h_rows.shape, h_rows)   # written by the first group's product, added to by the rest
    d_w_qk, d_w_v = torch.empty_like(w_qk), torch.empty_like(w_v)
    buffers = None
    for i, part in enumerate(head_groups(out)):
        buffers = _group_buffers(buffers, band, part, out, "backward", fused)
        rows, width = slice(part.start * d, part.stop * d), part.stop - part.start
        # The group's qk and v side by side in (B L, 2 width d) rows of the buffers, and their gradients
        # alike: one product of twice the width costs less than two.
        w_rows = torch.cat([w_qk[rows], w_v[rows]])
        qkv_rows, d_qkv_rows = (x.view(-1, 2 * width * d) for x in (buffers.qkv, buffers.d_qkv))
        qk_rows, v_rows = torch.mm(h_rows, w_rows.t(), out=qkv_rows).split(width * d, dim=1)
        qk, v = heads_rows(qk_rows, batch, width), heads_rows(v_rows, batch, width)
        scale, mean_square = key_scale(qk)
        d_qk, d_v = (heads_rows(x, batch, width) for x in d_qkv_rows.split(width * d, dim=1))
        grads = RoundGradients(d_qk, torch.empty_like(scale), d_v)
        inputs = RoundInputs(qk, scale, v, buckets[:, part], valid)
        group_state = state.group(part, i)
        state.kept[i] = None   # free this group's kept rounds once done
        if fused:
            fused_rounds.backward(inputs, group_state, out[:, part], d_out[:, part], band, buffers, grads)
        else:
            rounds.backward(inputs, group_state, out[:, part], d_out[:, part], band, dropout,
                            seed + part.start * n_rounds, buffers, grads)
        del group_state
        # The keys' scale depends on qk too: ds/dqk = -s qk / (d m).
        d_qk.addcmul_((grads.d_scale * scale / (-d * mean_square))[..., None], qk)
        if i == 0:
            torch.mm(d_qkv_rows, w_rows, out=d_h)
        else:
            d_h.addmm_(d_qkv_rows, w_rows)
        d_w_rows = torch.mm(d_qkv_rows.t(), h_rows)
        d_w_qk[rows], d_w_v[rows] = d_w_rows.split(width * d)
    return d_h.view(h.shape), d_w_qk, d_w_v


class EagerLSH(torch.autograd.Function):
    """heads_forward and heads_backward on the eager core. The projections run in qk's dtype (bfloat16
    under autocast, as the layer's own qk), in forward and when backward projects again (autocast is off
    there); gradients go back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, h, w_qk, w_v, qk, v, buckets, valid, band, dropout, seed, keep):
        out, state = heads_forward(h, qk, v, buckets, valid, band, dropout, seed, keep, fused=False)
        ctx.save_for_backward(h, w_qk, w_v, buckets, valid, out, state.total, state.any_other, state.scores,
                              state.lses, state.orders)
        ctx.band, ctx.dropout, ctx.seed, ctx.kept = band, dropout, seed, state.kept
        return out

    @staticmethod
    def backward(ctx, d_out):
        h_in, w_qk_in, w_v_in, buckets, valid, out, total, any_other, scores, lses, orders = ctx.saved_tensors
        h, w_qk, w_v = (t.to(out.dtype) for t in (h_in, w_qk_in, w_v_in))
        state = HeadsState(total, any_other, scores, lses, orders, ctx.kept)
        d_h, d_w_qk, d_w_v = heads_backward(d_out.to(out.dtype), h, w_qk, w_v, buckets, valid, out, state,
                                            ctx.band, ctx.dropout, ctx.seed, fused=False)
        return (d_h.to(h_in.dtype), d_w_qk.to(w_qk_in.dtype), d_w_v.to(w_v_in.dtype),
                None, None, None, None, None, None, None, None)
