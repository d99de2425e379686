"""LSH attention with the bucket window, one hashing round at a time: the eager core's rounds.

In the "bucket" window no query ever sees an item of another round, so the rounds can be attended one
after the other and combined on the fly: an online softmax over rounds (as flash attention does over key
blocks) keeps one round's sorted copies in memory instead of n_hashes of them, and backward recomputes
each round instead of storing it. Each round is the pipeline's steps in turn: sort by bucket
(sorting.py), the bucket window's spans (intervals.py), attention on the interval core, back to
position order, into the combination. fused_rounds.py runs the same rounds on the compiled core.

The types here are shared by both: what the rounds attend over (RoundInputs), the rows every round
reuses (RoundBuffers) and what forward keeps for backward (RoundsState).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import memory
from .bands import Band, Window
from .intervals import Spans, bucket_spans, interval_backward, interval_forward, unpad_keys
from .sorting import gather_rows, row_index, sort_by_bucket, sorted_validity


@dataclass
class RoundInputs:
    """What the rounds of one head group attend over: qk, v (B, H, L, d) in any layout ``storage_rows``
    covers; key_scale (B, H, L) (keys are qk * key_scale); buckets (B, H, rounds, L), unique across
    rounds, padding in buckets of its own; valid (B, L) bool or None."""

    qk: torch.Tensor
    key_scale: torch.Tensor
    v: torch.Tensor
    buckets: torch.Tensor
    valid: torch.Tensor | None

    @property
    def rounds(self) -> int:
        return self.buckets.shape[2]

    @property
    def items(self) -> int:
        """B * H * L: the rows of one round."""
        return self.v.shape[0] * self.v.shape[1] * self.v.shape[2]


@dataclass
class RoundsState:
    """What a forward over rounds keeps for its backward.

    total, any_other: (B, H, L) the total normaliser and whether any round saw another key than the query;
    scores: (rounds, B * H * L) each round's normaliser by position (-inf where the query saw only
    itself); lses: (rounds, B * H * L) each round's logsumexp by sorted item; orders: (rounds, B, H, L)
    each round's sort (eager rounds; the compiled core sorts again); kept: with ``keep``, each round's
    sorted rows and probabilities (eager rounds only), else None.
    """

    total: torch.Tensor
    any_other: torch.Tensor
    scores: torch.Tensor
    lses: torch.Tensor
    orders: torch.Tensor | None = None
    kept: list | None = None


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

    KINDS = ("forward", "backward", "kept")   # "kept": one round's sorted rows only (forward's keep)

    def __init__(self, band: Band, n: int, d_qk: int, d_v: int, like: torch.Tensor, kind: str,
                 fused: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        window = self.window = band.window.in_half_chunks()
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
        parts = memory.carve(like, *shapes)
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


def sorted_round(buffers: RoundBuffers, causal: bool, inputs: RoundInputs, r: int,
                 positions: torch.Tensor) -> SortedRound:
    """Gather round r's items into ``buffers``; positions (B, H, L): its sort order (``sort_by_bucket``)."""
    window = buffers.window
    order = row_index(positions, positions.shape[2])
    unsorted = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
    query_valid = sorted_validity(inputs.valid, positions)
    spans = bucket_spans(window, inputs.buckets[:, :, r].gather(2, positions).flatten(), positions.shape[2], causal,
                         None if query_valid is None else query_valid.flatten())
    scale = inputs.key_scale.reshape(-1).index_select(0, order)
    gather_rows(inputs.qk, positions, buffers.q)
    torch.mul(buffers.q, scale[:, None], out=unpad_keys(buffers.k_padded, window))
    gather_rows(inputs.v, positions, unpad_keys(buffers.v_padded, window))
    return SortedRound(buffers.q, buffers.k_padded, buffers.v_padded, scale, spans, positions, order, unsorted)


def forward(inputs: RoundInputs, band: Band, dropout: float, seed: int, buffers: RoundBuffers,
            out: torch.Tensor, keep: bool = False) -> RoundsState:
    """Rounds one after the other, combined by an online softmax; the result written into ``out``
    (B, H, L, d), any layout. ``buffers``: a forward RoundBuffers for B * H * L rows. With ``keep``,
    each round's sorted rows and probabilities are kept for backward (a speed for memory trade)."""
    qk, v, rounds, n = inputs.qk, inputs.v, inputs.rounds, inputs.items
    window = buffers.window
    acc = buffers.acc.zero_()
    best = qk.new_full((n,), float("-inf"))
    norm = qk.new_zeros(n)
    scores, lses = qk.new_empty(rounds, n), qk.new_empty(rounds, n)
    orders, kept = [], [] if keep else None
    for r in range(rounds):
        _, positions, _ = sort_by_bucket(inputs.buckets[:, :, r, None])
        orders.append(positions)
        sorted_rows = RoundBuffers(band, n, qk.shape[-1], v.shape[-1], v, "kept") if keep else buffers
        items = sorted_round(sorted_rows, band.causal, inputs, r, positions)
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
    return RoundsState(total, any_other, scores, lses, torch.stack(orders), kept)


