"""Self-attention layers: LSH, local and full. Each is project -> core -> project.

LSH attention, step by step (one named function each):
    hash_with_padding  angular LSH of the shared query-key vectors, padding in a bucket of its own
    sort_by_bucket     order items by (round, bucket, position)                  (rounds.py)
    banded_attention   attention inside the band of the sorted sequence          (banded.py)
    unsort             back to (round, position) order                           (rounds.py)
    combine_rounds     weight each round's output by its softmax normaliser
In the default "bucket" window, where rounds never mix, ``lsh_attention_projected`` runs the same
steps one round at a time with an online combination, to bound memory (rounds.py; the projections
happen inside, lsh_projected.py), and attends on the interval core (intervals.py): there a query's
allowed keys are one interval of the sorted sequence.
Local attention is the same core on the unsorted sequence; full attention is SDPA. The general masked
core of banded.py serves the anchors' wrap-around bands (checkpoint parity) and is the tests' reference.
All layers take and return (batch, length, d_model) and accept any length: they pad internally to a
multiple of their chunk length and mask the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .banded import Band, banded_attention
from .config import ReformerConfig
from .hashing import derive_seed, draw_rotations, hash_vectors, total_buckets
from .intervals import Window, interval_attention, local_spans
from .lsh_projected import lsh_attention_projected, project_qk_v
from .rounds import gather_items, sort_by_bucket, sorted_validity, unsort


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(batch, length, heads * d_head) -> (batch, heads, length, d_head)."""
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, d_head) -> (batch, length, heads * d_head)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def pad_to_multiple(x: torch.Tensor, key_valid: torch.Tensor | None,
                    multiple: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad (batch, length, d) with zeros to a multiple of ``multiple``; mark the padding invalid."""
    length = x.shape[1]
    extra = -length % multiple
    if not extra:
        return x, key_valid
    if key_valid is None:
        key_valid = torch.ones(x.shape[0], length, dtype=torch.bool, device=x.device)
    x = F.pad(x, (0, 0, 0, extra))
    return x, F.pad(key_valid, (0, extra), value=False)


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """Keys of shared-QK attention: the query direction, x * rsqrt(mean(x^2) + 1e-6) / sqrt(d).

    This is trax's and transformers' convention; logits are then q . k_hat with no further scaling.
    Written in transformers' order of operations, for bit-identical logits.
    """
    return qk * torch.rsqrt(qk.pow(2).mean(dim=-1, keepdim=True) + 1e-6) / math.sqrt(qk.shape[-1])


def hash_with_padding(qk: torch.Tensor, rotations: torch.Tensor, n_buckets: int | tuple[int, int],
                      key_valid: torch.Tensor | None) -> torch.Tensor:
    """Bucket ids (batch, heads, rounds, length), unique across rounds, padding in an extra last bucket.

    Round r uses ids r * (B + 1) ... r * (B + 1) + B, where B is the number of buckets and id B of a
    round is padding: padding then sorts after every real item of its round and never shares a bucket
    with one, so it neither takes band slots of real queries nor shifts them.
    """
    buckets = hash_vectors(qk, rotations, n_buckets)
    n = total_buckets(n_buckets)
    if key_valid is not None:
        buckets = buckets.masked_fill(~key_valid[:, None, None, :], n)
    offsets = torch.arange(buckets.shape[2], device=qk.device)[:, None] * (n + 1)
    return buckets + offsets


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


class LSHSelfAttention(nn.Module):
    """Shared query-key attention restricted to items that hash alike.

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None, n_hashes=None)
    -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        self.n_hashes, self.n_buckets = config.n_hashes, config.n_buckets
        self.hash_seed, self.layer_idx = config.hash_seed, layer_idx
        self.dropout = config.attention_dropout
        bucket_window = config.lsh_window == "bucket"
        self.band = Band(config.chunk_length, config.n_chunks_before, config.n_chunks_after,
                         causal=config.causal, wrap=not bucket_window, same_bucket=bucket_window,
                         mask_self=True, anchor_masks=not bucket_window)
        inner = config.n_heads * config.d_head
        self.qk = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)
        # Calls made in training mode: with hash_seed and layer_idx it fixes that call's rotations,
        # so runs are reproducible and the reversible backward can replay them (reversible.py).
        self.hash_calls = 0

    def rotations(self, n_hashes: int) -> torch.Tensor:
        """Rotations (heads, d_head, n_hashes, width): fixed in eval, fresh per call in training."""
        if self.training:
            seed = derive_seed(self.hash_seed, self.layer_idx, self.hash_calls)
            self.hash_calls += 1
        else:
            seed = self.hash_seed
        return draw_rotations(seed, self.n_heads, self.d_head, n_hashes, self.n_buckets)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        n_hashes = n_hashes or self.n_hashes
        length = x.shape[1]
        x, key_valid = pad_to_multiple(x, key_valid, self.band.chunk_length)
        if self.band.same_bucket:
            # Rounds never mix in the bucket window: attend them one at a time (lsh_projected.py). The
            # queries and values projected here feed the hashing and forward's rounds, and are not stored:
            # backward projects again. (On huge pages: the compiled core reads these rows in bucket order.)
            qk, v = project_qk_v(x, self.qk.weight, self.v.weight, self.n_heads)   # (B, H, L, d) each
            buckets = hash_with_padding(qk, self.rotations(n_hashes), self.n_buckets, key_valid)
            out = lsh_attention_projected(x, self.qk.weight, self.v.weight, qk, buckets, self.band, key_valid,
                                          self.dropout, self.training, v=v)
            return self.out(merge_heads(out))[:, :length]

        qk = split_heads(self.qk(x), self.n_heads)            # (B, H, L, d)
        v = split_heads(self.v(x), self.n_heads)
        if self.band.anchor_masks and x.shape[1] <= self.band.chunk_length:
            # transformers skips hashing when the sequence fits in one chunk: one round of full
            # attention. (Hashing would find the same keys, but its rounds round differently.)
            out = self._attend_unsorted(qk, v, key_valid)
            return self.out(merge_heads(out))[:, :length]

        buckets = hash_with_padding(qk, self.rotations(n_hashes), self.n_buckets, key_valid)

        # The anchors' chunk window spans rounds (wrap-around): attend all rounds in one sorted sequence.
        order, positions, sorted_buckets = sort_by_bucket(buckets)
        out, lse, has_other = banded_attention(
            gather_items(qk, positions), gather_items(normalize_keys(qk), positions),
            gather_items(v, positions), positions, self.band, buckets=sorted_buckets,
            key_valid=sorted_validity(key_valid, positions),
            dropout=self.dropout, training=self.training)
        out, lse, has_other = unsort(order, out, lse, has_other)

        rounds_shape = (x.shape[0], self.n_heads, n_hashes, x.shape[1])
        out = combine_rounds(out.reshape(*rounds_shape, -1), lse.reshape(rounds_shape),
                             has_other.reshape(rounds_shape), anchor=self.band.anchor_masks)
        return self.out(merge_heads(out))[:, :length]

    def _attend_unsorted(self, qk: torch.Tensor, v: torch.Tensor,
                         key_valid: torch.Tensor | None) -> torch.Tensor:
        """Shared-QK attention over a sequence of one chunk, as transformers does it. -> (B, H, L, d)."""
        band = Band(qk.shape[2], 0, 0, causal=self.band.causal, wrap=True, mask_self=True, anchor_masks=True)
        positions = torch.arange(qk.shape[2], device=qk.device)[None, None, :]
        valid = None if key_valid is None else key_valid[:, None, :]
        out, _, _ = banded_attention(qk, normalize_keys(qk), v, positions, band, key_valid=valid,
                                     dropout=self.dropout, training=self.training)
        return out


