"""The bucket window's rounds on the compiled core: rounds.py's forward and backward, fused.

The steps are the same (sort by bucket, spans, attention, back to position order, combination), but the
sort and the spans are one compiled pass (a counting sort per sequence), and the core reads each round's
rows by index where they lie instead of sorted copies: forward adds each query's result straight into
the online softmax over rounds in position order (the last round finishes it), backward scatters a
round's gradients back in position order itself. No sorted copy of a head's rows goes through memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bands import Band, Window
from .intervals import Spans
from .native import kernels as native
from .rounds import RoundBuffers, RoundGradients, RoundInputs, RoundsState, start_backward
from .sorting import item_offsets, storage_view


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
    flat = storage_view(x)
    if (flat is not None and like is not None and x.shape == like[0].shape and x.stride() == like[0].stride()
            and storage_view(like[0]) is not None):
        return native.Rows(flat, like[1].index, x.shape[-1])
    if flat is None:
        if written:
            raise ValueError("item_rows: rows to write must lie whole in x's storage (see storage_rows)")
        x = x.contiguous()
        flat = storage_view(x)
    return native.Rows(flat, item_offsets(x, positions, 1).flatten(), x.shape[-1])


def fused_round(window: Window, causal: bool, inputs: RoundInputs, r: int) -> FusedRound:
    """Round r's sort, spans and rows, the sort and spans in one compiled pass."""
    positions, order, lo, hi, skip, has_other = native.round_spans(inputs.buckets[:, :, r], inputs.valid,
                                                                   window.chunk_length, window.before,
                                                                   window.after, causal)
    q_rows = item_rows(inputs.qk, positions)
    return FusedRound(positions, order, Spans(lo, hi, skip, None, has_other),
                      inputs.key_scale.reshape(-1).index_select(0, order), q_rows,
                      item_rows(inputs.v, positions, like=(inputs.qk, q_rows)))


def forward(inputs: RoundInputs, band: Band, buffers: RoundBuffers, out: torch.Tensor) -> RoundsState:
    """rounds.forward on the compiled core; the result written into ``out`` (B, H, L, d), whose rows must
    lie whole in its storage."""
    qk, v, rounds, n = inputs.qk, inputs.v, inputs.rounds, inputs.items
    window, c = buffers.window, buffers.window.chunk_length
    acc = buffers.acc.zero_()
    best, norm = qk.new_full((n,), float("-inf")), qk.new_zeros(n)
    scores, lses = qk.new_empty(rounds, n), qk.new_empty(rounds, n)
    total, any_other = qk.new_empty(n), torch.empty(n, dtype=torch.bool, device=qk.device)
    by_position = torch.arange(v.shape[2], device=v.device).expand(v.shape[:3])
    finish = (item_rows(out, by_position, written=True), total, any_other)
    for r in range(rounds):
        items = fused_round(window, band.causal, inputs, r)
        native.forward(items.q, None, items.v, items.spans, c, window.width, window.before * c, lses[r],
                       k_scale=items.scale, combine=(items.order, items.spans.has_other, acc, best, norm, scores[r]),
                       finish=finish if r == rounds - 1 else None)
    return RoundsState(total.view(v.shape[:3]), any_other.view(v.shape[:3]), scores, lses)


def backward(inputs: RoundInputs, state: RoundsState, out: torch.Tensor, d_out: torch.Tensor, band: Band,
             buffers: RoundBuffers, grads: RoundGradients) -> None:
    """rounds.backward on the compiled core: it reads the rows of qk, v and d_out in place and adds each
    round's gradients to d_qk, the scale's and d_v in position order (their rows must lie whole in their
    storage)."""
    start_backward(state, out, d_out, grads)
    window, c = buffers.window, buffers.window.chunk_length
    core_grads = buffers.core_grads
    for r in range(inputs.rounds):
        items = fused_round(window, band.causal, inputs, r)
        positions = items.positions
        weight, row = grads.weights[r].index_select(0, items.order), grads.rows[r].index_select(0, items.order)
        native.backward(items.q, None, items.v, item_rows(d_out, positions), items.spans, c, window.width,
                        window.before * c, state.lses[r], row, *core_grads, k_scale=items.scale, g_scale=weight)
        native.scatter_gradients(items.q, items.scale, items.order, window.before * c, *core_grads,
                                 item_rows(grads.d_qk, positions, written=True, like=(inputs.qk, items.q)),
                                 item_rows(grads.d_v, positions, written=True, like=(inputs.v, items.v)),
                                 grads.scale_grad)
    grads.d_scale.copy_(grads.scale_grad.view(grads.d_scale.shape))