def _finish_rounds(acc, best, norm, v, out):
    """out = acc / norm, or v where no round saw another key; the total normaliser and any_other."""
    any_other = (norm > 0).view(*v.shape[:3], 1)
    # A query that saw only itself in every round returns its own value, exactly.
    torch.where(any_other, acc.div_(norm.clamp_min(1e-30)[:, None]).view(v.shape), v, out=out)
    total = best + torch.log(norm)
    return total.view(v.shape[:3]), any_other.view(v.shape[:3])


@dataclass
class RoundGradients:
    """Where backward writes: d_qk, d_v (B, H, L, d) and d_scale (B, H, L), any layout; and, set up by
    ``start_backward``, each round's weight w_r and row w_r (g . o) by position (rounds, B * H * L) and the
    flat accumulator of the scale's gradient."""

    d_qk: torch.Tensor
    d_scale: torch.Tensor
    d_v: torch.Tensor
    weights: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    scale_grad: torch.Tensor | None = None


def start_backward(state: RoundsState, out: torch.Tensor, d_out: torch.Tensor, grads: RoundGradients) -> None:
    """What every round's backward shares, by position.

    With o = sum_r w_r o_r and w_r = exp(l_r - total), the gradient of round r's logit x_j is
    w_r P_j (g . v_j - g . o) (the paths through o_r and through l_r together), so a round needs only its
    weight and the final output: d_out scaled by w_r, and row = w_r (g . o). Queries that returned their
    own value (no round saw another key) pass d_out straight to their value.
    """
    # g . o through d_v's rows, overwritten next (vecdot's own product would be a fresh block of pages).
    g_dot_o = torch.mul(d_out, out, out=grads.d_v).sum(-1).flatten()
    any_other, total = state.any_other.flatten(), state.total.flatten()
    grads.d_qk.zero_()
    torch.mul(d_out, (~any_other).view(*d_out.shape[:3], 1), out=grads.d_v)
    grads.scale_grad = torch.zeros_like(total)
    grads.weights = torch.sub(state.scores, total).exp_().masked_fill_(~any_other, 0.0)
    grads.rows = grads.weights * g_dot_o


def backward(inputs: RoundInputs, state: RoundsState, out: torch.Tensor, d_out: torch.Tensor, band: Band,
             dropout: float, seed: int, buffers: RoundBuffers, grads: RoundGradients) -> None:
    """Gradients of ``forward``, recomputing each round's scores (or reading what forward kept), written
    into ``grads``. ``buffers``: a backward RoundBuffers for B * H * L rows. Keys are qk * scale: their
    gradient goes to qk (times the scale) and to the scale (dotted with qk)."""
    start_backward(state, out, d_out, grads)
    d_qk, d_v = grads.d_qk, grads.d_v
    for r in range(inputs.rounds):
        if state.kept is None:
            items, probs = sorted_round(buffers, band.causal, inputs, r, state.orders[r]), None
        else:
            items, probs = state.kept[r]
        weight = grads.weights[r].index_select(0, items.order)
        d_round = buffers.d_round
        gather_rows(d_out, items.positions, d_round)
        d_round.mul_(weight[:, None])
        d_q, d_k, d_v_round = interval_backward(items.q, items.k_padded, items.v_padded, items.spans,
                                                buffers.window, d_round, grads.rows[r].index_select(0, items.order),
                                                dropout, seed + r, grads=buffers.core_grads, probs=probs)
        d_k = unpad_keys(d_k, buffers.window)
        grads.scale_grad += torch.linalg.vecdot(d_k, items.q).index_select(0, items.unsorted)
        # Back to position order through the d_round rows, free once the core is done with them.
        d_qk += torch.index_select(d_q.addcmul_(d_k, items.key_scale[:, None]), 0, items.unsorted,
                                   out=d_round).view(d_qk.shape)
        d_v += torch.index_select(unpad_keys(d_v_round, buffers.window), 0, items.unsorted,
                                  out=d_round).view(d_v.shape)
    grads.d_scale.copy_(grads.scale_grad.view(grads.d_scale.shape))


def kept_bytes(inputs_shape: tuple[int, int, int, int], rounds: int, window: Window, element_size: int) -> int:
    """Memory ``forward(keep=True)`` holds for (B, H, L, d) inputs: every round's sorted q, padded k and
    v, probabilities, spans and orders."""
    batch, heads, length, d = inputs_shape
    per_row = 3 * d + window.width + 8
    return rounds * batch * heads * length * per_row * element_size