class _SeparateQKV(nn.Module):
    """Projections of attention with separate queries, keys and values (no biases)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.n_heads, self.d_head = config.n_heads, config.d_head
        inner = config.n_heads * config.d_head
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)


class LocalSelfAttention(_SeparateQKV):
    """Attention within a band of neighbouring chunks of the sequence (separate q, k, v).

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None) -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__(config)
        self.dropout = config.local_attention_dropout
        # The anchors' local layers wrap around like their LSH chunks; ours stop at the sequence ends.
        self.band = Band(config.local_chunk_length, config.local_n_chunks_before,
                         config.local_n_chunks_after, causal=config.causal,
                         wrap=config.lsh_window == "chunk", anchor_masks=config.lsh_window == "chunk")

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        length = x.shape[1]
        x, key_valid = pad_to_multiple(x, key_valid, self.band.chunk_length)
        q = split_heads(self.q(x), self.n_heads)
        k = split_heads(self.k(x), self.n_heads) / math.sqrt(self.d_head)
        v = split_heads(self.v(x), self.n_heads)
        if self.band.wrap:   # the anchors' wrap-around band, through the general masked core
            positions = torch.arange(x.shape[1], device=x.device)[None, None, :]
            valid = None if key_valid is None else key_valid[:, None, :]
            out, _, _ = banded_attention(q, k, v, positions, self.band, key_valid=valid,
                                         dropout=self.dropout, training=self.training)
        else:                # every query sees one interval of keys (intervals.py)
            out = self._attend_intervals(q, k, v, key_valid)
        return self.out(merge_heads(out))[:, :length]

    def _attend_intervals(self, q, k, v, key_valid):
        """(B, H, L, d) each -> (B, H, L, d), the sequences of all rows and heads laid end to end."""
        batch, heads, length, d = q.shape
        window = Window(self.band.chunk_length, self.band.before, self.band.after)
        if key_valid is not None:
            key_valid = key_valid[:, None, :].expand(batch, heads, length).reshape(-1)
        spans = local_spans(window, batch * heads * length, length, self.band.causal, key_valid, q.device)
        out, _, _ = interval_attention(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d), spans, window,
                                       self.dropout, self.training)
        return out.view(batch, heads, length, -1)


class FullSelfAttention(_SeparateQKV):
    """Ordinary softmax attention over the whole sequence, through scaled_dot_product_attention.

    forward(x (batch, length, d_model), key_valid (batch, length) bool or None) -> (batch, length, d_model).
    """

    def __init__(self, config: ReformerConfig, layer_idx: int = 0):
        super().__init__(config)
        self.causal = config.causal
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                n_hashes: int | None = None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.n_heads) for proj in (self.q, self.k, self.v))
        dropout = self.dropout if self.training else 0.0
        if key_valid is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            length = x.shape[1]
            mask = key_valid[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            # A padding query with no visible key attends to itself: finite, and never read.
            mask = mask | torch.eye(length, dtype=torch.bool, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(merge_heads(out))


ATTENTION_LAYERS = {"lsh": LSHSelfAttention, "local": LocalSelfAttention, "full": FullSelfAttention}
