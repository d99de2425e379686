"""The compiled core as torch operators: what torch.compile traces (through their fakes) and autograd
differentiates (through the backward operators), in place of Python calls into ctypes. One operator per
step of the bucket window's pipeline, and one for local attention:

    reformer::project_pairs            each head's query and value from one product, on huge pages
    reformer::hash_buckets             the bucket ids of angular LSH (the compiled pass)
    reformer::lsh_bucket_attention     sort, attend, unsort and combine the rounds (the fused rounds),
    reformer::lsh_bucket_attention_backward    differentiable in the layer's input and weights
    reformer::local_attention          local attention on the interval core
    reformer::local_attention_backward

They take float32 or float64 CPU tensors (ops/backend.py routes nothing else here) and return fresh
tensors; the extra outputs of the forward operators (normalisers) are what their backward reads.
"""

from __future__ import annotations

import torch

from .. import bucket_attention
from ..bands import Band, Window
from ..hashing import hash_vectors
from ..intervals import local_spans, pad_keys, unpad_keys
from ..layout import heads_rows
from ..registry import operator
from . import kernels


def _bucket_band(chunk: int, before: int, after: int, causal: bool) -> Band:
    return Band(Window(chunk, before, after), causal, "bucket")


def _check_floats(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype not in kernels.DTYPES:
            raise ValueError(f"the compiled core takes float32 or float64 CPU tensors; {name} is {t.dtype} on "
                             f"{t.device.type} (use attention_backend 'eager' or 'auto')")


@operator
def project_pairs(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, heads: int) -> torch.Tensor:
    """bucket_attention.project_pairs: (B, L, heads * 2 d) rows, each head's query next to its value. Not
    differentiable (forward's rows for hashing and the rounds; backward projects again)."""
    _check_floats(h=h, w_qk=w_qk, w_v=w_v)
    return bucket_attention.project_pairs(h, w_qk, w_v, heads)


@torch.library.register_fake(project_pairs)
def _(h, w_qk, w_v, heads):
    return h.new_empty(*h.shape[:2], w_qk.shape[0] + w_v.shape[0])


@operator
def hash_buckets(vectors: torch.Tensor, rotations: torch.Tensor, n_buckets: list[int]) -> torch.Tensor:
    """hashing.hash_vectors through the compiled pass: vectors (B, H, L, d), rotations (H, d, rounds,
    width), n_buckets [n] or [a, b] (factorised) -> (B, H, rounds, L) int64 ids."""
    _check_floats(vectors=vectors)
    return hash_vectors(vectors, rotations, n_buckets[0] if len(n_buckets) == 1 else tuple(n_buckets), compiled=True)


@torch.library.register_fake(hash_buckets)
def _(vectors, rotations, n_buckets):
    batch, heads, length, _ = vectors.shape
    return vectors.new_empty(batch, heads, rotations.shape[2], length, dtype=torch.long)


@operator
def lsh_bucket_attention(h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor, qk: torch.Tensor, v: torch.Tensor,
                         buckets: torch.Tensor, valid: torch.Tensor | None, chunk: int, before: int, after: int,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """Shared-QK LSH attention with the bucket window, rounds one at a time on the compiled core.

    h: (B, L, d_model), L a multiple of ``chunk``; w_qk, w_v: (heads * d, d_model); qk, v: (B, heads, L, d),
    h's projections (read in forward, not stored: backward projects again, so no gradient flows to them);
    buckets: (B, heads, rounds, L) unique across rounds, padding in buckets of its own; valid: (B, L) bool
    or None. Returns out (B, L, heads * d) and, for backward, the total normaliser and any_other
    (B, heads, L), scores and lses (rounds, B, heads, L)."""
    _check_floats(h=h, w_qk=w_qk, w_v=w_v, qk=qk, v=v)
    out, state = bucket_attention.heads_forward(h, qk, v, buckets, valid, _bucket_band(chunk, before, after, causal),
                                                0.0, 0, keep=False, fused=True)
    batch, heads, length, d = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * d), state.total, state.any_other, state.scores, state.lses


@torch.library.register_fake(lsh_bucket_attention)
def _(h, w_qk, w_v, qk, v, buckets, valid, chunk, before, after, causal):
    batch, heads, rounds, length = buckets.shape
    per_head = (batch, heads, length)
    return (h.new_empty(batch, length, w_v.shape[0]), h.new_empty(per_head), h.new_empty(per_head, dtype=torch.bool),
            h.new_empty(rounds, *per_head), h.new_empty(rounds, *per_head))


@operator
def lsh_bucket_attention_backward(d_out: torch.Tensor, h: torch.Tensor, w_qk: torch.Tensor, w_v: torch.Tensor,
                                  buckets: torch.Tensor, valid: torch.Tensor | None, out: torch.Tensor,
                                  total: torch.Tensor, any_other: torch.Tensor, scores: torch.Tensor,
                                  lses: torch.Tensor, chunk: int, before: int, after: int, causal: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of h, w_qk and w_v from d_out (B, L, heads * d) and what the forward returned."""
    _check_floats(d_out=d_out, h=h, w_qk=w_qk, w_v=w_v)
    batch, length, width = out.shape
    heads = buckets.shape[1]
    state = bucket_attention.HeadsState(total, any_other, scores, lses, None, [None] * heads)
    d_heads = d_out.to(out.dtype).reshape(batch, length, heads, width // heads).transpose(1, 2)
    return bucket_attention.heads_backward(d_heads, h, w_qk, w_v, buckets, valid, heads_rows(out, batch, heads),
                                           state, _bucket_band(chunk, before, after, causal), 0.0, 0, fused=True)


@torch.library.register_fake(lsh_bucket_attention_backward)
def _(d_out, h, w_qk, w_v, buckets, valid, out, total, any_other, scores, lses, chunk, before, after, causal):
    return h.new_empty(h.shape), w_qk.new_empty(w_qk.shape), w_v.new_empty(w_v.shape)


def _differentiate(forward, backward, saved_inputs: tuple[int, ...]) -> None:
    """Register ``backward`` as the gradient of ``forward``, whose inputs end in the band's geometry (chunk,
    before, after, causal) and whose first output is the only one differentiated: backward(d_out, *the
    inputs at ``saved_inputs``, *forward's outputs, *geometry) gives the gradients of its first inputs."""
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*(inputs[i] for i in saved_inputs), *output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)   # no zero-filled gradients for the outputs backward only reads
        ctx.geometry, ctx.n_inputs = inputs[-4:], len(inputs)

    def gradients(ctx, d_out, *_):
        grads = () if d_out is None else tuple(backward(d_out, *ctx.saved_tensors, *ctx.geometry))
        return grads + (None,) * (ctx.n_inputs - len(grads))

    torch.library.register_autograd(forward, gradients, setup_context=setup_context)


# h, w_qk, w_v differentiable; qk, v (forward's projections) not; h, w_qk, w_v, buckets, valid saved
_differentiate(lsh_bucket_attention, lsh_bucket_attention_backward, (0, 1, 2, 5, 6))


def _own_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (N, d) contiguous rows in memory of their own (an operator's output never aliases its
    input): a copy where t is not laid out as rows already, else a clone."""
    rows = t.reshape(-1, t.shape[-1]).contiguous()
    return rows.clone() if rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else rows


def _local_geometry(shape, chunk: int, before: int, after: int, causal: bool, device):
    """The local spans and window of (B, H, L, d) queries laid end to end as rows."""
    batch, heads, length, _ = shape
    window = Window(chunk, before, after)
    return window, local_spans(window, batch * heads * length, length, causal, None, device)


@operator
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, before: int, after: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local attention on the compiled interval core: q, k, v (B, H, L, d), L a multiple of ``chunk``
    (keys scaled beforehand; no padding). Returns out (B, H, L, d) and, for backward (which then holds no
    copy of the projections), each query's logsumexp (B H L,), the queries as rows (B H L, d) and the keys
    and values in the core's padded layout."""
    _check_floats(q=q, k=k, v=v)
    window, spans = _local_geometry(q.shape, chunk, before, after, causal, q.device)
    q_rows, k_rows, v_rows = (_own_rows(t) for t in (q, k, v))
    k_padded, v_padded = pad_keys(k_rows, window), pad_keys(v_rows, window)
    del k_rows, v_rows
    n = q_rows.shape[0]
    out, lse = q_rows.new_empty(n, v.shape[-1]), q_rows.new_empty(n)
    kernels.forward(q_rows, k_padded, v_padded, spans, chunk, window.width, window.before * chunk, lse, out=out)
    return out.view(v.shape), lse, q_rows, k_padded, v_padded


@torch.library.register_fake(local_attention)
def _(q, k, v, chunk, before, after, causal):
    n = q.shape[0] * q.shape[1] * q.shape[2]
    padded = n + (before + after) * chunk
    return (v.new_empty(v.shape), q.new_empty(n), q.new_empty(n, q.shape[-1]), k.new_empty(padded, k.shape[-1]),
            v.new_empty(padded, v.shape[-1]))


@operator
def local_attention_backward(d_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_rows: torch.Tensor,
                             k_padded: torch.Tensor, v_padded: torch.Tensor, chunk: int, before: int, after: int,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v (B, H, L, d) from d_out (B, H, L, d) and what the forward returned."""
    _check_floats(d_out=d_out, out=out)
    batch, heads, length, _ = out.shape
    shape = (batch, heads, length, q_rows.shape[-1])
    window, spans = _local_geometry(shape, chunk, before, after, causal, out.device)
    d_rows, out_rows = (t.reshape(-1, t.shape[-1]).contiguous() for t in (d_out, out))
    row = (d_rows * out_rows).sum(dim=-1).contiguous()
    d_q, d_k, d_v = torch.empty_like(q_rows), torch.empty_like(k_padded), torch.empty_like(v_padded)
    kernels.backward(q_rows, k_padded, v_padded, d_rows, spans, chunk, window.width, window.before * chunk, lse,
                     row, d_q, d_k, d_v)
    return (d_q.view(shape), unpad_keys(d_k, window).reshape(shape),
            unpad_keys(d_v, window).reshape(*shape[:3], v_padded.shape[-1]))


@torch.library.register_fake(local_attention_backward)
def _(d_out, out, lse, q_rows, k_padded, v_padded, chunk, before, after, causal):
    shape = (*out.shape[:3], q_rows.shape[-1])
    return q_rows.new_empty(shape), k_padded.new_empty(shape), v_padded.new_empty(out.shape)


_differentiate(local_attention, local_attention_backward, ())   # gradients of q, k, v from forward's outputs
