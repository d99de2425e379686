"""LSH attention over all rounds at once, step by step, on the masked reference core.

    hash_with_padding   angular LSH of the shared query-key vectors, padding in a bucket of its own
    sort_by_bucket      order items by (round, bucket, position)
    banded_attention    attention inside the band of the sorted sequence
    unsort              back to (round, position) order
    combine_rounds      weight each round's output by its softmax normaliser

This is the path of the anchors' chunk window (transformers parity), whose band wraps from one round
into the next, and the tests' reference. The bucket window, where rounds never mix, runs the same steps a
round and a head group at a time (bucket_attention.py; backend.py chooses its core).
"""

from __future__ import annotations

import torch

from .banded import banded_attention
from .bands import Band
from .hashing import hash_with_padding
from .keys import normalize_keys
from .sorting import gather_items, sort_by_bucket, sorted_validity, unsort


def combine_rounds(out: torch.Tensor, lse: torch.Tensor, has_other: torch.Tensor,
                   anchor: bool = False) -> torch.Tensor:
    """Combine hashing rounds, each weighted by the softmax of its normaliser.

    out: (batch, heads, rounds, length, d); lse, has_other: (batch, heads, rounds, length).
    A round in which a query saw only itself carries no weight when another round saw other keys
    (the anchors get there with a -1e5 logit, up to rounding); when every round saw only the query
    itself, all rounds return its value exactly.
    ``anchor=True`` weighs as transformers does, exp(lse - logsumexp(lse)): next to its -1e5 self
    logits that rounding scales such rows by 0.998 (the 0.2% defect), reproduced for parity only.
    """
    if out.shape[2] == 1:
        return out[:, :, 0]
    if anchor:
        weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
    else:
        any_other = has_other.any(dim=2, keepdim=True)
        weights = torch.softmax(lse.masked_fill(any_other & ~has_other, float("-inf")), dim=2)
    return (out * weights[..., None]).sum(dim=2)


def lsh_attention_all_rounds(qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor,
                             n_buckets: int | tuple[int, int], band: Band, key_valid: torch.Tensor | None,
                             dropout: float = 0.0, training: bool = False,
                             to_hash: torch.Tensor | None = None) -> torch.Tensor:
    """Shared-QK LSH attention, every round in one sorted sequence. qk, v: (batch, heads, length, d),
    length a multiple of the chunk; rotations (heads, d, rounds, width); key_valid (batch, length) or
    None; to_hash: the vectors to hash (hashing.hashing_vectors), qk by default. Returns (batch, heads,
    length, d)."""
    batch, heads, length, _ = qk.shape
    buckets = hash_with_padding(qk if to_hash is None else to_hash, rotations, n_buckets, key_valid)
    order, positions, sorted_buckets = sort_by_bucket(buckets)
    out, lse, has_other = banded_attention(
        gather_items(qk, positions), gather_items(normalize_keys(qk), positions), gather_items(v, positions),
        positions, band, buckets=sorted_buckets, key_valid=sorted_validity(key_valid, positions),
        dropout=dropout, training=training)
    out, lse, has_other = unsort(order, out, lse, has_other)
    rounds_shape = (batch, heads, rotations.shape[2], length)
    return combine_rounds(out.reshape(*rounds_shape, -1), lse.reshape(rounds_shape),
                          has_other.reshape(rounds_shape), anchor=band.anchor_masks)


def shared_qk_attention(qk: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None,
                        dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Shared-QK attention over a whole sequence of one chunk, as transformers does it when the sequence
    fits in one chunk (no hashing: one round of full attention). (B, H, L, d) -> (B, H, L, d).

    transformers' operations on the same layouts, one after the other (products of the strided head
    views, its mask constants): the same bits as its fallback on every CPU, whose matrix kernels round by
    the operands' layout. A query attends to itself only when nothing else is allowed: its -1e5 logit
    then wins against the masked -1e9."""
    half = qk.dtype == torch.float16
    masked, self_logit = (-1e4, -1e3) if half else (-1e9, -1e5)
    dots = torch.matmul(qk, normalize_keys(qk).transpose(-1, -2))
    length = qk.shape[2]
    positions = torch.arange(length, device=qk.device)
    allowed = None
    if causal:
        allowed = positions[:, None] >= positions[None, :]
    if key_valid is not None:
        padding = key_valid[:, None, None, :]
        allowed = padding if allowed is None else padding & allowed
    if allowed is not None:
        dots = torch.where(allowed, dots, torch.tensor(masked, dtype=dots.dtype, device=dots.device))
    not_self = positions[:, None] != positions[None, :]
    dots = torch.where(not_self, dots, torch.tensor(self_logit, dtype=dots.dtype, device=dots.device))
    probs = torch.exp(dots - torch.logsumexp(dots, dim=-1, keepdim=True))
    probs = torch.nn.functional.dropout(probs, dropout, training)
    return torch.matmul(probs, v)
